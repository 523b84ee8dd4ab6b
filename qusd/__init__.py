"""qusd: keeps QEMU user-mode binfmt_misc registrations alive and serves them."""

__version__ = "0.1.0"
