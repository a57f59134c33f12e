"""docs/run-folder.md documents what a run folder holds: every file, every event type, every field.

A tiny in-process run (two rounds, a gold path mixed into the sampled paths so that both directions' filters select,
fit and score) writes a run folder and its report. Every event type and every field name of its ``metrics.jsonl``,
``selections.jsonl``, ``audit.jsonl``, ``predictions.jsonl`` and ``summary.json`` must be documented, and every file
name of the folder must appear in the doc in backticks. The check only goes one way: the doc also documents fields a
tiny LaDa run does not write (hosts, plug-in rules, Flower).

How the doc is read. A heading (``##`` to ``######``) names the sections its backticked names give
(``### `eval` `` is the section ``eval``; ``#### `filter` and `filter_client{k}` `` is two); each row of a table
under it documents the backticked names of its first cell. A heading without backticks ends the sections (its tables
document nothing). Client numbers are written ``{k}`` (``filter_client0`` is ``filter_client{k}``). A field is
documented when a row names it in its section:

- a ``metrics.jsonl`` line of event E: the section ``E``, or ``metrics.jsonl`` (the fields of every line);
- the keys of the fixed-key dicts of a ``metrics.jsonl`` line: ``filter``, ``filter_client{k}``, ``filter_fit``,
  ``server_filter_fit_client{k}``; of the ``setup`` line's ``models`` entries, ``clients`` items and ``data``: the
  section of that name;
- a line of ``selections.jsonl``, ``audit.jsonl``, ``predictions.jsonl``, or ``summary.json``: the file's section.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY
from conftest import markdown_cells as _cells

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "run-folder.md"
COMMON = "metrics.jsonl"  # the section of the fields every metrics.jsonl line has
FIXED_KEYS = ("filter", "filter_client{k}", "filter_fit", "server_filter_fit_client{k}")
LOGS = ("selections.jsonl", "audit.jsonl", "predictions.jsonl")

_HEADING = re.compile(r"^#{2,6}\s+(.*)$")
_NAMES = re.compile(r"`([^`]+)`")

Observed = dict[tuple[str, ...], set[str]]  # (the field's section, other sections that may document it) -> names


# ------------------------------------------------------------------------------------------------ the doc


def _rows(lines: list[str]) -> Iterator[tuple[int, list[str], list[str]]]:
    """(line index, sections of the heading above, backticked names of the first cell) of every table row outside
    code blocks."""
    sections: list[str] = []
    code = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            code = not code
            continue
        if code:
            continue
        heading = _HEADING.match(line)
        if heading:
            sections = _NAMES.findall(heading.group(1))
        elif line.lstrip().startswith("|"):
            yield i, sections, _NAMES.findall(_cells(line)[0])


def documented(text: str) -> dict[str, set[str]]:
    """Section -> the names its table rows document."""
    out: dict[str, set[str]] = defaultdict(set)
    for _, sections, names in _rows(text.splitlines()):
        for s in sections:
            out[s] |= set(names)
    return dict(out)


def _prose(text: str) -> Iterator[str]:
    """The lines of ``text`` outside code blocks."""
    code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            code = not code
        elif not code:
            yield line


def headings(text: str) -> set[str]:
    """Every section a heading names (with or without a table under it)."""
    return {name for line in _prose(text) if (m := _HEADING.match(line)) for name in _NAMES.findall(m.group(1))}


def undocumented(text: str, observed: Observed) -> list[str]:
    """What ``observed`` has that the doc ``text`` does not document: "`section`: `field`" per missing field, and
    "`section`: no heading names it" per missing section."""
    doc, named = documented(text), headings(text)
    problems = []
    for where, fields in sorted(observed.items()):
        home = where[0]
        if home not in named:
            problems.append(f"`{home}`: no heading names it (its fields: {', '.join(sorted(fields))})")
            continue
        known = set().union(*(doc.get(s, set()) for s in where))
        problems += [f"`{home}`: `{f}`" for f in sorted(fields - known)]
    return problems


def without_rows(text: str, where: tuple[str, ...], field: str) -> str:
    """``text`` without the table rows that document ``field`` in any section of ``where``."""
    lines = text.splitlines()
    drop = {i for i, sections, names in _rows(lines) if field in names and set(sections) & set(where)}
    return "\n".join(line for i, line in enumerate(lines) if i not in drop) + "\n"


# ----------------------------------------------------------------------------------------------- the run


def _generic(name: str) -> str:
    return re.sub(r"client\d+", "client{k}", name)


def observed(run: Path) -> Observed:
    """Every field name the run folder's JSONL files and summary.json hold, by where the doc must document it."""
    from fedlada.report import read_jsonl

    out: Observed = defaultdict(set)
    for row in read_jsonl(run / "metrics.jsonl"):
        out[(row["event"], COMMON)] |= {_generic(k) for k in row}
        for key, value in row.items():
            if _generic(key) in FIXED_KEYS and isinstance(value, dict):
                out[(_generic(key),)] |= set(value)
        if row["event"] == "setup":
            for info in row["models"].values():
                out[("models",)] |= set(info)
            for item in row["clients"]:
                out[("clients",)] |= set(item or {})
            out[("data",)] |= set(row["data"])
    for name in LOGS:
        for row in read_jsonl(run / name):
            out[(name,)] |= set(row)
    out[("summary.json",)] |= set(json.loads((run / "summary.json").read_text(encoding="utf-8")))
    return dict(out)


def folder_names(run: Path) -> set[str]:
    """Every file and folder name in the run folder, round folders as ``round_NNN`` and client numbers as ``K``."""
    names = set()
    for p in run.rglob("*"):
        for part in p.relative_to(run).parts:
            names.add(re.sub(r"client_\d+", "client_K", re.sub(r"^round_\d+$", "round_NNN", part)))
    return names


@pytest.fixture(scope="module")
def run_folder(model_cache, tmp_path_factory) -> Path:
    """A finished tiny run (2 rounds, 2 clients) and its report. The LLM's and each SLM's first sampled path of every
    public question is its gold path, so every candidate has a correct path both ways: both filters select, fit
    (round 1) and score (round 2), and every field of a LaDa round is written."""
    from fedlada import reasoning, rounds
    from fedlada.config import load_config
    from fedlada.prepare import load_data
    from fedlada.report import write_report
    from fedlada.runner import run

    # one torch thread: a few seconds even on a busy machine (the tiny models are pretrained for this count)
    cfg = load_config(overrides=TINY + ["threads=1", f"out_dir={tmp_path_factory.mktemp('run-folder') / 'run'}"])
    gold = {reasoning.format_prompt(r.question): reasoning.format_path(r.rationale, r.answer)
            for r in load_data(cfg).public}
    real = rounds.sample_paths

    def sampler(model, tokenizer, prompts, *, num_paths, **kw):
        out = real(model, tokenizer, prompts, num_paths=num_paths, **kw)
        for p, paths in zip(prompts, out):
            if p in gold and num_paths > 1:  # sampling for an exchange, not a greedy evaluation
                paths[0] = gold[p] + "\n"
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rounds, "sample_paths", sampler)
        result = run(cfg)
    write_report(result.run_dir)
    return result.run_dir


# --------------------------------------------------------------------------------------------------- tests


def test_every_event_and_field_of_a_run_is_documented(run_folder):
    seen = observed(run_folder)
    # the run exercised what it is meant to: both directions selected, and LaDa's filters were fitted
    assert {("filter",), ("filter_client{k}",), ("filter_fit",), ("server_filter_fit_client{k}",)} <= set(seen)
    assert {"learnability_gap", "novelty_gap", "exploit"} <= seen[("selections.jsonl",)]
    problems = undocumented(DOC.read_text(encoding="utf-8"), seen)
    assert not problems, (f"{DOC.name} does not document what a run writes (section: field): "
                          + "; ".join(problems))


def test_every_file_of_a_run_is_documented(run_folder):
    text = DOC.read_text(encoding="utf-8")
    spans = {part for line in _prose(text) for span in _NAMES.findall(line) for part in span.split("/") if part}
    names = folder_names(run_folder)
    assert {"report.html", "gaps.png", "client_K_filter.pt", "COMPLETE", ".lock"} <= names
    missing = sorted(names - spans)
    assert not missing, f"{DOC.name} does not name these files or folders of a run folder: {missing}"


def test_every_event_the_code_writes_has_a_section():
    """Events no tiny in-process run writes (``eval_failed``, Flower's ``client_failed`` reasons) too."""
    events = set()
    for f in [*ROOT.glob("fedlada/**/*.py"), *ROOT.glob("fedlada_app/*.py")]:
        events |= set(re.findall(r'"event":\s*"([a-z_]+)"', f.read_text(encoding="utf-8")))
    assert {"setup", "eval", "eval_failed", "client_step", "client_failed", "round_time"} <= events
    missing = sorted(events - headings(DOC.read_text(encoding="utf-8")))
    assert not missing, f"{DOC.name} has no section for these metrics.jsonl events: {missing}"


def test_the_check_fails_for_any_field_taken_out_of_the_doc(run_folder):
    """The checker is not vacuous: a copy of the doc without the row of any one field the run wrote fails it (naming
    that field), and so does one without an event's heading."""
    text = DOC.read_text(encoding="utf-8")
    seen = observed(run_folder)
    assert not undocumented(text, seen)
    unnoticed = []
    for where, fields in sorted(seen.items()):
        for field in sorted(fields):
            cut = without_rows(text, where, field)
            assert cut != text, f"no row documents `{field}` in {where}"
            if f"`{where[0]}`: `{field}`" not in undocumented(cut, seen):
                unnoticed.append(f"{where[0]}: {field}")
    assert not unnoticed, f"rows taken out of {DOC.name} without the check noticing: {unnoticed}"
    renamed = text.replace("### `eval`\n", "### evaluation\n")
    assert renamed != text
    assert any(p.startswith("`eval`: no heading names it") for p in undocumented(renamed, seen))
