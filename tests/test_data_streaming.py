"""Streaming reads (``iter_records``, ``scan_problems``) equal the eager reader record for record and problem for
problem, and ``score_pool`` scores a pool in chunks with the same numbers as one ``score_paths`` call."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from fedlada import reasoning
from fedlada.data import Record, iter_records, read_records, scan_file, scan_problems, write_records
from fedlada.errors import ConfigError, DataError
from fedlada.pool import chunked, iter_pool_scores, score_pool

FIXTURES = Path(__file__).parent / "fixtures" / "data"
FIXTURE_FILES = sorted(p for p in FIXTURES.iterdir() if p.is_file())


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_scan_problems_equals_scan_file_on_every_fixture(path):
    records, problems = scan_file(path)
    assert scan_problems(path) == problems
    if problems:  # the same DataError, with every problem, before any record
        with pytest.raises(DataError) as eager:
            read_records(path)
        stream = iter_records(path)
        with pytest.raises(DataError) as lazy:
            next(stream)
        assert str(lazy.value) == str(eager.value) and lazy.value.problems == eager.value.problems
    else:
        assert list(iter_records(path)) == records == read_records(path)
        assert list(iter_records(path, check_first=False)) == records


def test_bad_fixture_problems_name_file_and_line():
    problems = scan_problems(FIXTURES / "bad.jsonl")
    assert len(problems) == 10
    lines = [p.line for p in problems]
    assert lines == sorted(lines) and lines[0] == 3  # line 2 is blank, line 3 has a numeric answer
    assert all(str(p).startswith(f"{FIXTURES / 'bad.jsonl'}:{p.line}: ") for p in problems)


def test_one_pass_mode_yields_records_before_the_first_problem(tmp_path):
    path = tmp_path / "pool.jsonl"
    good = [Record(f"r{i}", f"q{i}", str(i)) for i in range(3)]
    lines = [json.dumps(r.to_json()) for r in good] + ['{"id": "r3", "question": "q3"}',
                                                       json.dumps(Record("r4", "q4", "4").to_json())]
    path.write_text("\n".join(lines) + "\n")
    got = []
    with pytest.raises(DataError) as err:
        for r in iter_records(path, check_first=False):
            got.append(r)
    assert got == good  # lazy: the first three came out, nothing after the bad line 4
    assert [(p.line, p.key) for p in err.value.problems] == [(4, "answer")]
    with pytest.raises(DataError):  # default: nothing at all before the error
        next(iter_records(path))


def test_jsonl_edge_cases_match_the_eager_reader(tmp_path):
    path = tmp_path / "edge.json"  # .json that is not a list is JSONL
    rows = [json.dumps({"id": "a", "question": "é?", "answer": "1"}), "", "  ",
            json.dumps({"id": "b", "question": "q" * 300, "answer": "2"}),
            json.dumps({"id": "c", "question": "q", "answer": "3", "rationale": "x\r\ny"}) + "\r"]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    for limit in (20_000, 200):  # 200: line 4 is over the limit
        assert scan_problems(path, max_record_bytes=limit) == scan_file(path, max_record_bytes=limit)[1]
    assert list(iter_records(path)) == read_records(path)
    assert [p.line for p in scan_problems(path, max_record_bytes=200)] == [4]


def test_gsm8k_detection_and_parquet_stream(tmp_path):
    gsm = FIXTURES / "gsm8k.jsonl"
    assert list(iter_records(gsm, format="gsm8k")) == read_records(gsm, format="gsm8k")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"id": f"p{i}", "question": f"q{i}", "answer": str(i)} for i in range(2500)]  # > one 1024-row batch
    rows[1500]["answer"] = ""
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert scan_problems(path) == scan_file(path)[1] and [p.line for p in scan_problems(path)] == [1501]
    rows[1500]["answer"] = "1500"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert list(iter_records(path)) == read_records(path)


def test_missing_file_and_bad_format():
    with pytest.raises(DataError, match="file not found"):
        next(iter_records("/nonexistent/pool.jsonl"))
    assert scan_problems("/nonexistent/pool.jsonl")[0].message == "file not found"
    with pytest.raises(ConfigError):
        next(iter_records(FIXTURES / "fedlada.jsonl", format="yaml"))


# ----------------------------------------------------------------------------------------------- score_pool


def test_chunked():
    assert list(chunked(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []
    with pytest.raises(ValueError):
        list(chunked([1], 0))


@pytest.fixture(scope="module")
def pool_and_model(tmp_path_factory):
    from fedlada.models import build_tiny_model, train_tokenizer

    rng = random.Random(0)
    records = []
    for i in range(37):
        a, b = rng.randint(2, 9), rng.randint(1, 30)
        steps = "\n".join(f"{a} * {k} = {a * k}" for k in range(1, rng.randint(1, 4) + 1))
        records.append(Record(f"q{i}", f"What is {a} times {b}?" + " Think." * (i % 4), str(a * b), steps))
    path = write_records(records, tmp_path_factory.mktemp("pool") / "public.jsonl")
    texts = [reasoning.format_prompt(r.question) + reasoning.format_path(r.rationale, r.answer) for r in records]
    tok = train_tokenizer(texts, vocab_size=200)
    return path, records, tok, build_tiny_model(tok, hidden_size=16, num_layers=2, num_heads=2, seed=0)


def test_score_pool_equals_one_score_paths_call_for_any_chunking(pool_and_model):
    from fedlada.paths import score_paths

    path, records, tok, model = pool_and_model
    ref = score_paths(model, tok, [reasoning.format_prompt(r.question) for r in records],
                      [reasoning.format_path(r.rationale, r.answer) for r in records], batch_size=64)
    seen = []
    for chunk_size, batch_size in ((1, 1), (5, 2), (16, 8), (100, 32)):
        got = score_pool(model, tok, iter_records(path), chunk_size=chunk_size, batch_size=batch_size,
                         progress=lambda done, total: seen.append((done, total)))
        assert got.ids == [r.id for r in records]
        np.testing.assert_allclose(got.logprob, ref.logprob, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(got.num_tokens, ref.num_tokens)
        np.testing.assert_allclose(got.nll, ref.nll, rtol=0, atol=1e-5)
    assert seen[:3] == [(1, None), (2, None), (3, None)]  # a generator has no length
    assert len(score_pool(model, tok, [])) == 0


def test_iter_pool_scores_chunks_and_custom_prompt(pool_and_model):
    path, records, tok, model = pool_and_model
    chunks = list(iter_pool_scores(model, tok, records, chunk_size=10, prompt=lambda q: f"Q: {q}\n"))
    assert [len(ids) for ids, _ in chunks] == [10, 10, 10, 7]
    plain = score_pool(model, tok, records, chunk_size=10)
    custom = np.concatenate([s.logprob for _, s in chunks])
    assert custom.shape == plain.logprob.shape and not np.allclose(custom, plain.logprob)  # the prompt is used
    assert np.all(np.isfinite(custom)) and np.all(custom < 0)
