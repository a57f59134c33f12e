"""The data contract: reading every supported format, reporting every problem with file and line, writing, and the
hub loader (exercised on local files through ``datasets.load_dataset("json")``, the same conversion path)."""

import json
import os
import random
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import fedlada.data as data  # noqa: E402
from fedlada.data import (  # noqa: E402
    Problem,
    Record,
    detect_format,
    load_hub_dataset,
    read_records,
    validate_files,
    write_records,
)
from fedlada.errors import ConfigError, DataError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _content(records):
    return [(r.question, r.answer, r.rationale, r.domain) for r in records]


def test_public_api_is_exported():
    for name in ["Record", "Problem", "read_records", "validate_files", "write_records", "load_hub_dataset",
                 "make_benchmark", "BenchmarkLayout", "DOMAINS", "steps_of"]:
        assert hasattr(data, name) and name in data.__all__, name


def test_importing_data_loads_neither_datasets_nor_torch_nor_flwr():
    import subprocess

    code = "import sys, fedlada.data; print(sorted(m for m in ('datasets','torch','flwr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_record_to_json_leaves_out_missing_optional_fields():
    assert Record("x", "q", "a").to_json() == {"id": "x", "question": "q", "answer": "a"}
    full = Record("x", "q", "a", "r", "farm").to_json()
    assert full == {"id": "x", "question": "q", "answer": "a", "rationale": "r", "domain": "farm"}


def test_problem_str_names_file_line_and_key():
    assert str(Problem("d.jsonl", 3, "answer", "missing")) == "d.jsonl:3: answer: missing"
    assert str(Problem("d.jsonl", 3, None, "bad JSON")) == "d.jsonl:3: bad JSON"
    assert str(Problem("d.jsonl", None, None, "empty file")) == "d.jsonl: empty file"


def test_fedlada_jsonl_reads_exactly():
    records = read_records(FIXTURES / "fedlada.jsonl")
    assert records == [
        Record("bake-1", "Mia bakes 3 trays of rolls. How many rolls does Mia have?", "18",
               "A tray holds 6 rolls.\n3 * 6 = 18", "bakery"),
        Record("gen-1", "Alex has 4 marbles and finds 5 more. How many marbles does Alex have?", "9", "4 + 5 = 9"),
        Record("capital-1", "What is the capital of France?", "Paris"),
    ]


def test_gsm8k_strips_calculator_annotations_and_splits_the_answer():
    records = read_records(FIXTURES / "gsm8k.jsonl")
    assert [r.id for r in records] == ["gsm8k-1", "gsm8k-2", "gsm8k-3"]  # {stem}-{line}
    assert [r.answer for r in records] == ["45", "60", "2,000"]
    assert records[0].rationale == "Nina sold 30/2 = 15 pens in April.\nNina sold 30+15 = 45 pens in March and April."
    assert all("<<" not in r.rationale and ">>" not in r.rationale and "####" not in r.rationale for r in records)


def test_mathinstruct_answers_come_from_the_output():
    records = read_records(FIXTURES / "mathinstruct.jsonl")
    assert [r.answer for r in records] == ["12", "\\frac{3}{4}", "B", "42"]  # answer is / boxed / answer is / last
    assert records[0].rationale == "Sam has 7 + 5 = 12 apples."  # the answer sentence is cut from the rationale
    assert records[2].rationale == "Distance = 60 * 3 = 180 km."
    assert records[1].question.startswith("What is $\\frac{1}{2}")


@pytest.mark.parametrize("output, answer, rationale", [
    ("Options listed 1 to 4.\n3 is prime.\nFinal answer: C", "C", "Options listed 1 to 4.\n3 is prime."),
    ("7 = 2*3 + 1.\n**Answer:** yes", "yes", "7 = 2*3 + 1."),
    ("It has 20 arrondissements.\nThe final answer: Paris", "Paris", "It has 20 arrondissements."),
    ("2 + 3 = 5 and 5 * 4 = 20.\nAnswer: 20", "20", "2 + 3 = 5 and 5 * 4 = 20."),
    ("There are 2 cities: 7 and 9 km apart.", "9", "There are 2 cities: 7 and 9 km apart."),
    ("Options listed 1 to 4.\n3 is prime.\nFinal answer:\nC", "C", "Options listed 1 to 4.\n3 is prime."),
    ("3 is prime.\n**Final Answer:**\n\nC\n", "C", "3 is prime."),  # "*" was read as the answer
    ("She had 15 and ate 3.\nFinal answer:\nShe has 12 apples left.", "12",  # a sentence: not a gold answer
     "She had 15 and ate 3.\nFinal answer:\nShe has 12 apples left."),
    ("Step 1: 2 + 3 = 5.\nAnswer: 5\nStep 2 checks it: 5 - 3 = 2.", "5",
     "Step 1: 2 + 3 = 5.\nStep 2 checks it: 5 - 3 = 2.")])  # reasoning after the answer line is kept
def test_mathinstruct_final_answer_lines_win_over_the_last_number(output, answer, rationale):
    """An output ending with an answer line ("Final answer: C") has that answer, not the last number of its text
    (which stays the fallback); the line is cut from the rationale."""
    from fedlada.data.formats import split_mathinstruct_output

    assert split_mathinstruct_output(output) == (rationale, answer)


def test_mathinstruct_program_of_thought_is_a_problem(tmp_path):
    path = tmp_path / "pot.jsonl"
    path.write_text(json.dumps({"source": "data/PoT/mathqa.json", "instruction": "q", "output": "print(2 + 3)"}) + "\n")
    [problem] = validate_files(path)
    assert (problem.line, problem.key) == (1, "output") and "program" in problem.message


def test_cot_collection_maps_source_rationale_target():
    records = read_records(FIXTURES / "cot.jsonl")
    assert [(r.id, r.answer) for r in records] == [("cot-1", "no"), ("cot-2", "yes")]
    assert records[0].rationale == "A touchdown is scored in American football.\nA goalkeeper plays soccer."


def test_json_list_and_csv_containers():
    json_records = read_records(FIXTURES / "records.json")
    assert [r.id for r in json_records] == ["json-1", "json-2"]
    assert json_records[0].rationale == "A crate holds 8 eggs.\n2 * 8 = 16" and json_records[0].domain == "farm"
    csv_records = read_records(FIXTURES / "records.csv")
    assert csv_records == [
        Record("csv-1", "Otto opens 2 kits of screws. How many screws does Otto have?", "8",
               "A kit holds 4 screws.\n2 * 4 = 8", "workshop"),
        Record("csv-2", "What is 5 - 2?", "3"),
    ]


def test_parquet_container(tmp_path):
    import pyarrow as pa  # a dependency of `datasets`, installed with the project
    import pyarrow.parquet as pq

    records = read_records(FIXTURES / "fedlada.jsonl")
    path = tmp_path / "records.parquet"
    pq.write_table(pa.Table.from_pylist([r.to_json() for r in records]), path)
    assert read_records(path) == records
    rows = [{"id": "p1", "question": "q", "answer": "1"}, {"id": "p2", "question": None, "answer": "2"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [(p.line, p.key) for p in validate_files(path)] == [(2, "question")]


def test_integer_ids_and_answers_read_as_their_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": 7, "question": "What is 40 + 2?", "answer": 42},
            {"id": 8, "question": "What is 1 - 2?", "answer": -1}]
    expected = [Record("7", "What is 40 + 2?", "42"), Record("8", "What is 1 - 2?", "-1")]
    (tmp_path / "ints.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_records(tmp_path / "ints.jsonl") == expected
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ints.parquet")  # int64 columns
    assert read_records(tmp_path / "ints.parquet") == expected
    cot = tmp_path / "cot.jsonl"  # a foreign format: integer target and id too
    cot.write_text(json.dumps({"id": 3, "source": "What is 2 + 2?", "target": 4, "rationale": "2 + 2 = 4"}) + "\n")
    assert read_records(cot) == [Record("3", "What is 2 + 2?", "4", "2 + 2 = 4")]
    (tmp_path / "other.jsonl").write_text(json.dumps({"id": "a", "question": "q", "answer": 1.5}) + "\n"
                                          + json.dumps({"id": False, "question": "q", "answer": "1"}) + "\n")
    assert [(p.line, p.key) for p in validate_files(tmp_path / "other.jsonl")] == [(1, "answer"), (2, "id")]


# Every planted error of bad.jsonl with its line and key (see the fixture; line 2 and 14 are blank).
EXPECTED_BAD = [
    (3, "answer", "found number 2.5 (an integer is taken as is"),
    (4, "question", "empty"),
    (5, "question", "missing"),
    (6, "id", "duplicate id 'a' (first on line 1)"),
    (7, None, "bad JSON"),
    (8, None, "expected a JSON object, found a list"),
    (9, None, "not valid UTF-8: byte 0xe9"),
    (10, "rationale", "found number 5"),
    (11, "explanation", "unknown key"),
    (12, None, "over the limit of 500"),
    (13, "id", "found boolean true"),
]


def test_every_planted_problem_is_reported_with_its_line():
    problems = validate_files([FIXTURES / "bad.jsonl"], max_record_bytes=500)
    assert [(p.line, p.key) for p in problems] == [(line, key) for line, key, _ in EXPECTED_BAD]
    for problem, (_, _, text) in zip(problems, EXPECTED_BAD):
        assert text in problem.message and problem.file.endswith("bad.jsonl")


def test_read_records_raises_with_every_problem():
    with pytest.raises(DataError) as info:
        read_records(FIXTURES / "bad.jsonl", max_record_bytes=500)
    assert len(info.value.problems) == len(EXPECTED_BAD)
    message = str(info.value)
    assert "11 problem(s)" in message and "bad.jsonl:9: not valid UTF-8" in message
    # with the default limit the long record on line 12 is fine: one problem fewer
    assert len(validate_files(FIXTURES / "bad.jsonl")) == len(EXPECTED_BAD) - 1


def test_missing_file_is_a_data_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_records(missing)
    assert [str(p) for p in validate_files([missing])] == [f"{missing}: file not found"]


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a Flower app runs in the SuperLink's / SuperNode's folder, not the experimenter's
    with pytest.raises(DataError, match=rf"^data/nope.jsonl: file not found \(a relative path, looked for in "
                                        rf"{tmp_path}\)$"):
        read_records("data/nope.jsonl")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\n"])
def test_empty_file_is_a_problem(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert [p.message for p in validate_files(path)] == ["empty file: no records"]


def test_format_is_detected_from_the_first_valid_object(tmp_path):
    lines = FIXTURES.joinpath("gsm8k.jsonl").read_text().splitlines()
    path = tmp_path / "g.jsonl"
    path.write_text("{broken\n" + "\n".join(lines) + "\n")
    records, problems = data.scan_file(path)
    assert [p.line for p in problems] == [1]
    assert [r.id for r in records] == ["g-2", "g-3", "g-4"] and records[0].answer == "45"


def test_detect_format_by_keys():
    assert detect_format({"id": "1", "question": "q", "answer": "1"}) == "fedlada"
    assert detect_format({"question": "q", "answer": "x\n#### 1"}) == "gsm8k"
    assert detect_format({"instruction": "q", "output": "o", "source": "s"}) == "mathinstruct"
    assert detect_format({"source": "q", "rationale": "r", "target": "t"}) == "cot"
    assert detect_format({"prompt": "q"}) is None


def test_gsm8k_records_with_ids_are_still_gsm8k(tmp_path):
    # a common export keeps an id next to question/answer: the answer must still be split at '####'
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"id": "g1", "question": "2+3?", "answer": "2+3=<<2+3=5>>5.\n#### 5"}) + "\n")
    assert detect_format(json.loads(path.read_text())) == "gsm8k"
    [rec] = read_records(path)
    assert (rec.id, rec.answer, rec.rationale) == ("g1", "5", "2+3=5.")
    # with a rationale key it is the contract, whose answer must then be one line
    assert detect_format({"id": "x", "question": "q", "rationale": "r", "answer": "a\n#### 1"}) == "fedlada"


def test_contract_answers_are_one_line_and_a_marker_less_gsm8k_file_is_hinted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "q", "answer": "A\nB"}) + "\n"
                    + json.dumps({"question": "q", "answer": "12"}) + "\n")
    problems = validate_files(path)
    assert [(p.line, p.key) for p in problems] == [(1, "answer"), (2, "id")]
    assert "one line" in problems[0].message and "####" in problems[1].message


def test_every_format_checks_its_final_answer_is_one_line_with_a_letter_or_digit(tmp_path):
    rows = [{"question": "q", "answer": "2+3=5\n#### 5 apples\nNote: easy"},  # gsm8k: text after '#### N'
            {"id": "r", "question": "q", "answer": "5\rsix"}, {"id": "u", "question": "q", "answer": "5\u2028six"},
            {"id": "p", "question": "q", "answer": "..."}, {"source": "q", "target": "\u2014"},
            {"id": "ok", "question": "q", "answer": "-3.5"}]
    found = []
    for i, row in enumerate(rows):
        path = tmp_path / f"a{i}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        found.append([(p.key, p.message) for p in validate_files(path)])
    assert [len(f) for f in found] == [1, 1, 1, 1, 1, 0]
    assert all("one line" in f[0][1] for f in found[:3]) and "'#### <answer>'" in found[0][0][1]
    assert all("no letter or digit" in f[0][1] for f in found[3:5]) and found[4][0][0] == "target"


def test_alpaca_input_joins_the_question_and_unusable_containers_say_why(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Solve the problem.", "input": "Tom has 2 and buys 3. How many?",
                                "output": "2+3=5. The answer is 5."}) + "\n")
    [rec] = read_records(path)
    assert rec.question == "Solve the problem.\nTom has 2 and buys 3. How many?" and rec.answer == "5"
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"id": "a", "question": "q", "answer": "1"}]}, indent=2))
    [problem] = validate_files(wrapped)
    assert "single object over several lines" in problem.message and "'data'" in problem.message
    indexed = tmp_path / "indexed.csv"
    indexed.write_text(",id,question,answer\n0,a,q,1\n")
    [problem] = validate_files(indexed)
    assert "unknown key ''" in problem.message and "pandas index" in problem.message


def test_cot_targets_broken_over_lines_become_one_answer(tmp_path):
    path = tmp_path / "cot.jsonl"
    path.write_text(json.dumps({"source": "q", "rationale": "r", "target": "New\n  York"}) + "\n")
    assert read_records(path)[0].answer == "New York"


def test_undetectable_format_is_reported_once(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text('{"prompt": "q"}\n{"prompt": "r"}\n[1]\n')
    problems = validate_files(path)
    assert [(p.line, "cannot tell the format" in p.message) for p in problems] == [(1, True), (3, False)]


def test_explicit_format_overrides_detection(tmp_path):
    problems = validate_files(FIXTURES / "gsm8k.jsonl", format="fedlada")
    # read as the contract: no ids, and answers that hold the whole multi-line solution
    assert [(p.line, p.key) for p in problems] == [(n, key) for n in (1, 2, 3) for key in ("id", "answer")]
    with pytest.raises(ConfigError, match="format"):
        validate_files(FIXTURES / "gsm8k.jsonl", format="alpaca")


def test_gsm8k_answer_without_marker_is_a_problem(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "12"}) + "\n")
    [problem] = validate_files(path, format="gsm8k")
    assert (problem.line, problem.key) == (1, "answer") and "####" in problem.message


def test_json_list_problems_name_the_item_and_its_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"id": "a", "question": "q", "answer": "1"},\n  {"id": "b",\n   "question": "q"},\n'
                    '  {"id": "a", "question": "q", "answer": "3"}\n]\n')
    problems = validate_files(path)
    assert [(p.line, p.key) for p in problems] == [(3, "answer"), (5, "id")]
    assert problems[0].message.startswith("item 2: ") and "item 3: duplicate id 'a'" in problems[1].message
    path.write_text('[{"id": "a", "question": "q", "answer": "1"},\n {"id": }]')
    [problem] = validate_files(path)
    assert problem.line == 2 and "bad JSON" in problem.message


def test_csv_problems_use_file_lines(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('id,question,answer\nx1,"two\nlines",1\nx2,,2\nx3,q,3,extra\n')
    assert [(p.line, p.key) for p in validate_files(path)] == [(4, "question"), (5, None)]


def test_validate_files_takes_directories_and_skips_the_manifest(tmp_path):
    for name in ("fedlada.jsonl", "gsm8k.jsonl"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    (tmp_path / "manifest.json").write_text('{"not": "records"}')
    assert validate_files(tmp_path) == []
    shutil.copy(FIXTURES / "bad.jsonl", tmp_path / "sub.jsonl")
    assert {Path(p.file).name for p in validate_files([tmp_path])} == {"sub.jsonl"}
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert "no data files" in validate_files(empty)[0].message


def test_write_records_round_trips_atomically(tmp_path):
    rng = random.Random(0)
    records = [Record(f"r{i}", f"Qüestion {i}? ✓", str(rng.randint(0, 99)),
                      "1 + 1 = 2\n2 * 3 = 6" if i % 2 else None, "farm" if i % 3 else None) for i in range(50)]
    path = write_records(records, tmp_path / "deep" / "out.jsonl")
    assert read_records(path) == records
    assert "✓" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert sorted(os.listdir(path.parent)) == ["out.jsonl"]  # no temporary file left behind
    for suffix in (".csv", ".parquet", ".json"):  # the container the suffix names, read back the same
        assert read_records(write_records(records, tmp_path / f"out{suffix}")) == records


def test_write_records_keeps_the_old_file_when_writing_fails(tmp_path):
    path = write_records([Record("a", "q", "1")], tmp_path / "out.jsonl")
    before = path.read_bytes()
    with pytest.raises(AttributeError):
        write_records([Record("b", "q", "2"), "not a record"], path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out.jsonl"]


@pytest.mark.parametrize("name, fmt", [("gsm8k.jsonl", "gsm8k"), ("mathinstruct.jsonl", "auto"),
                                       ("cot.jsonl", "cot"), ("fedlada.jsonl", "auto")])
def test_hub_loader_converts_like_local_files(tmp_path, name, fmt):
    local = read_records(FIXTURES / name)
    loaded = load_hub_dataset("json", data_files=str(FIXTURES / name), split="train", format=fmt,
                              cache_dir=str(tmp_path))
    assert _content(loaded) == _content(local)
    if name == "fedlada.jsonl":
        assert [r.id for r in loaded] == [r.id for r in local]  # ids carried by the rows are kept
    else:
        assert [r.id for r in loaded] == [f"json-train-{i}" for i in range(1, len(local) + 1)]
    limited = load_hub_dataset("json", data_files=str(FIXTURES / name), split="train", format=fmt, limit=1,
                               cache_dir=str(tmp_path))
    assert _content(limited) == _content(local[:1])


def test_hub_known_names_pick_format_and_config(monkeypatch):
    import datasets

    rows = [json.loads(line) for line in FIXTURES.joinpath("gsm8k.jsonl").read_text().splitlines()]
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs["split"]))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_hub_dataset("openai/gsm8k", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [r.answer for r in records] == ["45", "60", "2,000"] and records[0].id == "gsm8k-test-1"
    bad_rows = rows + [{"question": "q", "answer": "no marker"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: bad_rows)
    with pytest.raises(DataError) as info:
        load_hub_dataset("openai/gsm8k", split="train")
    assert [(p.file, p.line, p.key) for p in info.value.problems] == [("openai/gsm8k[train]", 4, "answer")]
    assert len(load_hub_dataset("openai/gsm8k", split="train", skip_invalid=True)) == 3


def test_hub_loader_missing_data_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot load data set"):
        load_hub_dataset("json", data_files=str(tmp_path / "absent.jsonl"), split="train", format="gsm8k",
                         cache_dir=str(tmp_path))


def test_a_damaged_parquet_file_is_a_problem_not_a_crash(tmp_path):
    from fedlada.data import iter_records

    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 not really parquet PAR1")
    problems = validate_files(bad)
    assert len(problems) == 1 and problems[0].file == str(bad)
    assert "not a readable Parquet file" in problems[0].message
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(iter_records(bad))


def test_data_paths_expand_the_home_folder():
    from pathlib import Path

    from fedlada.data.validate import expand_data_paths

    assert expand_data_paths(["~/no-such-file.jsonl"]) == [Path.home() / "no-such-file.jsonl"]


def test_non_arithmetic_data_keeps_its_domain_rationale_and_header(tmp_path):
    """Domains survive every format; a rationale's redundant last answer line is dropped and any other answer line
    is a problem; CSV header names are read without the blanks after the commas; JSON line ends become \\n;
    a yes/no answer written as a JSON boolean gets a hint about text."""
    rows = {
        "gsm8k.jsonl": {"question": "q?", "answer": "Two steps.\n#### 12 kg", "domain": "units"},
        "mi.jsonl": {"instruction": "Who?", "output": "He wrote it. The answer is Dr. Smith. He did.",
                     "domain": "history"},
        "cot.jsonl": {"source": "Capital?", "target": "B", "rationale": "Paris is the capital.", "domain": "geo"},
        "fed.jsonl": {"id": "a", "question": "Q\r\nline 2", "answer": "(B) Paris",
                      "rationale": "Paris is the capital.\r\nAnswer: (B) Paris", "domain": "geo"},
    }
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
    assert [r.domain for name in rows for r in read_records(tmp_path / name)] == ["units", "history", "geo", "geo"]
    assert read_records(tmp_path / "mi.jsonl")[0].answer == "Dr. Smith"
    assert read_records(tmp_path / "fed.jsonl") == [Record("a", "Q\nline 2", "(B) Paris", "Paris is the capital.",
                                                           "geo")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "q", "answer": "B", "rationale": "x\nAnswer: C"}) + "\n"
                   + json.dumps({"id": "b", "question": "q", "answer": "B", "rationale": "Answer: B\nso B"}) + "\n"
                   + json.dumps({"id": "c", "question": "Is it?", "answer": True}) + "\n")
    problems = validate_files(bad)
    assert [(p.line, p.key) for p in problems] == [(1, "rationale"), (2, "rationale"), (3, "answer")]
    assert "line 2 of the rationale is an answer line ('Answer: C')" in problems[0].message
    assert "line 1 of the rationale" in problems[1].message
    assert '"yes" or "no"' in problems[2].message
    same = tmp_path / "same.jsonl"  # the last line states the answer in another spelling: still redundant
    same.write_text(json.dumps({"id": "s", "question": "q", "answer": "B", "rationale": "x\nAnswer: (B) Paris"}) + "\n")
    assert read_records(same)[0].rationale == "x"
    csv_file = tmp_path / "spaces.csv"
    csv_file.write_text("id, question, answer\nx, Is it?, yes\n")
    assert read_records(csv_file) == [Record("x", "Is it?", "yes")]


def test_a_compressed_or_foreign_file_is_one_problem_not_one_per_line(tmp_path):
    import gzip

    from fedlada.data.stream import scan_problems

    rows = "".join(json.dumps({"id": f"r{i}", "question": "q", "answer": "1"}) + "\n" for i in range(50))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    (tmp_path / "d.tsv").write_text("id\tquestion\tanswer\n" + "".join(f"r{i}\tq\t1\n" for i in range(50)))
    (tmp_path / "d.txt").write_text(rows)  # JSON Lines under another suffix: read as such
    for name, fragment in (("d.jsonl.gz", "this is gzip-compressed, not text"),
                           ("d.tsv", "the first line is not JSON: a .tsv file is read as JSON Lines")):
        for problems in (validate_files(tmp_path / name), scan_problems(tmp_path / name)):
            assert len(problems) == 1 and fragment in problems[0].message and problems[0].line == 1
    assert len(read_records(tmp_path / "d.txt")) == 50


def test_a_gold_answer_with_its_marker_is_a_problem(tmp_path):
    """``"answer": "Answer: 5"`` (or ``#### 5``, ``The answer is 5``) can never be matched by a path's answer: named
    with its line and the answer it should be."""
    path = tmp_path / "marked.jsonl"
    rows = [{"id": "a", "question": "q", "answer": "Answer: 5"}, {"id": "b", "question": "q", "answer": "#### 5"},
            {"id": "c", "question": "q", "answer": "The answer is 5"},
            {"id": "d", "question": "q", "answer": "answers vary"},
            {"id": "e", "question": "q", "answer": "**Final Answer:** B"},
            {"id": "f", "question": "q", "answer": "The answer is blowin' in the wind"},  # a title, not a marker
            {"id": "g", "question": "q", "answer": "Ans: 5"}, {"id": "h", "question": "q", "answer": "Answer - 5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = validate_files(path)
    assert [(p.line, p.key) for p in problems] == [(1, "answer"), (2, "answer"), (3, "answer"), (5, "answer"),
                                                   (7, "answer"), (8, "answer")]
    assert "starts with an answer marker" in problems[0].message and "'5'" in problems[0].message
    assert "'B'" in problems[3].message


def test_a_directory_says_which_files_it_leaves_out_and_a_semicolon_csv_gets_a_hint(tmp_path, caplog):
    from fedlada.data.validate import expand_data_paths

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok.jsonl").write_text(json.dumps({"id": "a", "question": "q", "answer": "1"}) + "\n")
    (tmp_path / "d" / "more.jsonl.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / "d" / "semi.csv").write_text("id;question;answer\n1;q;2\n")
    with caplog.at_level("WARNING"):
        files = expand_data_paths(tmp_path / "d")
    assert sorted(f.name for f in files) == ["ok.jsonl", "semi.csv"]
    assert "1 file(s) left out, not data files by their suffix (more.jsonl.gz;" in caplog.text
    [problem] = validate_files(tmp_path / "d" / "semi.csv")
    assert "cannot tell the format" in problem.message and "must be comma-separated" in problem.message


@pytest.mark.parametrize("answer, marked", [
    ("The answer is yes", True), ("The answer is: no", True), ("Ans. 5", True), ("Answers: 5", True),
    ("Answer – 5", True), ("The answer is −5", True), ("The answer is ½", True), ("The answer is \\frac{1}{2}", True),
    ("The answer is \\boxed{5}", True), ("The answer is no longer relevant", False), ("Answer to life", False),
    ("Ansel Adams", False), ("Answers vary by region", False)])
def test_answer_markers_in_gold_answers(tmp_path, answer, marked):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "q", "answer": answer}) + "\n")
    problems = validate_files(path)
    assert bool(problems) is marked and all("answer marker" in p.message for p in problems)


def test_repeated_keys_columns_lone_surrogates_and_utf16_are_problems(tmp_path):
    """JSON keeps the last of two equal keys and csv the last of two equal columns, silently; a lone \\ud800 escape
    passed validation and crashed the run in the tokenizer; a UTF-16 file and CSV saved as .jsonl got one vague
    problem per line. Each is one problem naming its line, in both readers."""
    from fedlada.data.stream import scan_problems

    rec = '{"id": "a", "question": "q", "answer": "1"}\n'
    files = {
        "dup.jsonl": (rec + '{"id": "b", "question": "q", "answer": "1", "answer": "2"}\n',
                      2, "key(s) 'answer' given twice in one record"),
        "dup.json": ('[{"id": "a", "question": "q", "answer": "1", "id": "b"}]', 1, "key(s) 'id' given twice"),
        "dupcol.csv": ("id,question,answer,answer\na,q,2,3\n", 1, "column(s) 'answer' more than once"),
        "sur.jsonl": (rec + '{"id": "b", "question": "q \\ud800?", "answer": "1"}\n', 2,
                      "question: invalid Unicode (a lone surrogate escape"),
        "csv.jsonl": ("id,question,answer\na,q,1\nb,q,2\n", 1, "looks like a CSV header"),
    }
    for name, (text, line, fragment) in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "u16.jsonl").write_bytes(rec.encode("utf-16"))
    files["u16.jsonl"] = (None, 1, "this is UTF-16 text")
    for name, (_, line, fragment) in files.items():
        for problems in (validate_files(tmp_path / name), scan_problems(tmp_path / name)):
            assert [(p.line, fragment in p.message) for p in problems] == [(line, True)], (name, problems)
    (tmp_path / "ok.jsonl").write_text(rec + rec.replace('"a"', '"b"'), encoding="utf-8")
    assert len(read_records(tmp_path / "ok.jsonl")) == 2
    # keys no format reads are ignored, repeated or not, nested or not (as the formats document)
    gsm = ('{"question": "What is 1+1?", "answer": "1+1=2\\n#### 2", "extra": "bad \\udc80", '
           '"meta": {"a": 1, "a": 2}, "note": 1, "note": 2}\n')
    (tmp_path / "gsm.jsonl").write_text(gsm, encoding="utf-8")
    (tmp_path / "gsm.csv").write_text('question,answer,note,note\nWhat is 1+1?,"1+1=2\n#### 2",a,b\n',
                                      encoding="utf-8")
    for name in ("gsm.jsonl", "gsm.csv"):
        assert validate_files(tmp_path / name) == [] and len(read_records(tmp_path / name)) == 1
    # a .json list goes on past a record with a repeated key: every problem is said
    items = ['{"id": "a", "question": "q", "answer": "1", "answer": "2"}', rec.strip().replace('"a"', '"b"'),
             '{"id": "c", "question": "q", "answer": "1", "id": "d"}']
    (tmp_path / "list.json").write_text("[\n" + ",\n".join(items) + "\n]\n", encoding="utf-8")
    assert [(p.line, "given twice" in p.message) for p in validate_files(tmp_path / "list.json")] == [(2, True),
                                                                                                    (4, True)]
