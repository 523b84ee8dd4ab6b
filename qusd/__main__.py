"""`python -m qusd` is qusctl until the daemon lands."""

import sys

from qusd.cli import main

sys.exit(main())
