"""The built-in benchmark: seeded multi-step arithmetic word problems with rationales, in domains with local rules.

The paper evaluates on real reasoning corpora (probably MathInstruct and CoT-Collection) with 1.5B-70B models; this
generator gives a setting that tiny models (0.2M-5M parameters, minutes of CPU training) can learn, while keeping what
LaDa is about: each client's private domain has a rule (``fedlada.data.domains``) that only its data teaches, so
knowledge has to travel between models for the others to answer that domain's questions.

A problem is a chain of ``steps`` equations on one running count (operations +, -, *, /), told as a short story;
its rationale has one equation per line (``3 * 6 = 18``), preceded by the rule's statement (``A tray holds 6
rolls.``) where the rule is first used, and the answer is the last result. Every problem uses its container unit
at least once (a 1-step problem is the unit conversion itself). Numbers stay small: factors and divisors 2..9,
amounts added 2..``ADD_MAX``, every intermediate and final result in 1..``max_value``; no negatives, no remainders.

Layout (``make_benchmark``): client k holds domain ``domains[k % len(domains)]`` (train + test); the public pool
spans every listed domain in equal shares, a domain that no client holds included; the general corpus uses the same
operations with generic containers of stated size and never a domain unit. Step counts are balanced over
``min_steps..max_steps`` within each split. Questions are unique across all files as far as a domain allows (a
repeat is redrawn, up to ``_MAX_REDRAWS`` times), so no test question is in any train file or in the public pool;
sizes beyond what a domain can draw (tens of thousands of short problems) keep the repeats, counted in one warning
per domain. Same seed, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedlada.data.domains import DEFAULT_NUM_DOMAINS, DOMAINS, GENERAL, Domain
from fedlada.data.records import Record
from fedlada.data.validate import MANIFEST_NAME, write_records
from fedlada.errors import ConfigError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
ADD_MAX = 20  # largest amount added or subtracted in one "add"/"sub" step
START_MAX = 20  # largest plain starting amount
MIN_MAX_VALUE = 40  # below this a unit step (2+ containers of up to 9) may not fit
_MAX_REDRAWS = 50

STEPS_IN_ID_RE = re.compile(r"-s(\d+)-")
EQUATION_RE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


@dataclass(frozen=True)
class ClientFiles:
    domain: str
    train: Path
    test: Path


@dataclass(frozen=True)
class BenchmarkLayout:
    """Where ``make_benchmark`` wrote its files."""

    out_dir: Path
    clients: tuple[ClientFiles, ...]
    public: Path
    general: Path | None  # None when made with general_size=0
    manifest: Path

    @classmethod
    def from_dir(cls, out_dir: str | os.PathLike) -> "BenchmarkLayout":
        """The layout recorded in ``out_dir/manifest.json``."""
        out_dir = Path(out_dir)
        manifest = out_dir / MANIFEST_NAME
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
            clients = tuple(ClientFiles(c["domain"], out_dir / c["train"], out_dir / c["test"])
                            for c in info["clients"])
            general = out_dir / info["general"] if info["general"] else None
            return cls(out_dir, clients, out_dir / info["public"], general, manifest)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{manifest}: not a benchmark manifest ({err})") from err


def steps_of(record: Record) -> int:
    """The number of reasoning steps: from ``-s{steps}-`` in the id, else the count of equation lines."""
    match = STEPS_IN_ID_RE.search(record.id)
    if match:
        return int(match.group(1))
    count = sum(1 for line in (record.rationale or "").splitlines() if EQUATION_RE.match(line.strip()))
    if count == 0:
        raise ValueError(f"record {record.id!r}: no '-s<steps>-' in its id and no equation lines in its rationale")
    return count


def _op_options(value: int, remaining: int, size: int, max_value: int, need_unit: bool) -> list[str]:
    """Operations that keep every result in 1..max_value and use the remaining step budget exactly."""
    unit_ops = []
    if remaining >= 2:
        if value + 2 * size <= max_value:
            unit_ops.append("add_units")
        if value - 2 * size >= 1:
            unit_ops.append("sub_units")
    if need_unit and remaining == 2:
        return unit_ops
    ops = []
    if value + 2 <= max_value:
        ops.append("add")
    if value >= 3:
        ops.append("sub")
    if 2 <= value <= 9 and 2 * value <= max_value:
        ops.append("mul")
    if any(value % d == 0 for d in range(2, 10) if d < value):
        ops.append("div")
    return ops + unit_ops


def _problem(rng: random.Random, domain: Domain, steps: int, max_value: int) -> tuple[str, list[str], int] | None:
    """(question, rationale lines, answer) with exactly ``steps`` equations, or None if the draw got stuck."""
    name, item = rng.choice(domain.names), rng.choice(domain.items)
    rule = domain.rule
    templates = domain.templates
    sentences: list[str] = []
    lines: list[str] = []
    stated = False

    def container() -> tuple[int, str]:
        if rule is not None:
            return rule.size, rule.units
        return rng.randint(2, 9), rng.choice(domain.containers)

    def unit_count(size: int, units: str, n: int, template: str) -> int:
        nonlocal stated
        if rule is not None and not stated:
            lines.append(rule.state(item))
            stated = True
        sentences.append(rng.choice(templates[template]).format(name=name, item=item, n=n, units=units, s=size))
        lines.append(f"{n} * {size} = {n * size}")
        return n * size

    remaining = steps
    size, units = container()
    if steps == 1 or rng.random() < 0.5:
        value = unit_count(size, units, rng.randint(2, min(9, max_value // size)), "start_units")
        remaining -= 1
        need_unit = False
    else:
        value = rng.randint(2, min(START_MAX, max_value))
        sentences.append(rng.choice(templates["start"]).format(name=name, item=item, a=value))
        need_unit = True
    while remaining > 0:
        size, units = container()
        ops = _op_options(value, remaining, size, max_value, need_unit)
        if not ops:
            return None
        op = rng.choice(ops)
        if op in ("add_units", "sub_units"):
            room = (max_value - value) // size if op == "add_units" else (value - 1) // size
            part = unit_count(size, units, rng.randint(2, min(9, room)), op)
            new = value + part if op == "add_units" else value - part
            lines.append(f"{value} {'+' if op == 'add_units' else '-'} {part} = {new}")
            remaining -= 2
            need_unit = False
        else:
            if op == "add":
                x = rng.randint(2, min(ADD_MAX, max_value - value))
                new, sign, key = value + x, "+", "a"
            elif op == "sub":
                x = rng.randint(2, min(ADD_MAX, value - 1))
                new, sign, key = value - x, "-", "a"
            elif op == "mul":
                x = rng.randint(2, min(9, max_value // value))
                new, sign, key = value * x, "*", "m"
            else:
                x = rng.choice([d for d in range(2, 10) if d < value and value % d == 0])
                new, sign, key = value // x, "/", "d"
            sentences.append(rng.choice(templates[op]).format(name=name, item=item, **{key: x}))
            lines.append(f"{value} {sign} {x} = {new}")
            remaining -= 1
        value = new
    sentences.append(rng.choice(templates["ask"]).format(name=name, item=item))
    return " ".join(sentences), lines, value


def _generate(rng: random.Random, domain: Domain, steps_list: list[int], max_value: int,
              seen: set[str], repeats: dict[str, int] | None = None) -> list[tuple[int, str, str, str]]:
    """(steps, question, rationale, answer) for each entry of ``steps_list``, questions unique within ``seen`` as
    far as the domain allows: a question still repeated after ``_MAX_REDRAWS`` redraws is kept and counted in
    ``repeats[domain name]`` (said once per domain by ``make_benchmark``)."""
    out = []
    for steps in steps_list:
        for attempt in range(_MAX_REDRAWS + 1):
            drawn = _problem(rng, domain, steps, max_value)
            if drawn is not None and (drawn[0] not in seen or attempt == _MAX_REDRAWS):
                break
        if drawn is None:
            raise ConfigError(f"cannot draw a {steps}-step {domain.name} problem with max_value={max_value}")
        question, lines, answer = drawn
        if question in seen:
            if repeats is None:
                logger.warning("%s: repeated question after %d redraws: %s", domain.name, _MAX_REDRAWS, question)
            else:
                repeats[domain.name] = repeats.get(domain.name, 0) + 1
        seen.add(question)
        out.append((steps, question, "\n".join(lines), str(answer)))
    return out


def _balanced_steps(rng: random.Random, count: int, min_steps: int, max_steps: int) -> list[int]:
    levels = max_steps - min_steps + 1
    steps = [min_steps + i % levels for i in range(count)]
    rng.shuffle(steps)
    return steps


def _rng(seed: int, part: str) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across processes and PYTHONHASHSEED.
    return random.Random(f"fedlada-benchmark/{seed}/{part}")


def _check(num_clients, sizes: dict[str, int], min_steps, max_steps, max_value, domains) -> list[str]:
    if domains is None:
        domains = list(DOMAINS)[: max(DEFAULT_NUM_DOMAINS, num_clients)]
    domains = list(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains or len(set(domains)) != len(domains):
        raise ConfigError(f"domains: expected distinct names from {sorted(DOMAINS)}, got {domains}")
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients: expected an integer >= 1, got {num_clients!r}")
    for key, value in sizes.items():
        least = 0 if key == "general_size" else 1  # no general corpus is fine; an empty split is not
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{key}: expected an integer >= {least}, got {value!r}")
    if not (isinstance(min_steps, int) and isinstance(max_steps, int) and 1 <= min_steps <= max_steps):
        raise ConfigError(f"min_steps/max_steps: expected 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if not isinstance(max_value, int) or max_value < MIN_MAX_VALUE:
        raise ConfigError(f"max_value: expected an integer >= {MIN_MAX_VALUE}, got {max_value!r}")
    return domains


def _records(rows, domain: str, prefix: str, width: int = 5) -> list[Record]:
    return [Record(f"{prefix}-s{steps}-{i:0{width}d}", q, a, r, domain) for i, (steps, q, r, a, *_) in enumerate(rows)]


def _previous_files(out_dir: Path) -> set[str]:
    """The files an earlier ``make_benchmark`` recorded in ``out_dir``'s manifest (none if there is no manifest)."""
    try:
        info = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        return {rel for rel in info.get("files", {}) if not Path(rel).is_absolute() and ".." not in Path(rel).parts}
    except (OSError, ValueError, AttributeError):
        return set()


_WORK_RE = re.compile(r"^\.work-\d+$")


def warn_shared_domains(num_clients: int, domains: list[str] | None = None) -> None:
    """Say which clients share a domain (more clients than domains: ``domains[k % len(domains)]``)."""
    domains = list(domains or list(DOMAINS)[: max(DEFAULT_NUM_DOMAINS, num_clients)])
    if num_clients > len(domains):
        shared = ", ".join(f"client {k} = client {k % len(domains)} ({domains[k % len(domains)]})"
                           for k in range(len(domains), num_clients))
        logger.warning("the built-in benchmark has %d domains for %d clients, so clients share domains (%s), each "
                       "with its own questions", len(domains), num_clients, shared)


def make_benchmark(out_dir: str | os.PathLike, *, seed: int = 0, num_clients: int = 3, train_per_client: int = 1000,
                   test_per_client: int = 500, public_size: int = 1000, general_size: int = 20000,
                   min_steps: int = 1, max_steps: int = 6, max_value: int = 99,
                   domains: list[str] | None = None) -> BenchmarkLayout:
    """Write the benchmark into ``out_dir`` and return its layout (see the module docstring).

    domains: the domains in play, in client order; None means the first ``max(4, num_clients)`` of ``DOMAINS``.
    Client k holds ``domains[k % len(domains)]``; clients beyond ``len(domains)`` repeat a domain with fresh
    questions. Files: ``client_{k}/train.jsonl``, ``client_{k}/test.jsonl``, ``public.jsonl``, ``general.jsonl``
    (none when ``general_size`` is 0), ``manifest.json`` (seed, sizes, domains, rules, files with sha256, generator
    version). Bad arguments raise ConfigError.
    """
    sizes = {"train_per_client": train_per_client, "test_per_client": test_per_client,
             "public_size": public_size, "general_size": general_size}
    domains = _check(num_clients, sizes, min_steps, max_steps, max_value, domains)
    out_dir = Path(out_dir)
    if out_dir.is_dir():  # what an interrupted earlier run of this function left: its work folder
        for p in out_dir.iterdir():
            if _WORK_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
    if out_dir.exists() and (not out_dir.is_dir() or (not (out_dir / MANIFEST_NAME).is_file()
                                                      and any(out_dir.iterdir()))):
        raise ConfigError(f"{out_dir}: not an empty folder nor an earlier benchmark folder (no {MANIFEST_NAME}); "
                          "nothing was written: choose a new or empty folder")
    warn_shared_domains(num_clients, domains)
    seen: set[str] = set()
    repeats: dict[str, int] = {}
    files: dict[str, list[Record]] = {}
    clients = []
    for k in range(num_clients):
        domain = domains[k % len(domains)]
        for split, count in (("test", test_per_client), ("train", train_per_client)):
            rng = _rng(seed, f"client-{k}-{split}")
            rows = _generate(rng, DOMAINS[domain], _balanced_steps(rng, count, min_steps, max_steps), max_value, seen,
                             repeats)
            files[f"client_{k}/{split}.jsonl"] = _records(rows, domain, f"c{k}-{split}-{domain}")
        clients.append({"client": k, "domain": domain,
                        "train": f"client_{k}/train.jsonl", "test": f"client_{k}/test.jsonl"})
    rng = _rng(seed, "public")
    public = []
    for j, domain in enumerate(domains):
        share = public_size // len(domains) + (1 if j < public_size % len(domains) else 0)
        steps = _balanced_steps(rng, share, min_steps, max_steps)
        public += [(*row, domain) for row in _generate(rng, DOMAINS[domain], steps, max_value, seen, repeats)]
    rng.shuffle(public)
    files["public.jsonl"] = [Record(f"public-{d}-s{s}-{i:05d}", q, a, r, d) for i, (s, q, r, a, d) in enumerate(public)]
    if general_size:
        rng = _rng(seed, "general")
        rows = _generate(rng, GENERAL, _balanced_steps(rng, general_size, min_steps, max_steps), max_value, seen,
                         repeats)
        files["general.jsonl"] = _records(rows, GENERAL.name, "general", width=6)

    for name, n in repeats.items():
        logger.warning("the built-in benchmark's %s domain has too few distinct questions for these sizes: %d of its "
                       "questions repeat an earlier one (after %d redraws each), so some test questions also sit in a "
                       "train file or the public pool (a run warns per client); use smaller sizes, or a larger "
                       "data.max_value or data.max_steps", name, n, _MAX_REDRAWS)
    stale = _previous_files(out_dir) - set(files)
    # the files are written into a work folder inside out_dir (the same file system, whatever is mounted where)
    # and moved into place at the end, so an interrupted run leaves out_dir as it was (empty, or the earlier
    # benchmark) apart from that work folder, which the next run removes: the same command can run again
    work = out_dir / f".work-{os.getpid()}"
    entries = {}
    try:
        for rel, records in files.items():
            path = write_records(records, work / rel)
            data = path.read_bytes()
            entries[rel] = {"records": len(records), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for rel in files:
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(work / rel, out_dir / rel)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = {
        "generator": "fedlada.data.benchmark", "generator_version": GENERATOR_VERSION, "seed": seed,
        "num_clients": num_clients, "sizes": sizes, "min_steps": min_steps, "max_steps": max_steps,
        "max_value": max_value, "domains": domains, "clients": clients,
        "public": "public.jsonl", "general": "general.jsonl" if general_size else None,
        "rules": {d: DOMAINS[d].rule.to_json() for d in domains}, "files": entries,
    }
    manifest_path = out_dir / MANIFEST_NAME
    tmp = manifest_path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    for rel in sorted(stale):  # files of an earlier, larger benchmark in the same directory
        (out_dir / rel).unlink(missing_ok=True)
        try:
            (out_dir / rel).parent.rmdir()
        except OSError:
            pass  # not empty, or out_dir itself
    logger.info("benchmark written to %s: %d clients, %d files", out_dir, num_clients, len(entries))
    return BenchmarkLayout.from_dir(out_dir)
