"""The built-in benchmark: layout and sizes, determinism, validity under the data contract, correct arithmetic in
every rationale, domain rules that only their own domain teaches, and a general corpus free of them."""

import collections
import hashlib
import json
import random
import re

import pytest

from fedlada.data import DOMAINS, BenchmarkLayout, make_benchmark, read_records, steps_of, validate_files
from fedlada.data.benchmark import EQUATION_RE
from fedlada.data.domains import GENERAL
from fedlada.errors import ConfigError

SMALL = dict(train_per_client=60, test_per_client=30, public_size=50, general_size=240)
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.fixture(scope="module")
def default_layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return make_benchmark(out), None


def _all(layout):
    files = {"public": layout.public, "general": layout.general}
    for k, client in enumerate(layout.clients):
        files[f"c{k}-train"], files[f"c{k}-test"] = client.train, client.test
    return {name: read_records(path) for name, path in files.items()}


def _unit_words():
    return {word for d in DOMAINS.values() for word in (d.rule.unit, d.rule.units)}


def test_default_layout_sizes_and_domains(default_layout):
    layout, _ = default_layout
    records = _all(layout)
    assert [c.domain for c in layout.clients] == ["bakery", "farm", "library"]
    for k, client in enumerate(layout.clients):
        assert len(records[f"c{k}-train"]) == 1000 and len(records[f"c{k}-test"]) == 500
        assert {r.domain for r in records[f"c{k}-train"] + records[f"c{k}-test"]} == {client.domain}
        assert client.train == layout.out_dir / f"client_{k}" / "train.jsonl"
    assert len(records["public"]) == 1000 and len(records["general"]) == 20000
    # the public pool spans all four default domains in equal shares, one of them held by no client
    assert collections.Counter(r.domain for r in records["public"]) == {
        "bakery": 250, "farm": 250, "library": 250, "workshop": 250}
    assert {r.domain for r in records["general"]} == {"general"}


def test_manifest_describes_the_files(default_layout):
    layout, _ = default_layout
    manifest = json.loads(layout.manifest.read_text())
    assert manifest["seed"] == 0 and manifest["generator_version"]
    assert manifest["sizes"] == {"train_per_client": 1000, "test_per_client": 500, "public_size": 1000,
                                 "general_size": 20000}
    assert manifest["domains"] == ["bakery", "farm", "library", "workshop"]
    assert manifest["rules"]["bakery"]["unit"] == "tray" and manifest["rules"]["bakery"]["size"] == 6
    assert len(manifest["files"]) == 3 * 2 + 2
    for rel, entry in manifest["files"].items():
        data = (layout.out_dir / rel).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        assert entry["records"] == data.count(b"\n")
    assert BenchmarkLayout.from_dir(layout.out_dir) == layout


def test_every_file_is_valid_and_ids_are_unique_across_files(default_layout):
    layout, _ = default_layout
    assert validate_files(layout.out_dir) == []
    ids = [r.id for rs in _all(layout).values() for r in rs]
    questions = [r.question for rs in _all(layout).values() for r in rs]
    assert len(set(ids)) == len(ids)
    assert len(set(questions)) == len(questions)  # in particular no test question is in a train file or D_p


def test_rationales_are_correct_arithmetic_ending_in_the_answer(default_layout):
    layout, _ = default_layout
    for name, records in _all(layout).items():
        for r in records:
            results = []
            for line in r.rationale.splitlines():
                match = EQUATION_RE.match(line)
                if match is None:
                    assert r.domain != "general" and line.startswith("A "), (r.id, line)
                    continue
                a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
                assert OPS[op](a, b) == result, (r.id, line)
                if op == "*":
                    assert 1 <= a <= 9 and 1 <= b <= 9, (r.id, line)
                assert 0 <= a <= 99 and 0 <= result <= 99, (r.id, line)
                results.append(result)
            assert r.answer == str(results[-1]), r.id
            assert steps_of(r) == len(results) and f"-s{len(results)}-" in r.id


def test_steps_are_balanced_over_one_to_six(default_layout):
    layout, _ = default_layout
    for name, records in _all(layout).items():
        counts = collections.Counter(steps_of(r) for r in records)
        assert sorted(counts) == [1, 2, 3, 4, 5, 6], name
        if name != "public":  # the public pool is balanced within each domain's share
            assert max(counts.values()) - min(counts.values()) <= 1, (name, counts)


def test_each_domain_teaches_its_own_rule_only(default_layout):
    layout, _ = default_layout
    records = [r for rs in _all(layout).values() for r in rs if r.domain != "general"]
    for r in records:
        rule = DOMAINS[r.domain].rule
        statement = [line for line in r.rationale.splitlines() if not EQUATION_RE.match(line)]
        assert len(statement) == 1 and re.fullmatch(rf"A {rule.unit} holds {rule.size} \w+\.", statement[0]), r.id
        assert re.search(rf"\b{rule.units}\b", r.question), r.id  # the unit is used ...
        assert f"holds {rule.size}" not in r.question  # ... and its size never stated
        assert f"{rule.units} of {rule.size} " not in r.question
        lines = r.rationale.splitlines()
        nxt = lines[lines.index(statement[0]) + 1]
        assert re.fullmatch(rf"\d \* {rule.size} = \d+", nxt), (r.id, nxt)  # the rule is used right after it
        others = _unit_words() - {rule.unit, rule.units}
        assert not any(re.search(rf"\b{w}\b", r.question + r.rationale) for w in others), r.id


def test_general_corpus_never_uses_a_domain_unit_or_rule(default_layout):
    layout, _ = default_layout
    text = layout.general.read_text()
    found = re.findall(rf"\b(?:{'|'.join(sorted(_unit_words()))})\b", text, re.IGNORECASE)
    assert found == [] and len(_unit_words()) == 2 * len(DOMAINS)
    assert " holds " not in text
    general = read_records(layout.general)
    explicit = [r for r in general if re.search(r"\b(?:of|with) \d \w+", r.question)]
    assert len(explicit) > len(general) // 2  # containers come with their size stated
    assert all(c in GENERAL.containers for r in general for c in re.findall(r"\d (\w+) (?:of|with) \d", r.question))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    state = random.getstate()
    a = make_benchmark(tmp_path / "a", seed=7, **SMALL)
    b = make_benchmark(tmp_path / "b", seed=7, **SMALL)
    c = make_benchmark(tmp_path / "c", seed=8, **SMALL)
    assert random.getstate() == state  # the global random generator is never touched
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 9
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert a.public.read_bytes() != c.public.read_bytes()
    assert a.clients[0].train.read_bytes() != c.clients[0].train.read_bytes()
    assert [len(read_records(p.train)) for p in b.clients] == [60, 60, 60]


def test_more_clients_than_domains_wrap_around_with_fresh_questions(tmp_path, caplog):
    layout = make_benchmark(tmp_path, num_clients=5, domains=["farm", "garden"], **SMALL)
    assert [c.domain for c in layout.clients] == ["farm", "garden", "farm", "garden", "farm"]
    assert "clients share domains (client 2 = client 0 (farm), client 3 = client 1 (garden)" in caplog.text
    first = {r.question for r in read_records(layout.clients[0].train)}
    third = {r.question for r in read_records(layout.clients[2].train)}
    assert first.isdisjoint(third)
    assert collections.Counter(r.domain for r in read_records(layout.public)) == {"farm": 25, "garden": 25}


def test_default_domains_grow_with_the_number_of_clients(tmp_path):
    layout = make_benchmark(tmp_path, num_clients=6, **SMALL)
    assert [c.domain for c in layout.clients] == list(DOMAINS)
    assert {r.domain for r in read_records(layout.public)} == set(DOMAINS)


def test_step_range_and_max_value_are_configurable(tmp_path):
    layout = make_benchmark(tmp_path, min_steps=2, max_steps=8, max_value=50, **SMALL)
    for r in read_records(layout.general) + read_records(layout.clients[1].test):
        assert 2 <= steps_of(r) <= 8
        assert all(int(n) <= 50 for n in re.findall(r"\d+", r.rationale))


@pytest.mark.parametrize("kwargs, key", [
    (dict(min_steps=3, max_steps=2), "min_steps"),
    (dict(min_steps=0), "min_steps"),
    (dict(max_value=20), "max_value"),
    (dict(domains=["bakery", "moon"]), "domains"),
    (dict(domains=["farm", "farm"]), "domains"),
    (dict(num_clients=0), "num_clients"),
    (dict(general_size=-1), "general_size"),
])
def test_bad_arguments_are_config_errors(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        make_benchmark(tmp_path, **{**SMALL, **kwargs})
    assert not any(tmp_path.iterdir())  # nothing written


def test_steps_of_falls_back_to_counting_equations():
    from fedlada.data import Record

    assert steps_of(Record("c0-train-farm-s4-00001", "q", "1")) == 4
    assert steps_of(Record("x", "q", "9", "A crate holds 8 eggs.\n1 * 8 = 8\n8 + 1 = 9")) == 2
    with pytest.raises(ValueError, match="no '-s<steps>-'"):
        steps_of(Record("x", "q", "9", "nine"))


def test_no_general_corpus_and_a_smaller_remake_leave_no_stale_files(tmp_path):
    make_benchmark(tmp_path, num_clients=4, **SMALL)
    assert (tmp_path / "client_3" / "train.jsonl").is_file() and (tmp_path / "general.jsonl").is_file()
    layout = make_benchmark(tmp_path, num_clients=2, **{**SMALL, "general_size": 0})
    assert layout.general is None and len(layout.clients) == 2
    assert not (tmp_path / "general.jsonl").exists() and not (tmp_path / "client_3").exists()
    assert validate_files(tmp_path) == []  # what is left is exactly the new benchmark
    assert BenchmarkLayout.from_dir(tmp_path).general is None


def test_a_folder_holding_other_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "public.jsonl").write_text("mine\n")
    with pytest.raises(ConfigError, match="not an empty folder nor an earlier benchmark folder"):
        make_benchmark(tmp_path, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["public.jsonl"]
    assert (tmp_path / "public.jsonl").read_text() == "mine\n"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="afile"):
        make_benchmark(afile, **SMALL)
    assert afile.read_text() == "x"


def test_an_interrupted_make_leaves_the_folder_as_it_was_and_can_be_run_again(tmp_path, monkeypatch):
    from fedlada.data import benchmark

    out = tmp_path / "bench"
    real, calls = benchmark.write_records, []

    def interrupted(records, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(records, path)

    monkeypatch.setattr(benchmark, "write_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_benchmark(out, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["bench"]  # nothing next to it
    assert [p.name for p in out.iterdir()] == []  # nothing half-written, no work folder
    monkeypatch.setattr(benchmark, "write_records", real)
    assert validate_files(make_benchmark(out, **SMALL).out_dir) == []


def test_sizes_beyond_what_a_domain_can_draw_are_one_warning_per_domain(tmp_path, caplog):
    """One-step questions of small values run out: the repeats are kept, counted and said once per domain (it was
    one warning per repeated record, tens of thousands of lines at scale), and the files stay reproducible."""
    import logging

    from fedlada.data.benchmark import MIN_MAX_VALUE

    kw = dict(num_clients=1, train_per_client=4000, test_per_client=50, public_size=50, general_size=0, max_steps=1,
              max_value=MIN_MAX_VALUE)
    with caplog.at_level(logging.WARNING, logger="fedlada.data.benchmark"):
        layout = make_benchmark(tmp_path / "a", **kw)
    said = [r.getMessage() for r in caplog.records if "too few distinct questions" in r.getMessage()]
    named = [re.search(r"benchmark's (\S+) domain", m).group(1) for m in said]
    assert said and len(named) == len(set(named))  # one line per domain
    files = [p for c in layout.clients for p in (c.train, c.test)] + [layout.public]
    questions = [r.question for p in files for r in read_records(p)]
    assert sum(int(re.search(r": (\d+) of its questions", m).group(1)) for m in said) == \
        len(questions) - len(set(questions)) > 0
    assert not [r for r in caplog.records if "repeated question after" in r.getMessage()]
    make_benchmark(tmp_path / "b", **kw)
    for rel in ("client_0/train.jsonl", "client_0/test.jsonl", "public.jsonl"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
