"""The in-process runner end to end on tiny models: run directory contents, determinism, resume, privacy,
client failures and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlada.config import load_config
from fedlada.data import make_benchmark, read_records, write_records
from fedlada.errors import DataError
from fedlada.messages import ReportMessage, TeachMessage
from fedlada.prepare import load_data
from fedlada.reasoning import grade
from fedlada.runner import ClientFailure, RunDir, comparable_metrics, run


def _rows(path: Path, name: str) -> list[dict]:
    return RunDir(path).read(name)


def test_run_dir_and_resume_gives_identical_numbers(tiny_overrides, gold_sampler, tmp_path):
    cfg = load_config(overrides=tiny_overrides)
    data = load_data(cfg)
    gold_sampler(data.public)
    full = run(cfg)
    rd = full.run_dir
    for name in ("config.toml", "metrics.jsonl", "selections.jsonl", "audit.jsonl", "predictions.jsonl",
                 "summary.json"):
        assert (rd / name).is_file(), name
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["round_001", "round_002"]
    sel = _rows(rd, "selections.jsonl")
    pairs = {s["pair"] for s in sel}
    assert {"llm->client0", "llm->client1"} <= pairs
    assert any(p.endswith("->llm") for p in pairs)
    assert all(s["reason"] for s in sel) and any(s["selected"] for s in sel)
    assert all("learnability_gap" in s for s in sel if s["pair"].startswith("llm->"))
    evals = [r for r in _rows(rd, "metrics.jsonl") if r["event"] == "eval"]
    assert {(r["round"], r["who"]) for r in evals} == {(t, w) for t in range(3) for w in ("client0", "client1", "llm")}
    assert json.loads((rd / "summary.json").read_text())["rounds_done"] == 2
    # every evaluation's answers, per question: they add up to its accuracy
    preds = _rows(rd, "predictions.jsonl")
    for r in evals:
        mine = [p for p in preds if (p["round"], p["who"]) == (r["round"], r["who"])]
        assert len(mine) == r["n"] and sum(p["correct"] for p in mine) / r["n"] == pytest.approx(r["accuracy"])
    assert all(set(p) == {"round", "who", "id", "answer", "gold", "correct", "path"} for p in preds)
    assert all(p["correct"] == grade(p["path"], p["gold"]) for p in preds)

    # interrupted after round 1, then resumed: the same numbers as the uninterrupted run
    cfg2 = load_config(overrides=tiny_overrides + [f"out_dir={tmp_path / 'resumed'}"])
    part = run(cfg2, stop_after_round=1)
    assert part.summary["rounds_done"] == 1
    # a crash mid-round 2 leaves partial lines behind: they must be dropped on resume
    with open(part.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 2, "event": "client_step", "who": "client0", "partial": True}) + "\n")
    resumed = run(cfg2)
    assert resumed.resumed_from == 1
    assert comparable_metrics(_rows(resumed.run_dir, "metrics.jsonl")) == comparable_metrics(_rows(rd, "metrics.jsonl"))
    assert _rows(resumed.run_dir, "selections.jsonl") == sel
    assert _rows(resumed.run_dir, "predictions.jsonl") == preds

    # a finished 1-round run extended to 2 rounds ends as the 2-round run
    one = load_config(overrides=tiny_overrides + [f"out_dir={tmp_path / 'extended'}", "rounds=1"])
    assert run(one).summary["rounds_done"] == 1
    extended = run(load_config(overrides=tiny_overrides + [f"out_dir={tmp_path / 'extended'}"]))
    assert extended.resumed_from == 1 and extended.summary == full.summary
    extended_rows = comparable_metrics(_rows(extended.run_dir, "metrics.jsonl"))
    assert extended_rows == comparable_metrics(_rows(rd, "metrics.jsonl"))


def test_a_failing_client_is_reported_and_the_round_continues(tiny_overrides):
    def fail(round, client):
        if round == 2 and client == 1:
            raise ClientFailure("simulated crash")

    res = run(load_config(overrides=tiny_overrides), fail_hook=fail)
    rows = _rows(res.run_dir, "metrics.jsonl")
    failed = [r for r in rows if r["event"] == "client_failed"]
    assert failed == [{"round": 2, "event": "client_failed", "who": "client1", "reason": "simulated crash"}]
    assert res.summary["rounds_done"] == 2
    assert res.summary["failed_steps"] == {"client1": [2]}  # the summary says so, not only metrics.jsonl
    assert res.summary["missing_clients"] == []  # it failed a step but was evaluated in every round
    assert {r["who"] for r in rows if r["event"] == "client_step" and r["round"] == 2} == {"client0"}


def test_too_few_clients_fails_the_round_after_checkpointing(tiny_overrides):
    from fedlada.runner import RoundFailed

    def fail(round, client):
        if round == 2:
            raise ClientFailure("down")

    cfg = load_config(overrides=tiny_overrides + ["min_clients=2"])
    with pytest.raises(RoundFailed, match="only 0 client"):
        run(cfg, fail_hook=fail)
    assert (Path(cfg.out_dir) / "checkpoints" / "round_001" / "COMPLETE").is_file()


def test_a_round_stopped_short_is_not_counted_in_the_summary_or_the_report(tiny_overrides, tmp_path):
    """client0 reports in round 2, client1 fails, min_clients=2: round 2's logged steps (client0's bytes and
    tokens) stay in metrics.jsonl for diagnosis, but the summary and the report count completed rounds only and
    say which round stopped."""
    from fedlada.report import write_report
    from fedlada.runner import RoundFailed, RunDir, summarize_run

    def fail(round, client):
        if round == 2 and client == 1:
            raise ClientFailure("down")

    cfg = load_config(overrides=tiny_overrides + ["min_clients=2", f"out_dir={tmp_path / 'stopped'}"])
    with pytest.raises(RoundFailed, match="only 1 client"):
        run(cfg, fail_hook=fail)
    rows = _rows(tmp_path / "stopped", "metrics.jsonl")
    assert any(r["event"] == "bytes" and r["round"] == 2 for r in rows)  # logged ...
    summary = summarize_run(RunDir(cfg.out_dir), cfg)
    one = [r for r in rows if r["round"] == 1]
    assert summary["rounds_done"] == 1 and summary["failed_steps"] == {}
    assert summary["bytes_client_to_server"] == sum(r["client_to_server"] for r in one if r["event"] == "bytes")
    assert summary["train_tokens_federated"] == sum(r.get("train_tokens", 0) for r in one if r["event"] ==
                                                    "client_step") + sum(r.get("server_train_tokens", 0) for r in
                                                                         one if r["event"] == "server_learn")
    assert summary["stopped_round"] == {"round": 2, "failed": ["client1"]}  # ... and named, not counted
    html = write_report(cfg.out_dir).read_text()
    assert "1 round(s) completed" in html and "round 2 did not complete (client1 failed" in html
    assert "failed its step" not in html
    finished = run(cfg)  # resumed, no failure this time
    assert finished.summary["stopped_round"] is None and finished.summary["rounds_done"] == 2


def _canary_data(tmp_path: Path) -> tuple[list[str], list[str]]:
    """A user-data layout whose client files carry a unique canary string in every record."""
    layout = make_benchmark(tmp_path / "bench", num_clients=2, train_per_client=40, test_per_client=12,
                            public_size=30, general_size=200)
    canaries, overrides = [], []
    for k, c in enumerate(layout.clients):
        for split, path in (("train", c.train), ("test", c.test)):
            recs = []
            for i, r in enumerate(read_records(path)):
                tag = f"CANARY{k}x{split}x{i}Z"
                canaries.append(tag)
                rationale = (r.rationale or "") + f"\nNote {tag}."
                recs.append(type(r)(r.id, f"{r.question} ({tag})", r.answer, rationale, r.domain))
            write_records(recs, tmp_path / f"c{k}_{split}.jsonl")
        overrides += [f"data.clients.{k}.train={tmp_path / f'c{k}_train.jsonl'}",
                      f"data.clients.{k}.test={tmp_path / f'c{k}_test.jsonl'}"]
    return canaries, overrides + [f"data.public={layout.public}", f"data.general={layout.general}"]


def test_no_private_record_leaves_a_client(tiny_overrides, gold_sampler, tmp_path, monkeypatch):
    canaries, data_over = _canary_data(tmp_path)
    # clients listed as a TOML-like list through overrides: build the list first, then set its items
    over = [o for o in tiny_overrides if not o.startswith("data.")] + [
        'data.clients=[{"train": "x", "test": "y"}, {"train": "x", "test": "y"}]'] + data_over + [
        "data.eval_limit=12", "data.holdout_size=6"]
    cfg = load_config(overrides=over)
    data = load_data(cfg)
    gold_sampler(data.public)
    sent: list[bytes] = []
    for cls in (TeachMessage, ReportMessage):
        real = cls.to_bytes

        def spy(self, _real=real):
            b = _real(self)
            sent.append(b)
            return b

        monkeypatch.setattr(cls, "to_bytes", spy)
    res = run(cfg)
    assert res.summary["rounds_done"] == 2
    reports = [b for b in sent if b.startswith(b'{"kind":"report"')]
    assert len(reports) >= 4 and any(json.loads(b)["paths"] for b in reports)
    blob = b"\n".join(sent)
    leaked = [c for c in canaries if c.encode() in blob or b"CANARY" in blob]
    assert leaked == []
    # ...while the canaries really are in what the clients trained on
    assert any("CANARY0xtrainx" in r.question for r in data.clients[0].train)


def test_bad_data_fails_before_any_work(tmp_path, model_cache):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": "a", "question": "", "answer": 2}\nnot json\n')
    public = tmp_path / "public.jsonl"  # (a client's file as the public pool is refused for itself)
    public.write_text(bad.read_text())
    cfg = load_config(overrides=[f"out_dir={tmp_path / 'run'}", 'data.clients=[{"train": "%s", "test": "%s"}]'
                                 % (bad, bad), f"data.public={public}"])
    with pytest.raises(DataError) as e:
        run(cfg)
    msg = str(e.value)
    assert "bad.jsonl:2" in msg and "bad.jsonl:3" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_handles_records_without_step_counts(monkeypatch):
    from fedlada import rounds
    from fedlada.data import Record

    monkeypatch.setattr(rounds, "sample_paths",
                        lambda m, t, prompts, **kw: [["Answer: 7"] if "seven" in p else ["Answer: 1"] for p in prompts])
    side = rounds.Side(None, None, lambda q: q)
    recs = [Record("a", "say seven", "7", "Just say it."), Record("b", "say two", "2", None, "d")]
    out = rounds.evaluate(side, recs, max_new_tokens=4)
    assert out["accuracy"] == 0.5 and out["by_steps"] == {} and out["by_domain"] == {"-": 1.0, "d": 0.0}
    mixed = [Record("c-s2-1", "say seven", "7", "3 + 4 = 7")] + recs  # one record with a count: still no rows
    assert rounds.evaluate(side, mixed, max_new_tokens=4)["by_steps"] == {}
    counted = [Record("c-s2-1", "say seven", "7", "3 + 4 = 7"), Record("d", "say two", "2", "1 + 1 = 2")]
    assert rounds.evaluate(side, counted, max_new_tokens=4)["by_steps"] == {"1": 0.0, "2": 1.0}


def test_local_only_exchanges_nothing_but_empty_messages(tiny_overrides):
    res = run(load_config(overrides=tiny_overrides + ["lada.method=local", "rounds=1"]))
    teach = TeachMessage(round=1, question_ids=())
    clients = load_config(overrides=tiny_overrides).data.num_clients
    assert res.summary["bytes_server_to_client"] == clients * len(teach.to_bytes())
    reports = _rows(res.run_dir, "audit.jsonl")
    assert len(reports) == clients and all(r["paths_on_public_questions"] == 0 and r["path_text_bytes"] == 0
                                           for r in reports)


def test_evaluation_answers_take_data_eval_max_new_tokens(tiny_overrides, monkeypatch):
    import fedlada.runner as runner

    seen = []
    real = runner.evaluate

    def spy(side, records, *, max_new_tokens, **kw):
        seen.append(max_new_tokens)
        return real(side, records, max_new_tokens=max_new_tokens, **kw)

    monkeypatch.setattr(runner, "evaluate", spy)
    run(load_config(overrides=tiny_overrides + ["rounds=1", "lada.method=local", "lada.max_new_tokens=12",
                                                "data.eval_max_new_tokens=20"]))
    assert seen and set(seen) == {20}  # every client's and the LLM's evaluation, rounds 0 and 1


def test_the_summary_lines_name_failed_steps_and_clients_never_evaluated():
    from fedlada.report import failed_step_lines

    lines = failed_step_lines({"failed_steps": {"client1": [2, 3]}, "missing_clients": ["client2"]})
    assert lines[0].startswith("client1 failed its step in round(s) 2, 3") and "'-' where its evaluation" in lines[0]
    assert lines[1].startswith("client2 has no evaluation at all") and len(lines) == 2


def test_a_mean_over_fewer_clients_than_the_run_has_says_so(tmp_path):
    """A client with no evaluation in the last round is not in the mean SLM accuracy: the summary lists it and
    the terminal line says over how many clients the mean is."""
    import io

    from rich.console import Console

    from fedlada.config import load_config
    from fedlada.report import print_summary
    from fedlada.runner import RunDir, summarize_run

    rd = RunDir(tmp_path)
    rows = [{"round": t, "event": "eval", "who": w, "accuracy": a, "n": 10}
            for t in (0, 1) for w, a in (("client0", 0.2), ("client1", 0.4), ("llm", 0.1))]
    rows.append({"round": 0, "event": "eval", "who": "client2", "accuracy": 0.5, "n": 10})  # none in round 1
    rd.append("metrics.jsonl", rows)
    summary = summarize_run(rd, load_config(None, ["data.num_clients=3"]))
    assert summary["mean_slm_left_out"] == ["client2"] and summary["mean_slm_accuracy"] == pytest.approx(0.3)
    out = io.StringIO()
    print_summary(summary, console=Console(file=out, width=200))
    assert "mean SLM accuracy: 0.300 (over 2 of 3 clients: client2 has no evaluation in round 1)" in out.getvalue()


def test_the_summary_table_says_how_many_questions_each_accuracy_is_over(caplog):
    """The table's n column; a client evaluated on a handful of questions is warned about (coarse accuracy that
    counts fully in the mean)."""
    from fedlada.data import Record
    from fedlada.prepare import ClientFiles, warn_small_tests
    from fedlada.report import _table

    head, rows = _table({"accuracy": {"client0": {"0": 0.5, "1": 1.0}, "llm": {"0": 0.25}},
                         "eval_questions": {"client0": 2, "llm": 300}})
    assert head == ["model", "n", "r0", "r1"]
    assert rows == [["client0", "2", "0.500", "1.000"], ["llm", "300", "0.250", "-"]]
    cfg = load_config(overrides=["data.eval_limit=5"])
    tests = [ClientFiles([], [Record(f"t{i}", "q", "1") for i in range(n)]) for n in (2, 40)]
    with caplog.at_level("WARNING"):
        said = warn_small_tests(cfg, tests)
    assert len(said) == 2 and "client 0 is evaluated on 2 question(s) only" in said[0] and "steps of 50" in said[0]
    assert "client 1 is evaluated on 5 question(s)" in said[1]  # data.eval_limit counts
    assert said[0] in caplog.text
    assert warn_small_tests(load_config(overrides=[]), tests[1:]) == []


def test_gold_answers_written_like_a_choice_with_its_option_are_warned_about(caplog):
    from fedlada.data import Record
    from fedlada.prepare import warn_choice_names

    golds = ["B. Paris", "A: Rome", "C. Lima", "D"]
    files = {"data.clients.0.train": [Record(f"r{i}", "q", a) for i, a in enumerate(golds)],
             "data.public": [Record("p", "q", "C. elegans"), Record("p2", "q", "12")]}
    with caplog.at_level("WARNING"):
        said = warn_choice_names(files)
    assert len(said) == 1 and said[0].startswith("data.clients.0.train: 3 of 4 gold answers look like a choice")
    assert "'B. Paris', record 'r0'" in said[0] and said[0] in caplog.text


def test_step_counts_say_what_trained(tiny_overrides, gold_sampler):
    """distill_sft counts the other side's paths SFT trains on: none at mu = 0 (the filter still selects); the server
    reports its listwise groups as the clients do."""
    cfg = load_config(overrides=tiny_overrides + ["rounds=1", "lada.mu=0", "lada.loss=listwise"])
    gold_sampler(load_data(cfg).public)
    rows = _rows(run(cfg).run_dir, "metrics.jsonl")
    steps = [r for r in rows if r["event"] == "client_step"]
    assert steps and any(r["selected"] > 0 for r in steps)
    assert all(r["distill_sft"] == 0 and r.get("train_distill") is None for r in steps)
    learn = [r for r in rows if r["event"] == "server_learn"]
    assert learn and all("server_listwise_groups" in r and r["server_distill_sft"] == 0 for r in learn)


def test_a_set_up_tokenises_the_public_pool_once_per_tokenizer_and_prompt_format(tiny_overrides, monkeypatch):
    """Clients sharing an SLM (and its tokenizer and prompt format) check the public pool's prompts once, and the
    server corpus is digested once; the states are the same as without the memo."""
    from fedlada import prepare, rounds
    from fedlada.runner import Events, build_states

    cfg = load_config(overrides=tiny_overrides + ["data.num_clients=4", "rounds=1"])
    data = prepare.load_data(cfg)
    calls = []
    real = rounds.Side.prompts
    monkeypatch.setattr(rounds.Side, "prompts", lambda self, qs: calls.append(len(qs)) or real(self, qs))
    build_states(cfg, data, Events())
    public_checks = calls.count(len(data.public))
    specs = {(s.hidden_size, s.num_layers, s.num_heads) for s in (cfg.models.slm_for(k) for k in range(4))}
    assert public_checks <= 1 + len(specs)  # the LLM's, then one per distinct SLM (not one per client)
    plain = prepare._records_digest(data.public)
    with prepare.same_data():
        assert prepare._records_digest(data.public) == plain and id(data.public) in prepare._digest_memo
        assert prepare._records_digest(list(data.public)) == plain  # another list: computed, not taken
    assert prepare._digest_memo is None and rounds._lengths_memo is None  # only within a set-up
