"""Loading public reasoning data sets from the Hugging Face hub (or any ``datasets`` builder) as records.

Rows go through ``fedlada.data.validate.convert_items``, the very code that converts local files, so a hub data set
and the same rows in a local JSONL file give the same records. Ids are ``{name-stem}-{split}-{row}`` (1-based row)
unless a row carries a string ``id``. Known names pick their format and config; any other name needs ``format`` (or
"auto", detected from the first row). ``data_files`` is passed through, which also lets
``load_hub_dataset("json", data_files=...)`` load local files through the same path (that is how it is tested: this
machine cannot reach the hub).

Departure from the contract: ``skip_invalid`` (default False) drops unconvertible rows with a logged count instead of
raising; MathInstruct's program-of-thought rows, for instance, have no final answer to extract.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

from fedlada.data.formats import check_format
from fedlada.data.records import Record
from fedlada.data.validate import Item, convert_items
from fedlada.errors import DataError

logger = logging.getLogger(__name__)

# name -> (format, default config)
KNOWN_HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "openai/gsm8k": ("gsm8k", "main"),
    "TIGER-Lab/MathInstruct": ("mathinstruct", None),
    "kaist-ai/CoT-Collection": ("cot", None),
}


def _rows(dataset, limit: int | None) -> Iterator[Item]:
    for row, obj in enumerate(dataset, start=1):
        if limit is not None and row > limit:
            return
        yield row, row, obj, None, ""


def load_hub_dataset(name: str, *, split: str, format: str = "auto", config: str | None = None,
                     limit: int | None = None, data_files=None, cache_dir: str | None = None,
                     skip_invalid: bool = False) -> list[Record]:
    """Records of one split of a ``datasets`` data set.

    name: a hub id (``openai/gsm8k``, ``TIGER-Lab/MathInstruct``, ``kaist-ai/CoT-Collection`` are known) or a
      builder such as ``"json"`` together with ``data_files``.
    format: "auto" (the known name's format, else detected from the first row) or one of the formats.
    config: the builder config; a known name's default (``main`` for GSM8K) when None.
    limit: convert at most this many rows (the first ones of the split).
    Raises DataError listing every problem (row numbers as ``line``), unless ``skip_invalid``.
    """
    check_format(format)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit}")
    known_format, known_config = KNOWN_HUB_DATASETS.get(name, ("auto", None))
    fmt = known_format if format == "auto" else format
    config = config if config is not None else known_config

    import datasets  # heavy; only when a data set is actually loaded

    try:
        dataset = datasets.load_dataset(name, config, split=split, data_files=data_files, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DataError(f"cannot load data set {name!r} (config {config!r}, split {split!r}): {err}") from err
    source = f"{name}[{split}]"
    stem = re.sub(r"[^A-Za-z0-9_.]+", "-", name.rsplit("/", 1)[-1]) + f"-{split}"
    records, problems = convert_items(_rows(dataset, limit), source=source, stem=stem, format=fmt)
    if problems and not skip_invalid:
        raise DataError(f"{source}: {len(problems)} problem(s) (skip_invalid=True drops these rows)", problems)
    if problems:
        logger.warning("%s: skipped %d problem(s); first: %s", source, len(problems), problems[0])
    logger.info("%s: %d records (format %s)", source, len(records), fmt)
    return records
