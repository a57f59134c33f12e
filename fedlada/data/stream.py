"""Streaming reads of data files: records one at a time, for public pools too large to hold as Python objects.

``iter_records`` yields the same records, in the same order, as ``read_records`` and applies the same validation
(same ``Problem`` file, line, key and message); ``scan_problems`` returns exactly ``scan_file``'s problems. What
stays in memory while streaming a JSONL or Parquet file is one line (one Parquet batch) plus, during validation, the
table of ids seen so far, which the duplicate-id check needs; records are never accumulated.

Where this departs from ``read_records``:

* ``read_records`` raises before returning anything. ``iter_records(check_first=True)`` (the default) keeps that
  promise by reading the file twice: a validating pass that keeps only problems and ids, then the yielding pass,
  which trusts the first one's duplicate-id check and keeps no id table (a file rewritten between the two passes
  could slip a duplicate id through; every other check runs again).
  With ``check_first=False`` the file is read once and ``DataError`` is raised at the first problem, after the
  records before it have been yielded (the error names that problem's file and line).
* Only JSONL (and ``.json`` files that are JSONL) and Parquet are read incrementally. A ``.json`` list or a ``.csv``
  file is parsed whole, as ``read_records`` does, and its records are then yielded one at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from fedlada.data.formats import CONVERTERS, check_format, describe_value, detect_format, undetected_format
from fedlada.data.records import Problem, Record
from fedlada.data.validate import (_DECODER, DEFAULT_MAX_RECORD_BYTES, Item, _UTF8_BOM, _items, _too_long,
                                   container_problem, missing_or_bad, not_found, object_problem, parquet_unreadable)

logger = logging.getLogger(__name__)

_SNIFF_SKIP = set(_UTF8_BOM + b" \t\r\n")  # the bytes read_records strips before looking for a '['
_PARQUET_BATCH_ROWS = 1024


def _jsonl_lines(path: Path, max_bytes: int) -> Iterator[Item]:
    """``validate._jsonl_items`` over a file read line by line (same line numbers, same messages)."""
    import json

    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if number == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM):]
            if not raw.strip():
                continue
            if len(raw) > max_bytes:
                yield number, number, None, _too_long(len(raw), max_bytes), ""
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (number, number, None,
                       f"not valid UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}", "")
                continue
            try:
                obj = _DECODER.decode(text)
            except json.JSONDecodeError as err:
                yield number, number, None, f"bad JSON: {err.msg} (column {err.colno})", ""
                continue
            bad = object_problem(obj)
            yield (number, number, None, bad, "") if bad else (number, number, obj, None, "")


def _parquet_batches(path: Path, max_bytes: int) -> Iterator[Item]:
    """``validate._parquet_items`` over record batches of the file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        yield 0, 0, None, "reading .parquet files needs the pyarrow package (pip install pyarrow)", ""
        return
    import pyarrow as pa

    row = 0
    try:  # a damaged row group may only show while reading it
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for obj in batch.to_pylist():
                row += 1
                size = sum(len(str(v).encode("utf-8")) for v in obj.values() if v is not None)
                if size > max_bytes:
                    yield row, row, None, _too_long(size, max_bytes), ""
                else:
                    yield row, row, obj, None, ""
    except (pa.ArrowException, OSError) as err:
        yield row + 1, row + 1, None, parquet_unreadable(err), ""


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as handle:
        while block := handle.read(1 << 16):
            for byte in block:
                if byte not in _SNIFF_SKIP:
                    return byte == ord("[")
    return False


def _stream_items(path: Path, max_bytes: int, problems: list[Problem]) -> Iterable[Item]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_batches(path, max_bytes)
    wrong = container_problem(path)
    if wrong is not None:
        return iter([(1, 1, None, wrong, "")])
    if suffix == ".csv" or (suffix == ".json" and _starts_with_bracket(path)):
        return _items(path, max_bytes, problems)  # parsed whole, like read_records
    return _jsonl_lines(path, max_bytes)


def _convert_stream(items: Iterable[Item], *, source: str, stem: str, format: str, problems: list[Problem],
                    check_duplicates: bool = True) -> Iterator[Record]:
    """``validate.convert_items`` as a generator: yields records, appends problems to ``problems`` as found.
    ``check_duplicates=False`` skips the duplicate-id check and the id table it needs (for a validated file)."""
    fmt = None if format == "auto" else format
    first_line: dict[str, int] = {}
    count = 0
    for line, number, obj, error, prefix in items:
        count += 1
        where = line or None
        if error is not None:
            problems.append(Problem(source, where, None, prefix + error))
            continue
        if not isinstance(obj, dict):
            found = describe_value(obj)
            problems.append(Problem(source, where, None, f"{prefix}expected a JSON object, found {found}"))
            continue
        if fmt is None:
            fmt = detect_format(obj)
            if fmt is None:
                fmt = "undetected"
                problems.append(Problem(source, where, None, (
                    prefix + undetected_format(obj))))
        if fmt == "undetected":
            continue
        record, issues = CONVERTERS[fmt](obj, default_id=f"{stem}-{number}")
        problems.extend(Problem(source, where, key, prefix + message) for key, message in issues)
        if record is None:
            continue
        if check_duplicates:
            if record.id in first_line:
                problems.append(Problem(source, where, "id", (
                    f"{prefix}duplicate id {record.id!r} (first on line {first_line[record.id]})")))
                continue
            first_line[record.id] = line
        yield record
    if count == 0 and not problems:
        problems.append(Problem(source, None, None, "empty file: no records"))


def _missing(path: Path) -> list[Problem]:
    if not path.exists():
        return [Problem(str(path), None, None, not_found(path))]
    if not path.is_file():
        return [Problem(str(path), None, None, "not a regular file")]
    return []


def _reader(path: Path, format: str, max_record_bytes: int, *,
            check_duplicates: bool = True) -> tuple[Iterator[Record], list[Problem], list[Problem]]:
    """(records of ``path`` as they are read, whole-file read problems, record problems); both lists fill up while
    the iterator runs, each problem before the next record is yielded. ``_merged`` gives ``scan_file``'s list."""
    read_problems: list[Problem] = []  # whole-file decoding problems (csv, json list): scan_file lists them first
    record_problems: list[Problem] = []
    items = _stream_items(path, max_record_bytes, read_problems)
    records = _convert_stream(items, source=str(path), stem=path.stem, format=format, problems=record_problems,
                              check_duplicates=check_duplicates)
    return records, read_problems, record_problems


def _merged(read_problems: list[Problem], record_problems: list[Problem]) -> list[Problem]:
    if read_problems:
        record_problems = [p for p in record_problems if p.message != "empty file: no records"]
    return read_problems + record_problems


def scan_problems(path: str | os.PathLike, *, format: str = "auto",
                  max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[Problem]:
    """Every problem of one file, equal to ``scan_file(path)[1]``, read without keeping records; never raises for
    bad content."""
    check_format(format)
    path = Path(path)
    missing = _missing(path)
    if missing:
        return missing
    records, read_problems, record_problems = _reader(path, format, max_record_bytes)
    for _ in records:
        pass
    return _merged(read_problems, record_problems)


def _raise(path: Path, problems: list[Problem]) -> None:
    raise missing_or_bad(path, problems)


def iter_records(path: str | os.PathLike, *, format: str = "auto", max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 check_first: bool = True) -> Iterator[Record]:
    """The records of a data file one at a time, equal to ``read_records(path, ...)`` item by item.

    ``check_first=True``: the whole file is validated first (a pass that keeps only problems and ids) and
    ``DataError`` listing every problem is raised before the first record is yielded, as ``read_records`` does.
    ``check_first=False``: one pass; ``DataError`` is raised at the first problem, naming its file and line,
    after the records read before it were yielded. Being a generator, it raises (a bad ``format``: ConfigError; a
    missing file: DataError) on the first ``next``, not when called.
    """
    check_format(format)
    path = Path(path)
    missing = _missing(path)
    if missing:
        _raise(path, missing)
    if check_first:
        problems = scan_problems(path, format=format, max_record_bytes=max_record_bytes)
        if problems:
            _raise(path, problems)
    # After a clean validating pass the ids are known to be unique: the yielding pass keeps no id table.
    records, read_problems, record_problems = _reader(path, format, max_record_bytes, check_duplicates=not check_first)
    for record in records:
        if read_problems or record_problems:
            break
        yield record
    if read_problems or record_problems:
        _raise(path, _merged(read_problems, record_problems))


__all__ = ["iter_records", "scan_problems"]
