"""User-facing errors.

A :class:`FedLadaError` is a problem the user can fix (a malformed file, a bad config value, a missing model).
The command line prints its message without a traceback and exits with status 2; anything else is a bug.
"""

from __future__ import annotations


class FedLadaError(Exception):
    """A user error: the message says what was expected, what was found, and where."""


class ConfigError(FedLadaError):
    """A bad config key or value."""


class RunDirBusy(ConfigError):
    """A run folder another process is running in (or ran in while this one was starting)."""


class ModelError(FedLadaError):
    """A model that cannot be found or loaded."""


class DataError(FedLadaError):
    """One or more problems in data files; ``problems`` lists every one of them."""

    def __init__(self, message: str, problems: list | None = None):
        self.problems = list(problems or [])
        if self.problems:
            shown = "\n".join(f"  {p}" for p in self.problems[:50])
            more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
            message = f"{message}\n{shown}{more}"
        super().__init__(message)


def is_write_failure(e: BaseException) -> bool:
    """An I/O failure while writing files, also as a library's own exception (safetensors reports a full disk as a
    ``SafetensorError`` "I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return isinstance(e, Exception) and ("I/O error" in text or "No space left" in text or "(os error" in text)
