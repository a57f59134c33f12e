"""Checkpoint files: written durably, read with an error that names the file and says how to resume.

``save`` writes through an open file and fsyncs it before returning, so a round's ``COMPLETE`` marker (written after
all of its files) never stands beside a file the operating system had not stored yet; a failed write (a full disk,
a file-size limit) is a :class:`~fedlada.errors.FedLadaError` naming the file. ``load`` turns a damaged or missing
file into a :class:`~fedlada.errors.ConfigError` that names it and the round folder to delete to resume from the
round before.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import torch

from fedlada.errors import ConfigError, FedLadaError


class _Recorder(io.RawIOBase):
    """A write-only file around ``f`` that keeps the first OSError a write raised: torch's zip writer turns it into
    a RuntimeError about stream positions, which says nothing to a user whose disk is full."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise


def save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    recorder = None
    try:
        with open(path, "wb") as f:
            recorder = _Recorder(f)
            torch.save(obj, recorder)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        cause = recorder.error if recorder is not None and recorder.error is not None else e
        reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else str(cause)
        raise FedLadaError(f"cannot write checkpoint file {path}: {reason} (a full disk or a file-size limit?); the "
                           "rounds checkpointed before are kept, and the same command resumes after the last of "
                           "them") from e


def mark_complete(folder: str | os.PathLike, round: int) -> None:
    """The round's ``COMPLETE`` marker, stored durably: written last, it says every file of the round is there."""
    path = Path(folder) / "COMPLETE"
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(str(round))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink(missing_ok=True)  # an empty marker would claim the round complete
        raise FedLadaError(f"cannot write checkpoint file {path}: {e.strerror or e} (a full disk or a file-size "
                           "limit?); the rounds checkpointed before are kept, and the same command resumes after the "
                           "last of them") from e


def load(path: str | os.PathLike, *, weights_only: bool = True):
    """What ``save`` wrote to ``path``; a ConfigError naming the file when it is missing or damaged (a torch zip
    whose stored checksums do not match its bytes too: ``torch.load`` does not check them)."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise ValueError(f"its entry {bad} fails its CRC check")
        return torch.load(path, weights_only=weights_only)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile) as e:
        # torch's first line only: its advice to load with weights_only=False is wrong for a damaged file
        first = (str(e).strip().splitlines() or [""])[0].strip()
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in first:
            first = "its bytes do not load as a checkpoint"
        reason = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__}: {first[:200]})"
        raise ConfigError(f"checkpoint file {path} is {reason}: the checkpoint of that round is damaged; delete "
                          f"{path.parent} to resume from the round before it") from None
