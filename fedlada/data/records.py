"""The record type of the data contract and the problem type that validation reports.

A record is one reasoning sample: ``id`` (unique within its file), ``question``, ``answer`` (both non-empty),
an optional ``rationale`` (one step per line) and an optional ``domain``. Files hold one JSON object per line
(JSONL); ``fedlada.data.formats`` maps other public layouts (GSM8K, MathInstruct, CoT-Collection) onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

RECORD_KEYS = ("id", "question", "answer", "rationale", "domain")
REQUIRED_KEYS = ("id", "question", "answer")
OPTIONAL_KEYS = ("rationale", "domain")


@dataclass(frozen=True)
class Record:
    """One reasoning sample of the data contract."""

    id: str
    question: str
    answer: str
    rationale: str | None = None
    domain: str | None = None

    def to_json(self) -> dict:
        """The JSON object for this record; optional fields that are None are left out."""
        obj = {"id": self.id, "question": self.question, "answer": self.answer}
        if self.rationale is not None:
            obj["rationale"] = self.rationale
        if self.domain is not None:
            obj["domain"] = self.domain
        return obj


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file: where (file, 1-based line, key) and what was expected or found.

    ``line`` is None for whole-file problems (missing, empty); ``key`` is None when no single field is at fault.
    ``str(problem)`` is ``"file:line: key: message"`` with the absent parts left out.
    """

    file: str
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
