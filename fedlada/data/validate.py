"""Reading, validating and writing data files under the data contract.

``read_records`` returns records only from a file with no problem at all; otherwise it raises ``DataError`` listing
every problem (file, line, key, what was expected) so that a user fixes a file in one pass. ``validate_files``
returns the same problems for many files without raising. Lines are read in binary mode and decoded one by one, so
that a stray non-UTF-8 byte is reported on its own line and does not hide the problems of the other lines.

Containers, chosen by suffix: JSONL (any suffix but the three below; blank lines are ignored), ``.json`` (a JSON
list of records; a ``.json`` file that does not start with ``[`` is read as JSONL), ``.csv`` (header row; an empty
cell counts as a missing field) and ``.parquet`` (needs ``pyarrow``; ``line`` is then the 1-based row). Ids that a
format lacks are ``{file-stem}-{line}`` (``{file-stem}-{item}`` for a JSON list, whose problems also name the item).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from fedlada.data.formats import CONVERTERS, FORMATS, describe_value, check_format, detect_format, undetected_format
from fedlada.data.records import RECORD_KEYS, Problem, Record
from fedlada.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_MAX_RECORD_BYTES = 20_000
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MANIFEST_NAME = "manifest.json"
_UTF8_BOM = b"\xef\xbb\xbf"
_WHITESPACE_RE = re.compile(r"[ \t\r\n]*")

# (line, number used in a default id, the parsed value or None, an error message or None, message prefix)
Item = tuple[int, int, object, str | None, str]


def _too_long(size: int, limit: int) -> str:
    return (f"record is {size} bytes, over the limit of {limit} (raise it with data.max_record_bytes, or "
            f"--max-record-bytes)")


_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# the keys some format reads (fedlada, gsm8k, mathinstruct, cot): a repeat or broken text elsewhere is ignored, as
# the formats ignore those keys
READ_KEYS = frozenset({"id", "question", "answer", "rationale", "domain", "instruction", "input", "output", "source",
                       "target"})


class _Obj(dict):
    """A decoded JSON object that remembers the keys it held more than once (json keeps the last silently)."""

    dups: frozenset = frozenset()


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    out = _Obj(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        out.dups = frozenset(k for k, _v in pairs if k in seen or seen.add(k))
    return out


def object_problem(obj: object) -> str | None:
    """Why a record object cannot be read as meant: a key a format reads given twice, or its text with a lone
    surrogate escape (``\\ud800``: not text; tokenizers and UTF-8 writers fail on it later). None if fine."""
    if not isinstance(obj, dict):
        return None
    twice = sorted(set(getattr(obj, "dups", ())) & READ_KEYS)
    if twice:
        return (f"key(s) {', '.join(map(repr, twice))} given twice in one record (JSON keeps the last silently); "
                "keep one")
    for key in sorted(READ_KEYS & obj.keys()):
        value = obj[key]
        if isinstance(value, str) and _SURROGATE_RE.search(value):
            return f"{key}: invalid Unicode (a lone surrogate escape such as \\ud800); fix the text"
    return None


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)


def _jsonl_items(data: bytes, max_bytes: int) -> Iterator[Item]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM) :]
        if not raw.strip():
            continue
        if len(raw) > max_bytes:
            yield number, number, None, _too_long(len(raw), max_bytes), ""
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, number, None, f"not valid UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}", ""
            continue
        try:
            obj = _DECODER.decode(text)
        except json.JSONDecodeError as err:
            yield number, number, None, f"bad JSON: {err.msg} (column {err.colno})", ""
            continue
        bad = object_problem(obj)
        yield (number, number, None, bad, "") if bad else (number, number, obj, None, "")


def _json_list_items(text: str, max_bytes: int) -> Iterator[Item]:
    """Elements of a top-level JSON list with the line each starts on; stops at the first syntax error."""
    decoder = _DECODER
    pos = _WHITESPACE_RE.match(text, text.index("[") + 1).end()
    line, counted_to, item = 1, 0, 0
    if pos < len(text) and text[pos] == "]":
        pos = _WHITESPACE_RE.match(text, pos + 1).end()
    else:
        while True:
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            item += 1
            prefix = f"item {item}: "
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                yield err.lineno, item, None, f"bad JSON: {err.msg} (column {err.colno})", prefix
                return
            size = len(text[pos:end].encode("utf-8"))
            bad = object_problem(obj)
            if bad:
                yield line, item, None, bad, prefix
            elif size > max_bytes:
                yield line, item, None, _too_long(size, max_bytes), prefix
            else:
                yield line, item, obj, None, prefix
            pos = _WHITESPACE_RE.match(text, end).end()
            if pos < len(text) and text[pos] == ",":
                pos = _WHITESPACE_RE.match(text, pos + 1).end()
                continue
            if pos < len(text) and text[pos] == "]":
                pos = _WHITESPACE_RE.match(text, pos + 1).end()
                break
            line += text.count("\n", counted_to, pos)
            yield line, item, None, "bad JSON: expected ',' or ']' after a list element", ""
            return
    if pos < len(text):
        yield text.count("\n", 0, pos) + 1, 0, None, "bad JSON: extra data after the list", ""


def _csv_items(text: str, max_bytes: int) -> Iterator[Item]:
    reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)  # "a, b": the blank is no part
    if reader.fieldnames:  # of a value or a name; nor is one before a comma ("id ,question")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        twice = sorted({n for n in reader.fieldnames if n in READ_KEYS and reader.fieldnames.count(n) > 1})
        if twice:  # DictReader would keep the last column of a name silently
            yield 1, 1, None, f"the header names column(s) {', '.join(map(repr, twice))} more than once; keep one", ""
            return
    start = 2  # the header is line 1
    for row in reader:
        line = start
        start = reader.line_num + 1
        if None in row:
            yield line, line, None, f"more fields than the header's {len(reader.fieldnames)}", ""
            continue
        # csv keeps the \r\n of quoted multi-line cells; the contract's rationale lines end in \n.
        obj = {key: value.replace("\r\n", "\n") for key, value in row.items() if value not in (None, "")}
        size = sum(len(str(v).encode("utf-8")) for v in obj.values())
        if size > max_bytes:
            yield line, line, None, _too_long(size, max_bytes), ""
        else:
            yield line, line, obj, None, ""


def parquet_unreadable(err: Exception) -> str:
    """The problem line for a .parquet file that pyarrow cannot read (its first line of explanation)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"not a readable Parquet file ({reason})"


def _parquet_items(path: Path, max_bytes: int) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        yield 0, 0, None, "reading .parquet files needs the pyarrow package (pip install pyarrow)", ""
        return
    import pyarrow as pa

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        yield 0, 0, None, parquet_unreadable(err), ""
        return
    for row, obj in enumerate(rows, start=1):
        size = sum(len(str(v).encode("utf-8")) for v in obj.values() if v is not None)
        if size > max_bytes:
            yield row, row, None, _too_long(size, max_bytes), ""
        else:
            yield row, row, obj, None, ""


def _decoded(data: bytes, name: str, problems: list[Problem]) -> str | None:
    """The whole file as text, or None after reporting the line of its first non-UTF-8 byte."""
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        problems.append(Problem(name, line, None, (
            f"not valid UTF-8: byte 0x{data[err.start]:02x} at column {column} (the whole file must be UTF-8)")))
        return None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _one_json_object(data: bytes) -> dict | None:
    """The object a whole file holds when it is one JSON object spread over several lines (else None)."""
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if text.strip().count("\n") == 0 or _parses(first):  # one line, or JSON Lines: not a spread-out object
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


_MAGIC = ((b"\x1f\x8b", "gzip-compressed"), (b"PK\x03\x04", "a zip archive"), (b"BZh", "bzip2-compressed"),
          (b"\xfd7zXZ\x00", "xz-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"), (b"PAR1", "a Parquet file"))


def container_problem(path: Path) -> str | None:
    """Why a non-Parquet file cannot be a data file at all (compressed, a Parquet file under another suffix, a text
    file of another kind read as JSON Lines), in one problem instead of one per line; None when it may be one."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "this is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            fix = "name it .parquet" if what == "a Parquet file" else "decompress it first"
            return f"this is {what}, not text: data files are read as they are (.jsonl, .json, .csv, .parquet); {fix}"
    suffix = path.suffix.lower()
    lines = head.lstrip(_UTF8_BOM).split(b"\n")
    first = next((line for line in lines[:-1] if line.strip()), None)  # a whole line
    if (suffix == ".jsonl" and first is not None and b"{" not in first and b"," in first
            and not _parses(first.decode("utf-8", errors="replace"))):
        return ("the first line is not JSON but looks like a CSV header (comma-separated names): a .jsonl file holds "
                "one JSON object per line; if this is CSV, name it .csv")
    if suffix not in DATA_SUFFIXES:
        if first is not None and not _parses(first.decode("utf-8", errors="replace")):
            return (f"the first line is not JSON: a {suffix or 'suffix-less'} file is read as JSON Lines (supported: "
                    f"{', '.join(DATA_SUFFIXES)}; a tab-separated file: convert it to .csv)")
    return None


def _items(path: Path, max_bytes: int, problems: list[Problem]) -> Iterable[Item]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_items(path, max_bytes)
    wrong = container_problem(path)
    if wrong is not None:
        return iter([(1, 1, None, wrong, "")])
    data = path.read_bytes()
    if suffix in (".csv", ".json"):
        if suffix == ".json" and not data.lstrip(_UTF8_BOM + b" \t\r\n").startswith(b"["):
            whole = _one_json_object(data)
            if whole is not None:  # e.g. {"data": [...]}, indented: not a list, not one record per line
                lists = [k for k, v in whole.items() if isinstance(v, list)]
                hint = f"; its records may be the list under {lists[0]!r}: save that list" if lists else ""
                return iter([(1, 1, None, "a .json file holds a list of records ([...]) or one record per line (JSON "
                                          f"Lines); this one is a single object over several lines{hint}", "")])
            return _jsonl_items(data, max_bytes)
        text = _decoded(data, str(path), problems)
        if text is None:
            return ()
        return _csv_items(text, max_bytes) if suffix == ".csv" else _json_list_items(text, max_bytes)
    return _jsonl_items(data, max_bytes)


def convert_items(items: Iterable[Item], *, source: str, stem: str, format: str) -> tuple[list[Record], list[Problem]]:
    """Records and problems from parsed items: format detection on the first object, conversion, duplicate ids.

    Shared by local files and ``load_hub_dataset`` so that both convert with exactly the same code.
    """
    fmt = None if format == "auto" else format
    records: list[Record] = []
    problems: list[Problem] = []
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
            else:
                logger.debug("%s: detected format %s on line %s", source, fmt, line)
        if fmt == "undetected":
            continue
        record, issues = CONVERTERS[fmt](obj, default_id=f"{stem}-{number}")
        problems.extend(Problem(source, where, key, prefix + message) for key, message in issues)
        if record is None:
            continue
        if record.id in first_line:
            problems.append(Problem(source, where, "id", (
                f"{prefix}duplicate id {record.id!r} (first on line {first_line[record.id]})")))
            continue
        first_line[record.id] = line
        records.append(record)
    if count == 0 and not problems:
        problems.append(Problem(source, None, None, "empty file: no records"))
    return records, problems


def scan_file(path: str | os.PathLike, *, format: str = "auto",
              max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> tuple[list[Record], list[Problem]]:
    """(records, problems) of one file; never raises for bad content."""
    check_format(format)
    path = Path(path)
    name = str(path)
    if not path.exists():
        return [], [Problem(name, None, None, not_found(path))]
    if not path.is_file():
        return [], [Problem(name, None, None, "not a regular file")]
    problems: list[Problem] = []
    items = _items(path, max_record_bytes, problems)
    records, more = convert_items(items, source=name, stem=path.stem, format=format)
    if problems:
        more = [p for p in more if p.message != "empty file: no records"]
    return records, problems + more


def read_records(path: str | os.PathLike, *, format: str = "auto",
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[Record]:
    """All records of a data file; ``DataError`` listing every problem (file, line, key) if there is any.

    format: "auto" (detected from the first object), or one of ``fedlada.data.formats.FORMATS``.
    """
    records, problems = scan_file(path, format=format, max_record_bytes=max_record_bytes)
    if problems:
        raise missing_or_bad(path, problems)
    return records


NOT_FOUND = "file not found"


def not_found(path: Path) -> str:
    """"file not found", and for a relative path where it was looked for (a Flower app's working directory is
    the SuperLink's or SuperNode's, not the experimenter's)."""
    return NOT_FOUND if path.is_absolute() else f"{NOT_FOUND} (a relative path, looked for in {Path.cwd()})"


def missing_or_bad(path, problems: list[Problem]) -> DataError:
    """The DataError of a data file: one line for a missing file, else the count and every problem."""
    if problems[0].message.startswith(NOT_FOUND):
        err = DataError(f"{path}: {problems[0].message}")
        err.problems = list(problems)
        return err
    return DataError(f"{path}: {len(problems)} problem(s)", problems)


_said: set[str] = set()


def expand_data_paths(paths) -> list[Path]:
    """The files ``validate_files`` reads: each path, a directory standing for its data files (``manifest.json``
    excepted; a directory without any stays as it is, to be reported)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in (Path(x).expanduser() for x in paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in DATA_SUFFIXES and f.name != MANIFEST_NAME)
            other = sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() and f not in found
                           and f.name != MANIFEST_NAME and not f.name.startswith("."))
            message = (f"{p}: {len(other)} file(s) left out, not data files by their suffix ("
                       f"{', '.join(other[:5])}{', ...' if len(other) > 5 else ''}; read: {', '.join(DATA_SUFFIXES)})")
            if other and message not in _said:  # the same directory expanded again: said once
                _said.add(message)
                logger.warning("%s", message)
            files.extend(found or [p])
        else:
            files.append(p)
    return files


def validate_files(paths, *, format: str = "auto",
                   max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[Problem]:
    """Every problem in the given files (a path, or a list of paths; a directory stands for its data files,
    ``manifest.json`` excepted). An empty list means every file can be read with ``read_records``."""
    check_format(format)
    problems: list[Problem] = []
    for path in expand_data_paths(paths):
        if path.is_dir():
            problems.append(Problem(str(path), None, None,
                                    f"no data files ({', '.join(DATA_SUFFIXES)}) in this directory"))
            continue
        problems.extend(scan_file(path, format=format, max_record_bytes=max_record_bytes)[1])
    return problems


def write_records(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records in the container their suffix names, as ``read_records`` reads them back: ``.csv`` (a header
    row), ``.parquet`` (string columns), ``.json`` (one list), anything else JSON Lines (UTF-8, one object per line,
    optional fields left out when None).

    Atomic: the file is written next to its target and renamed over it, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    suffix = path.suffix.lower()
    try:
        rows = [r.to_json() for r in records]
        columns = [k for k in RECORD_KEYS if any(k in row for row in rows)] or ["id", "question", "answer"]
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pydict({k: [row.get(k) for row in rows] for k in columns},
                                                schema=pa.schema([(k, pa.string()) for k in columns])), tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="" if suffix == ".csv" else "\n") as handle:
                if suffix == ".csv":
                    writer = csv.DictWriter(handle, fieldnames=columns)
                    writer.writeheader()
                    writer.writerows(rows)
                elif suffix == ".json":
                    json.dump(rows, handle, ensure_ascii=False, indent=0)
                    handle.write("\n")
                else:
                    handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


__all__ = ["DEFAULT_MAX_RECORD_BYTES", "FORMATS", "convert_items", "read_records", "scan_file",
           "validate_files", "write_records"]
