"""A Python process inside a sandbox that runs calls for the tests.

The tests cannot move pytest itself into a user namespace and back, so they
start this worker in a fresh sandbox and send it calls: (method of a
BinfmtMisc bound to the sandbox's private mount, or a module-level function)
as length-prefixed pickles on stdin; results, or the QusdError raised, come
back the same way on stdout.
"""

from __future__ import annotations

import importlib
import pickle
import struct
import sys
import traceback
from typing import IO, Any

from qusd.binfmt import BinfmtMisc
from qusd.errors import QusdError


def read_frame(stream: IO[bytes]) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack("!I", head)
    return pickle.loads(stream.read(size))


def write_frame(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("!I", len(data)) + data)
    stream.flush()


def serve(binfmt_path: str) -> None:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    kernel = BinfmtMisc(binfmt_path)
    write_frame(out, ("ready", None))
    while (msg := read_frame(inp)) is not None:
        kind, name, args, kwargs = msg
        try:
            if kind == "kernel":
                fn = getattr(kernel, name)
            else:
                module, _, func = name.partition(":")
                fn = getattr(importlib.import_module(module), func)
            write_frame(out, ("ok", fn(*args, **kwargs)))
        except QusdError as e:
            kind = (type(e).__module__, type(e).__name__)
            write_frame(out, ("qusd", (*kind, e.reason, e.field, e.details)))
        except Exception as e:  # the test sees it as a failure with the trace
            write_frame(out, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


if __name__ == "__main__":
    serve(sys.argv[1])
