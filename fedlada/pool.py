"""Scoring a whole public pool in chunks, so that a pool of 100k+ questions streams through a model.

The filter's per-question quantities (LADA.md, "Model learnability-aware data filter") need l(x, y; pi), the
per-token NLL of a path under a model, for many (question, path) pairs of the public pool D_p. ``score_pool`` takes
records from any iterable (``fedlada.data.iter_records`` reads a file lazily), takes ``chunk_size`` of them at a
time, and scores each chunk with ``paths.score_paths``, which sorts the chunk's pairs by length into batches
(length-bucketed batching: a batch is padded only to its own longest pair). Peak memory is set by ``chunk_size``
and ``batch_size``, not by the size of the pool; only three numbers and the id per record are kept.

The scored path of a record is its reference path ``reasoning.format_path(rationale, answer)`` after the prompt
``prompt(question)`` (default ``reasoning.format_prompt``), under the tokenisation rule of ``fedlada.paths``.
Bucketing happens inside a chunk only: a larger chunk pads less and holds more pairs at once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedlada import reasoning
from fedlada.data import Record
from fedlada.paths import PathScores, score_paths

logger = logging.getLogger(__name__)

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily from ``items``."""
    if size < 1:
        raise ValueError(f"chunked: size must be >= 1, found {size}")
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@dataclass(frozen=True)
class PoolScores:
    """Scores of a pool's reference paths in input order: ``ids`` (N,), ``logprob`` (N,) float64 = log pi(y | x),
    ``num_tokens`` (N,) int64 = scored tokens (path + eos, after truncation)."""

    ids: list[str]
    logprob: np.ndarray
    num_tokens: np.ndarray

    @property
    def nll(self) -> np.ndarray:
        """Per-token NLL l(x, y; pi) = -logprob / num_tokens, (N,)."""
        return -self.logprob / self.num_tokens

    def __len__(self) -> int:
        return len(self.ids)


def iter_pool_scores(model, tokenizer, records: Iterable[Record], *, prompt: Callable[[str], str] | None = None,
                     chunk_size: int = 1024, batch_size: int = 32,
                     max_length: int = 512) -> Iterator[tuple[list[str], PathScores]]:
    """``(ids, scores)`` per chunk of ``chunk_size`` records; see :func:`score_pool`."""
    fmt = prompt or reasoning.format_prompt
    for chunk in chunked(records, chunk_size):
        prompts = [fmt(r.question) for r in chunk]
        paths = [reasoning.format_path(r.rationale, r.answer) for r in chunk]
        yield [r.id for r in chunk], score_paths(model, tokenizer, prompts, paths, batch_size=batch_size,
                                                 max_length=max_length, reuse_prefix=False)


def score_pool(model, tokenizer, records: Iterable[Record], *, prompt: Callable[[str], str] | None = None,
               chunk_size: int = 1024, batch_size: int = 32, max_length: int = 512,
               progress: Callable[[int, int | None], None] | None = None) -> PoolScores:
    """log pi(reference path | prompt) of every record, scored ``chunk_size`` records at a time.

    ``records`` is consumed once, lazily (a generator such as ``iter_records(path)`` is never materialised).
    Equal to ``score_paths`` over the whole pool to float rounding, whatever ``chunk_size`` and ``batch_size``.
    ``progress(done, total)`` after each chunk (``total`` is ``len(records)`` when it has one, else None).
    """
    total = len(records) if hasattr(records, "__len__") else None
    ids: list[str] = []
    logprob: list[np.ndarray] = []
    num_tokens: list[np.ndarray] = []
    for chunk_ids, scores in iter_pool_scores(model, tokenizer, records, prompt=prompt, chunk_size=chunk_size,
                                              batch_size=batch_size, max_length=max_length):
        ids += chunk_ids
        logprob.append(scores.logprob)
        num_tokens.append(scores.num_tokens)
        if progress is not None:
            progress(len(ids), total)
    logger.info("score_pool: %d records in %d chunk(s) of up to %d", len(ids), len(logprob), chunk_size)
    return PoolScores(ids, np.concatenate(logprob) if logprob else np.zeros(0),
                      np.concatenate(num_tokens) if num_tokens else np.zeros(0, dtype=np.int64))


__all__ = ["PoolScores", "chunked", "iter_pool_scores", "score_pool"]
