"""docs/configuration.md stays in sync with the code: every key documented, none extra, every default true.

The reference's tables have the header ``key | default | accepted values | what it does``; each row's first cell is
one full dotted key in backticks (list items as ``.N.``: ``models.slms.N.hidden_size``, ``data.clients.N.train``)
and its second cell one TOML value in backticks. The keys the code has are found by walking the dataclasses of
``fedlada.config.RunConfig`` and ``fedlada_app.settings.FlowerConfig`` (under ``flower.``).

Defaults: a key's documented default must parse (``tomllib`` on ``x = <default>``) to the code's default, type
included (tuples compare as lists, ``3600.0`` is not ``3600``). For a list-of-tables item (``models.slms.N.*``,
``data.clients.N.*``) the default is the item dataclass's field default: what a spec written in a config file starts
from. ``models.llm.*`` is the LLM's default spec (``ModelsConfig().llm``), which differs from ``ModelSpec()``.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

from fedlada.config import ModelSpec, RunConfig, _default_slms
from fedlada_app.settings import FlowerConfig
from conftest import markdown_cells as _cells

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = ["key", "default", "accepted values", "what it does"]
_MISSING = object()


def doc_rows() -> list[tuple[int, str, str]]:
    """(line number, first cell, second cell) of every body row of the doc's reference tables."""
    rows: list[tuple[int, str, str]] = []
    in_table = False
    lines = DOC.read_text(encoding="utf-8").splitlines()
    for no, line in enumerate(lines, 1):
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if cells == HEADER:
            in_table = True
            continue
        if in_table and all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
            continue
        if in_table:
            assert len(cells) == 4, f"{DOC.name}:{no}: a reference row needs 4 cells, found {len(cells)}: {line!r}"
            rows.append((no, cells[0], cells[1]))
    return rows


def documented() -> dict[str, tuple[int, str]]:
    """key -> (line number, the default's TOML text) as the doc has them; bad cells and repeats fail here."""
    out: dict[str, tuple[int, str]] = {}
    problems = []
    for no, key_cell, default_cell in doc_rows():
        k = re.fullmatch(r"`([A-Za-z0-9_.]+)`", key_cell)
        d = re.fullmatch(r"`([^`]*)`", default_cell)
        if not k:
            problems.append(f"line {no}: first cell is not one backticked key: {key_cell!r}")
            continue
        if not d:
            problems.append(f"line {no}: default cell of {k.group(1)} is not one backticked TOML value: "
                            f"{default_cell!r}")
            continue
        if k.group(1) in out:
            problems.append(f"line {no}: {k.group(1)} documented twice (also line {out[k.group(1)][0]})")
        out[k.group(1)] = (no, d.group(1))
    assert not problems, f"{DOC.name}: " + "; ".join(problems)
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def code_keys() -> dict[str, Any]:
    """Every configuration key of the code with its default, as the reference documents them."""
    out: dict[str, Any] = {}

    def walk(cls: type, value: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
            if dataclasses.is_dataclass(tp):
                walk(tp, getattr(value, f.name), key + ".")
            elif item is not None and dataclasses.is_dataclass(item):
                # a list of tables: an item written in a config starts from its class's field defaults
                for g in dataclasses.fields(item):
                    out[f"{key}.N.{g.name}"] = _field_default(g)
            else:
                out[key] = getattr(value, f.name)

    walk(RunConfig, RunConfig(), "")
    walk(FlowerConfig, FlowerConfig(), "flower.")
    return out


def _plain(x: Any) -> Any:
    """Tuples as lists, recursively (TOML has arrays only)."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _same(a: Any, b: Any) -> bool:
    """Equal value and equal type (1 is not 1.0 nor true), lists item by item."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_every_key_is_documented_and_no_other():
    doc, code = set(documented()), set(code_keys())
    missing, extra = sorted(code - doc), sorted(doc - code)
    assert not missing and not extra, (
        f"{DOC.name} is out of sync with fedlada.config / fedlada_app.settings: "
        f"missing keys (in the code, not documented): {missing or 'none'}; "
        f"extra keys (documented, not in the code): {extra or 'none'}")


def test_documented_defaults_are_the_code_defaults():
    code = code_keys()
    wrong, unparsable = [], []
    for key, (no, text) in documented().items():
        if key not in code:
            continue  # reported by the test above
        try:
            got = tomllib.loads(f"x = {text}")["x"]
        except tomllib.TOMLDecodeError as e:
            unparsable.append(f"{key} (line {no}: `{text}`: {e})")
            continue
        want = _plain(code[key])
        if want is _MISSING:
            wrong.append(f"{key} (line {no}): the code has no default for it")
        elif not _same(got, want):
            wrong.append(f"{key} (line {no}): documented `{text}` = {got!r}, the code has {want!r}")
    assert not unparsable and not wrong, (
        f"{DOC.name}: defaults that are not valid TOML: {unparsable or 'none'}; "
        f"defaults that differ from the code: {wrong or 'none'}")


def test_the_default_slm_specs_are_stated():
    """The models.slms section's table of the three default SLM specs (``slot | hidden_size | ...``) is the code's
    ``_default_slms()``, and names every key where they differ from ``ModelSpec()``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    at = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|") and _cells(line)[0] == "slot"), None)
    assert at is not None, f"{DOC.name}: no table of the default SLM specs (header 'slot | hidden_size | ...')"
    header = _cells(lines[at])
    names = {f.name for f in dataclasses.fields(ModelSpec)}
    assert set(header[1:]) <= names, f"{DOC.name}:{at + 1}: columns that are not ModelSpec keys: {header[1:]}"
    rows = {}
    for line in lines[at + 2:]:
        if not line.lstrip().startswith("|"):
            break
        cells = _cells(line)
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    specs, base = _default_slms(), ModelSpec()
    assert sorted(rows) == [str(i) for i in range(len(specs))], (
        f"{DOC.name}: the default SLM table lists slots {sorted(rows)}, the code has {len(specs)} default specs")
    problems = []
    for i, spec in enumerate(specs):
        differs = {f.name for f in dataclasses.fields(ModelSpec) if getattr(spec, f.name) != getattr(base, f.name)}
        problems += [f"slot {i}: {name} differs from ModelSpec() but has no column" for name in differs - set(header)]
        for name, cell in rows[str(i)].items():
            got = tomllib.loads(f"x = {cell.strip('`')}")["x"]
            if not _same(got, _plain(getattr(spec, name))):
                problems.append(f"slot {i}: {name} documented {cell}, the code has {getattr(spec, name)!r}")
    assert not problems, f"{DOC.name}: default SLM specs: " + "; ".join(problems)
