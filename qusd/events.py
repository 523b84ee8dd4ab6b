"""The kinds of event qusd logs, each with a stable journal MESSAGE_ID, so
`journalctl MESSAGE_ID=...` finds every registration, refusal or conflict."""

from __future__ import annotations

from typing import Any

MESSAGE_IDS = {
    "restored": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d01",
    "registered": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d02",
    "unregistered": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d03",
    "refused": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d04",
    "conflict": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d05",
}


def event(kind: str) -> dict[str, Any]:
    """logging `extra` for an event: the MESSAGE_ID and QUSD_EVENT fields."""
    return {"MESSAGE_ID": MESSAGE_IDS[kind], "QUSD_EVENT": kind}
