"""Progress lines on the driver's console: ``[loraflock HH:MM:SS] message``, flushed at once.

One helper so every stage's lines look alike and reach a Ray job's log as they happen.
"""

from __future__ import annotations

import time

__all__ = ["say"]


def say(msg: str) -> None:
    """Print one progress line with the time of day."""
    print(f"[loraflock {time.strftime('%H:%M:%S')}] {msg}", flush=True)
