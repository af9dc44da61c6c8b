"""Control-file commands and progress reporting shared by both roles."""

import shlex
import time

from ..core.errors import UnknownCommand


def parse_command(text: str) -> tuple[str, list[str]]:
    """'connect nbd://x' -> ('connect', ['nbd://x']).  Empty -> UnknownCommand."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UnknownCommand(f"cannot parse command {text!r}: {e}") from None
    if not words:
        raise UnknownCommand("empty command")
    return words[0].lower(), words[1:]


class Progress:
    """Bytes done of a long job (sync, resync, commit), with rate and timing."""

    def __init__(self):
        self.done = 0
        self.total = 0
        self.started: float | None = None
        self.finished: float | None = None

    def start(self, total: int) -> None:
        self.done, self.total = 0, total
        self.started, self.finished = time.monotonic(), None

    def add(self, n: int) -> None:
        self.done += n

    def finish(self) -> None:
        self.finished = time.monotonic()

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict:
        el = self.elapsed
        return {
            "done": self.done,
            "total": self.total,
            "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
            "seconds": round(el, 3),
            "rate_bytes_per_s": int(self.done / el) if el > 0 else 0,
            "running": self.started is not None and self.finished is None,
        }
