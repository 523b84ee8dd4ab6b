"""`python -m qusd` is qusctl, the command-line client."""

import sys

from qusd.cli import main

sys.exit(main())
