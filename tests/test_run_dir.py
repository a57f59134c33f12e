"""The run directory is safe to point anywhere: a folder that is not a run is refused and left alone, a start that
fails writes nothing, a resumed run must see its own config and data, and a finished run is not redone."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlada import runner
from fedlada.config import dump_toml, load_config
from fedlada.data import Record
from fedlada.errors import ConfigError, DataError, FedLadaError
from fedlada.prepare import split_holdout
from fedlada.runner import RunDir, check_data_unchanged, check_run_dir, run


def _fake_run(path: Path, cfg, rounds_done: int) -> None:
    """A run directory as a run with ``rounds_done`` completed rounds leaves it (no models needed)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(dump_toml(cfg))
    for t in range(1, rounds_done + 1):
        d = path / "checkpoints" / f"round_{t:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "COMPLETE").write_text(str(t))


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tiny_overrides, tmp_path):
    mine = tmp_path / "myproject"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "best.pt").write_text("weights")
    (mine / "metrics.jsonl").write_text("{}\n")
    (mine / "config.toml").write_text('[tool]\nname = "not a run"\n')
    before = sorted((p.relative_to(mine), p.read_text()) for p in mine.rglob("*") if p.is_file())
    with pytest.raises(ConfigError, match="not a FedLaDa run directory"):
        run(load_config(overrides=tiny_overrides + [f"out_dir={mine}"]))
    assert sorted((p.relative_to(mine), p.read_text()) for p in mine.rglob("*") if p.is_file()) == before

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        run(load_config(overrides=tiny_overrides + [f"out_dir={afile}"]))
    assert afile.read_text() == "x"


def test_a_start_that_fails_on_its_data_writes_nothing(tiny_overrides, tmp_path):
    out = tmp_path / "new-run"
    cfg = load_config(overrides=tiny_overrides + [f"out_dir={out}", f"data.public={tmp_path / 'missing.jsonl'}",
                                                  'data.clients=[{"train": "%s", "test": "%s"}]'
                                                  % (tmp_path / "t.jsonl", tmp_path / "t.jsonl")])
    with pytest.raises(FedLadaError, match="missing.jsonl"):
        run(cfg)
    assert not out.exists()


def test_a_directory_given_as_a_data_file_names_the_key(tiny_overrides, tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"id": "1", "question": "q", "answer": "1"}) + "\n")
    cfg = load_config(overrides=tiny_overrides + [f"data.public={good}",
                                                  'data.clients=[{"train": "%s", "test": "%s"}]' % (tmp_path, good)])
    with pytest.raises(ConfigError, match=r"'data.clients.0.train': expected a data file, found the directory"):
        run(cfg)


def test_resuming_with_another_config_names_the_keys_that_differ(tiny_overrides, tmp_path):
    cfg = load_config(overrides=tiny_overrides)
    _fake_run(Path(cfg.out_dir), cfg, rounds_done=1)
    assert check_run_dir(cfg, resume=True)[1] == 1
    other = load_config(overrides=tiny_overrides + ["rounds=3", "lada.budget=0.3"])
    with pytest.raises(ConfigError, match=r"differs in: lada.budget\); use"):  # a larger rounds alone is allowed
        check_run_dir(other, resume=True)
    flower = load_config(overrides=tiny_overrides + ["engine=flower"])
    with pytest.raises(ConfigError, match=r"differs in: engine\) \(it ran with engine = 'inprocess': resume it with "
                                          r"--engine inprocess\)"):
        check_run_dir(flower, resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(cfg, resume=False)
    # more rounds only: the run is extended from where it is
    assert check_run_dir(load_config(overrides=tiny_overrides + ["rounds=3"]), resume=True)[1] == 1
    _fake_run(Path(cfg.out_dir), cfg, rounds_done=2)
    with pytest.raises(ConfigError, match="holds 2 completed rounds, more than rounds=1"):
        check_run_dir(load_config(overrides=tiny_overrides + ["rounds=1"]), resume=True)
    # an earlier start that completed no round is simply started over
    cfg0 = load_config(overrides=tiny_overrides + [f"out_dir={tmp_path / 'r0'}"])
    _fake_run(tmp_path / "r0", cfg0, rounds_done=0)
    changed = load_config(overrides=tiny_overrides + [f"out_dir={tmp_path / 'r0'}", "rounds=4"])
    assert check_run_dir(changed, resume=True)[1] == 0


def test_a_new_run_whose_models_fail_leaves_no_run_folder(tiny_overrides, tmp_path):
    from fedlada.errors import ModelError

    cfg = load_config(overrides=tiny_overrides + [f"models.llm.source={tmp_path / 'no-such-model'}"])
    with pytest.raises(ModelError, match="no-such-model does not exist"):
        run(cfg)
    assert not Path(cfg.out_dir).exists()  # not a folder with a config.toml and empty logs
    Path(cfg.out_dir).mkdir()  # a folder the user made stays, empty
    with pytest.raises(ModelError):
        run(cfg)
    assert Path(cfg.out_dir).is_dir() and not any(Path(cfg.out_dir).iterdir())
    # a nested --out: the parents this start made go too, a parent that was there stays
    (tmp_path / "kept").mkdir()
    nested = load_config(overrides=tiny_overrides + [f"models.llm.source={tmp_path / 'no-such-model'}",
                                                     f"out_dir={tmp_path / 'kept' / 'a' / 'b' / 'run'}"])
    with pytest.raises(ModelError):
        run(nested)
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_a_resumed_run_must_see_the_data_it_started_with(tmp_path):
    rd = RunDir(tmp_path)
    rd.append("metrics.jsonl", [{"round": 0, "event": "setup", "data_digest": "aaaa"}])
    check_data_unchanged(rd, "aaaa")
    check_data_unchanged(RunDir(tmp_path / "older"), "bbbb")  # no digest recorded: nothing to compare
    with pytest.raises(ConfigError, match="the data changed since this run started"):
        check_data_unchanged(rd, "bbbb")
    # with the data at hand, the error says which client's records changed, or that the shared files did
    from fedlada.prepare import ClientFiles, FederatedData, client_digest

    a, b = Record("a", "What is 1 + 1?", "2"), Record("b", "What is 2 + 2?", "4")
    clients = [ClientFiles([a], [b]), ClientFiles([b], [a])]
    rd2 = RunDir(tmp_path / "two")
    rd2.path.mkdir()
    rd2.append("metrics.jsonl", [{"round": 0, "event": "setup", "data_digest": "aaaa",
                                  "clients": [{"data_digest": client_digest(c)} for c in clients]}])
    with pytest.raises(ConfigError, match=r"the train/test records of client\(s\) 1 changed"):
        check_data_unchanged(rd2, "bbbb", FederatedData([clients[0], ClientFiles([a], [a])], [a], [], {}))
    with pytest.raises(ConfigError, match="the public pool or the general corpus"):
        check_data_unchanged(rd2, "bbbb", FederatedData(clients, [b], [], {}))


def test_a_resumed_flower_run_checks_each_nodes_own_data(tmp_path):
    from fedlada.runner import check_clients_unchanged

    rd = RunDir(tmp_path)
    rd.append("metrics.jsonl", [{"round": 0, "event": "setup",
                                 "clients": [{"train": 5, "data_digest": "c0"}, {"train": 5, "data_digest": "c1"}]}])
    check_clients_unchanged(rd, {0: "c0", 1: "c1"})
    check_clients_unchanged(rd, {0: "c0", 1: None})  # a node from before digests were kept
    with pytest.raises(ConfigError, match=r"the data of client\(s\) 1 changed since this run started"):
        check_clients_unchanged(rd, {0: "c0", 1: "other"})


def test_min_clients_above_the_number_of_clients_fails_up_front(tiny_overrides, monkeypatch):
    monkeypatch.setattr(runner, "build_states", lambda *a, **k: pytest.fail("models prepared"))
    with pytest.raises(ConfigError, match="'min_clients': expected at most the number of clients \\(2\\)"):
        run(load_config(overrides=tiny_overrides + ["min_clients=3"]))


def test_a_finished_run_is_not_prepared_or_run_again(tiny_overrides, monkeypatch):
    cfg = load_config(overrides=tiny_overrides)
    _fake_run(Path(cfg.out_dir), cfg, rounds_done=cfg.rounds)
    summary = {"method": "lada", "rounds_done": cfg.rounds, "mean_slm_accuracy": 0.5}
    (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary))
    digest = runner.data_digest(runner.load_data(cfg))
    RunDir(cfg.out_dir).append("metrics.jsonl", [{"round": 0, "event": "setup", "data_digest": digest}])
    monkeypatch.setattr(runner, "build_states", lambda *a, **k: pytest.fail("models prepared"))
    res = run(cfg)
    assert res.summary == summary and res.resumed_from == cfg.rounds
    # the same folder and config over other data: its summary is not this data's result
    monkeypatch.setattr(runner, "data_digest", lambda data: "another")
    with pytest.raises(ConfigError, match="the data changed since this run started"):
        run(cfg)


def test_a_one_record_train_split_keeps_its_record():
    recs = [Record(str(i), "q", "1") for i in range(10)]
    assert split_holdout(recs[:1], size=64, seed=0) == (recs[:1], [])
    train, hold = split_holdout(recs, size=64, seed=0)
    assert len(hold) == 2 and sorted(r.id for r in train + hold) == sorted(r.id for r in recs)


def test_out_dir_spelled_otherwise_still_resumes(tiny_overrides, tmp_path):
    cfg = load_config(overrides=tiny_overrides)
    _fake_run(Path(cfg.out_dir), cfg, rounds_done=1)
    slash = load_config(overrides=tiny_overrides + [f"out_dir={cfg.out_dir}/"])
    assert check_run_dir(slash, resume=True)[1] == 1
    moved = tmp_path / "moved"
    Path(cfg.out_dir).rename(moved)
    assert check_run_dir(load_config(overrides=tiny_overrides + [f"out_dir={moved}"]), resume=True)[1] == 1


def test_a_torn_last_line_is_dropped_and_a_damaged_line_is_named(tmp_path, caplog):
    """A process killed while appending leaves half a line at the end: reading drops it (one warning, however often
    the file is read), rewriting the file for a resume removes it; a damaged line elsewhere is an error naming the
    file and line."""
    from fedlada.report import read_jsonl

    rd = RunDir(tmp_path)
    rd.append("metrics.jsonl", [{"round": 0, "event": "setup"}, {"round": 1, "event": "eval", "who": "llm"}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "eval", "rou')
    assert rd.read("metrics.jsonl") == [{"event": "setup", "round": 0}, {"event": "eval", "round": 1, "who": "llm"}]
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == rd.read("metrics.jsonl")  # a str path too
    assert sum("line 3 is incomplete" in r.getMessage() for r in caplog.records) == 1
    rd.truncate_after("metrics.jsonl", 1)
    assert (tmp_path / "metrics.jsonl").read_text().endswith('"who": "llm"}\n')
    rd.append("metrics.jsonl", [{"round": 2, "event": "eval"}])
    assert [r["round"] for r in rd.read("metrics.jsonl")] == [0, 1, 2]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(FedLadaError, match=r"metrics.jsonl:2: not a JSON object"):
        rd.read("metrics.jsonl")


def test_data_files_named_without_clients_are_refused(tiny_overrides, tmp_path):
    for key in ("public", "general"):
        with pytest.raises(ConfigError, match=f"'data.{key}': expected no file without data.clients"):
            load_config(overrides=tiny_overrides + [f"data.{key}={tmp_path / 'p.jsonl'}"])


def test_a_question_too_long_for_max_length_fails_before_any_round_naming_file_and_id(tiny_overrides, tmp_path):
    rows = [{"id": f"q{i}", "question": f"What is {i} + 2?", "answer": str(i + 2), "rationale": f"{i} + 2 = {i + 2}"}
            for i in range(40)]
    long = {"id": "very-long", "question": "Count the boxes. " * 60 + "What is 3 + 4?", "answer": "7"}
    longer = {**long, "id": "longer", "question": "Count the pens. " * 70 + "What is 3 + 4?"}
    for name, recs in (("train.jsonl", rows[:20] + [long]), ("train1.jsonl", rows[:20] + [longer]),
                       ("test.jsonl", rows[20:30]), ("public.jsonl", rows[30:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "run-long"
    cfg = load_config(overrides=tiny_overrides + [
        f"out_dir={out}", f"data.public={tmp_path / 'public.jsonl'}", "data.holdout_size=4", "train.max_length=64",
        'data.clients=[{"train": "%s", "test": "%s"}, {"train": "%s", "test": "%s"}]' % (
            tmp_path / "train.jsonl", tmp_path / "test.jsonl", tmp_path / "train1.jsonl", tmp_path / "test.jsonl")])
    # every client's too-long questions at once
    with pytest.raises(DataError, match=r"data.clients.0.train \(.*train.jsonl\): 1 question\(s\) whose prompt for "
                                        r"client 0's SLM leaves no room .* 'very-long' \(\d+ tokens\).*; "
                                        r"data.clients.1.train \(.*train1.jsonl\): .* client 1's SLM .* 'longer'"):
        run(cfg)
    assert not out.exists()  # before round 0: the new run's folder is not left behind


def test_a_public_question_too_long_is_named_before_a_tiny_model_is_pretrained(tiny_overrides, tmp_path,
                                                                                monkeypatch, caplog):
    import fedlada.train

    rows = [{"id": f"q{i}", "question": f"What is {i} + 2?", "answer": str(i + 2), "rationale": f"{i} + 2 = {i + 2}"}
            for i in range(30)]
    long = {"id": "very-long", "question": "Count the boxes. " * 60 + "What is 3 + 4?", "answer": "7"}
    for name, recs in (("train.jsonl", rows[:10]), ("test.jsonl", rows[10:20]), ("public.jsonl", rows[20:] + [long]),
                       ("general.jsonl", rows[20:] + [dict(long, id="long-general")])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    over = tiny_overrides + [f"models.cache_dir={tmp_path / 'cache'}", "train.max_length=64",
                             'data.clients=[{"train": "%s", "test": "%s"}]' % (tmp_path / "train.jsonl",
                                                                             tmp_path / "test.jsonl")]
    monkeypatch.setattr(fedlada.train, "train", lambda *a, **k: pytest.fail("pretrained"))
    with pytest.raises(DataError, match=r"data.public \(.*public.jsonl\): 1 question\(s\) whose prompt for the tiny "
                                        r"model 'llm' leaves no room .* 'very-long'"):
        run(load_config(overrides=over + [f"data.public={tmp_path / 'public.jsonl'}"]))
    # a general-corpus record that long is only left out of pretraining
    from fedlada.models import PromptFormatter, train_tokenizer
    from fedlada.prepare import _fitting
    from fedlada.data import read_records

    general = read_records(tmp_path / "general.jsonl")
    tok = train_tokenizer([r.question for r in general], vocab_size=300)
    fmt = PromptFormatter(tok, use_chat_template="off")
    with caplog.at_level(logging.WARNING, logger="fedlada.prepare"):
        assert [r.id for r in _fitting(general, fmt, tok, 64)] == [r.id for r in general[:-1]]
        assert [r.id for r in _fitting(general, fmt, tok, 64)] == [r.id for r in general[:-1]]  # a second model
    said = [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]
    assert len(said) == 1 and "'long-general'" in said[0]  # said once, not once per model


def test_test_questions_seen_in_train_or_the_pool_are_warned_about(caplog):
    from fedlada.prepare import ClientFiles, warn_test_overlap

    recs = [Record(f"r{i}", f"What is {i} + 1?", str(i + 1)) for i in range(6)]
    clients = [ClientFiles(recs[:3], [recs[2], Record("t", "what is  0 + 1?", "1"), recs[5]]),
               ClientFiles(recs[:2], recs[3:5])]
    with caplog.at_level("WARNING"):
        lines = warn_test_overlap(clients, public=recs[5:], general=recs[4:5])
    assert lines == ["data.clients.0.test: 2 of its 3 records ask a question that is also in its train split; their "
                     "accuracy is not held out",
                     "data.clients.0.test: 1 of its 3 records ask a question that is also in the public pool; their "
                     "accuracy is not held out",
                     "data.clients.1.test: 1 of its 2 records ask a question that is also in the general corpus "
                     "(data.general); their accuracy is not held out"]
    assert lines == [r.getMessage() for r in caplog.records]


def test_a_client_file_as_the_public_pool_or_general_corpus_is_refused(tmp_path):
    """The server pretrains on data.general and sends paths on data.public: a client's own file there (by any
    path, a symlink too) would make its private records public or pretrain on its test set."""
    from fedlada.prepare import load_data

    rec = '{"id": "%s", "question": "What is %d + 1?", "answer": "%d"}\n'
    for name in ("train", "test", "public"):
        (tmp_path / f"{name}.jsonl").write_text("".join(rec % (f"{name}{i}", i, i + 1) for i in range(5)))
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "test.jsonl")
    base = ["data.clients=" + json.dumps([{"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}])]
    for key, path, whose in (("data.public", "train.jsonl", "data.clients.0.train"),
                             ("data.general", "link.jsonl", "data.clients.0.test")):
        public = [] if key == "data.public" else [f"data.public={tmp_path / 'public.jsonl'}"]
        cfg = load_config(overrides=base + public + [f"{key}={tmp_path / path}"])
        with pytest.raises(ConfigError, match=rf"config key '{key}': .*{path} is the file of {whose}, a client's "
                                              "private data"):
            load_data(cfg)
    assert len(load_data(load_config(overrides=base + [f"data.public={tmp_path / 'public.jsonl'}"])).public) == 5


def test_many_clients_warnings_are_summed_up_after_the_first_few(caplog):
    """40 clients with overlapping test questions, or paths cut by train.max_length, gave 40-80 warning lines before
    the first useful one: the first few are said, the rest counted in one line naming the files."""
    from fedlada.models import PromptFormatter, train_tokenizer
    from fedlada.prepare import SAID_PER_CLIENT, ClientFiles, warn_test_overlap
    from fedlada.rounds import Side, _warn_cut_paths, same_records

    recs = [Record(f"r{i}", f"What is {i} + 1?", str(i + 1), "one step " * 20) for i in range(3)]
    clients = [ClientFiles(recs, recs[:1]) for _ in range(10)]
    with caplog.at_level("WARNING"):
        lines = warn_test_overlap(clients, public=[])
    said = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and said[:SAID_PER_CLIENT] == lines[:SAID_PER_CLIENT]
    assert len(said) == SAID_PER_CLIENT + 1 and said[-1].startswith("... and 4 more such warning(s), for "
                                                                      "data.clients.6.test, data.clients.7.test")
    caplog.clear()
    tok = train_tokenizer([r.question + r.rationale for r in recs], vocab_size=120)
    side = Side(None, tok, PromptFormatter(tok, use_chat_template="off"))
    with caplog.at_level("WARNING"), same_records():
        for k in range(10):
            _warn_cut_paths(side, f"data.clients.{k}.train", recs, [5, 5, 5], max_length=8, who="an SLM")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == SAID_PER_CLIENT + 1 and said[-1] == ("... and 4 more file(s) with paths cut by "
                                                             "train.max_length: data.clients.6.train, "
                                                             "data.clients.7.train, data.clients.8.train, "
                                                             "data.clients.9.train")


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    import torch

    from fedlada.models import build_tiny_model, train_tokenizer
    from fedlada.runner import load_trainable

    tok = train_tokenizer(["Question: 1 + 1\nReasoning:\n1 + 1 = 2\nAnswer: 2"] * 4, vocab_size=280)
    small, big = (build_tiny_model(tok, hidden_size=h, num_layers=1, num_heads=2, seed=0) for h in (16, 32))
    torch.save(small.state_dict(), tmp_path / "client_0.pt")
    with pytest.raises(ConfigError, match=r"client_0.pt does not fit client 0's model \(\d+ of another shape, e.g. "
                                          r"model.embed_tokens.weight .*the model changed since the run started"):
        load_trainable(big, tmp_path / "client_0.pt", "client 0")
    other = build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    load_trainable(other, tmp_path / "client_0.pt", "client 0")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), small.state_dict().values()))
    torch.save({"lora.weight": torch.zeros(2)}, tmp_path / "llm.pt")
    with pytest.raises(ConfigError, match=r"1 unknown weight\(s\), e.g. lora.weight"):
        load_trainable(other, tmp_path / "llm.pt", "the LLM")


def test_a_federated_server_reads_no_client_train_file(tmp_path, caplog):
    from fedlada.prepare import load_server_data

    rows = [{"id": f"q{i}", "question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(12)]
    (tmp_path / "public.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (tmp_path / "c0_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:9]))
    clients = [{"train": str(tmp_path / f"c{k}_train.jsonl"), "test": str(tmp_path / f"c{k}_test.jsonl")}
               for k in range(2)]  # no train file exists here, nor client 1's test file
    cfg = load_config(overrides=[f"data.public={tmp_path / 'public.jsonl'}", f"data.clients={json.dumps(clients)}",
                                 f"out_dir={tmp_path / 'run'}"])
    with caplog.at_level("WARNING"):
        data = load_server_data(cfg)
    assert [len(c.train) for c in data.clients] == [0, 0] and [len(c.test) for c in data.clients] == [3, 0]
    assert len(data.public) == 6
    assert "not evaluated on the domain of client 1" in caplog.text
    with pytest.raises(DataError, match="c0_train.jsonl: file not found"):  # what the in-process runner reads
        runner.load_data(cfg)


def test_train_records_whose_path_is_cut_by_max_length_are_warned_about(caplog):
    from fedlada.models import PromptFormatter, train_tokenizer
    from fedlada.rounds import Side, check_prompts_fit

    short = Record("short", "What is 1 + 1?", "2", "1 + 1 = 2")
    long = Record("long", "What is 1 + 1?", "2", "\n".join(["1 + 1 = 2"] * 80))
    tok = train_tokenizer([long.question, long.rationale, "Answer: 2"], vocab_size=300)
    side = Side(None, tok, PromptFormatter(tok, use_chat_template="off"))
    with caplog.at_level(logging.WARNING, logger="fedlada.rounds"):
        check_prompts_fit(side, {"data.clients.0.train (t.jsonl)": [short, long], "data.public (p.jsonl)": [long]},
                          max_length=64, who="client 0's SLM", trained="data.clients.0.train (t.jsonl)")
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("data.clients.0.train (t.jsonl): 1 of 2 record(s) are longer than train.max_length=64")
    assert "'long'" in warning and "answer line is not trained on" in warning


def test_a_run_folder_in_use_by_another_process_is_refused_and_an_extension_drops_the_old_summary(tmp_path):
    import subprocess
    import sys

    from fedlada.runner import LOCK_NAME, init_run_dir

    rd = RunDir(tmp_path / "run")
    rd.lock()  # this process runs in it
    holder = subprocess.run([sys.executable, "-c", "from fedlada.runner import RunDir\nRunDir(%r).lock()" % str(rd.path)],
                            capture_output=True, text=True)
    assert holder.returncode != 0 and f"is in use by another process (pid {os.getpid()})" in holder.stderr
    rd.unlock()
    free = subprocess.run([sys.executable, "-c", "from fedlada.runner import RunDir\nRunDir(%r).lock()" % str(rd.path)],
                          capture_output=True, text=True)
    assert free.returncode == 0, free.stderr
    # the lock file alone does not make the folder "not empty": it is still a new run's folder
    cfg = load_config(overrides=[f"out_dir={rd.path}", "rounds=3"])
    assert [p.name for p in rd.path.iterdir()] == [LOCK_NAME] and check_run_dir(cfg, resume=True)[1] == 0
    # extending a finished run: its summary.json goes until the new last round is done
    (rd.path / "summary.json").write_text("{}")
    init_run_dir(rd, cfg, 2)
    assert not (rd.path / "summary.json").exists()


def test_checkpoint_files_are_written_durably_and_a_damaged_one_is_named_with_the_way_to_resume(tmp_path):
    import torch

    from fedlada import checkpoints
    from fedlada.errors import FedLadaError

    d = tmp_path / "checkpoints" / "round_002"
    d.mkdir(parents=True)
    checkpoints.save({"w": torch.ones(3)}, d / "client_0.pt")
    assert torch.equal(checkpoints.load(d / "client_0.pt")["w"], torch.ones(3))
    data = (d / "client_0.pt").read_bytes()
    (d / "client_0.pt").write_bytes(data[: len(data) // 2])  # cut short
    (d / "server_state.pt").write_bytes(b"")
    for name, fragment in (("client_0.pt", "is unreadable"), ("server_state.pt", "is unreadable"),
                           ("client_1.pt", "is missing")):
        with pytest.raises(ConfigError, match=rf"checkpoint file .*{name} {fragment}.*delete .*round_002 to resume "
                                              r"from the round before it"):
            checkpoints.load(d / name, weights_only=name != "server_state.pt")
    with pytest.raises(FedLadaError, match=r"cannot write checkpoint file .*nowhere.*same command resumes"):
        checkpoints.save({"w": torch.ones(3)}, tmp_path / "nowhere" / "x.pt")
    checkpoints.mark_complete(d, 2)
    assert (d / "COMPLETE").read_text() == "2"


def test_a_checkpoint_write_that_fails_midway_names_the_os_reason(tmp_path):
    """torch's zip writer turns a failed write into a RuntimeError about stream positions: the message keeps the
    operating system's reason instead (here a file-size limit, as a full disk would give 'No space left')."""
    script = (
        "import resource, signal, sys, torch\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))\n"
        "from fedlada import checkpoints\n"
        "try:\n"
        "    checkpoints.save({'w': torch.zeros(100_000)}, sys.argv[1])\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("FedLadaError cannot write checkpoint file"), out.stdout
    assert "File too large" in out.stdout and "enforce fail" not in out.stdout, out.stdout


def test_a_changed_cached_benchmark_is_generated_again(tmp_path, caplog):
    from fedlada.prepare import load_data

    cfg = load_config(overrides=[f"models.cache_dir={tmp_path / 'cache'}", "data.train_per_client=30",
                                 "data.test_per_client=10", "data.public_size=20", "data.general_size=0"])
    first = load_data(cfg)
    train = Path(first.source["benchmark"]) / "client_0" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:5]))  # cut short by hand
    with caplog.at_level(logging.WARNING, logger="fedlada.prepare"):
        again = load_data(cfg)
    assert "client_0/train.jsonl differs from its manifest" in caplog.text
    assert [r.id for r in again.clients[0].train] == [r.id for r in first.clients[0].train]


def test_a_cache_that_is_a_file_or_cannot_be_written_is_named_with_the_way_out(tmp_path, monkeypatch):
    from fedlada import prepare

    afile = tmp_path / "cache-file"
    afile.write_text("x")
    monkeypatch.setenv("FEDLADA_CACHE", str(afile))
    with pytest.raises(ConfigError, match=r"the cache .*cache-file \(\$FEDLADA_CACHE\) is a file, not a folder"):
        prepare.cache_root(load_config())
    with pytest.raises(ConfigError, match=r"cannot write the cache .*: Permission denied: .*x; make it writable"):
        with prepare._writing_cache(tmp_path):
            raise PermissionError(13, "Permission denied", str(tmp_path / "x"))


def test_metrics_files_stay_strict_json(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    rd.append("metrics.jsonl", [{"round": 1, "filter_fit": {"explore_mse": float("nan"), "pool": [1.0, float("inf")]}}])
    line = (rd.path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"round": 1, "filter_fit": {"explore_mse": None, "pool": [1.0, None]}}


def test_a_resumed_lora_model_must_keep_its_base_weights(tiny_overrides, tmp_path):
    import torch

    from fedlada import prepare
    from fedlada.models import save_model

    cfg = load_config(overrides=tiny_overrides)
    model, tok, _ = prepare.prepare_model(cfg.models.slms[0], role="slm0", cfg=cfg, data=prepare.load_data(cfg))
    save_model(model, tok, tmp_path / "slm")
    own = tiny_overrides + [f"models.slms.0.source={tmp_path / 'slm'}", "models.slms.0.lora=true",
                            "models.slms.0.lora_r=2", "data.num_clients=1", "out_dir=" + str(tmp_path / "run")]
    run(load_config(overrides=own), stop_after_round=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_model(model, tok, tmp_path / "slm")  # the same folder, other weights
    with pytest.raises(ConfigError, match=r"the base weights of client0's SLM \(models source .*slm'\) changed since "
                                          r"this run started .*restore that model"):
        run(load_config(overrides=own))


def test_export_writes_a_trained_model_as_a_plain_folder(tiny_overrides, gold_sampler, tmp_path, monkeypatch):
    import torch

    from fedlada import checkpoints, prepare
    from fedlada import models as models_mod
    from fedlada.export import export_model
    from fedlada.models import load_model

    cfg = load_config(overrides=tiny_overrides + ["rounds=1", "data.num_clients=2"])
    gold_sampler(prepare.load_data(cfg).public)  # correct paths on both sides: the LLM's adapters train
    res = run(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("server_train_steps") for r in rows)
    ckpt = res.run_dir / "checkpoints" / "round_001"
    # a fully fine-tuned SLM: the folder holds exactly the checkpoint's weights
    out = export_model(res.run_dir, "client1", tmp_path / "slm")
    slm, _ = load_model(out)
    saved = checkpoints.load(ckpt / "client_1.pt")
    mine = slm.state_dict()
    assert saved and all(torch.equal(mine[k], v) for k, v in saved.items())
    record = json.loads((out / "fedlada_export.json").read_text())
    assert record["round"] == 1 and record["model"] == "client1"
    assert record["accuracy"] == res.summary["final"]["client1"]
    # the LoRA LLM: adapters merged, same outputs as the run's model (base + checkpoint), unlike the base alone
    llm_dir = export_model(res.run_dir, "llm", tmp_path / "llm")
    merged, tok = load_model(llm_dir)
    model, _, _ = prepare.prepare_model(cfg.models.llm, role="llm", cfg=cfg, data=prepare.load_data(cfg))
    ids = torch.tensor([tok("Question: 2 apples and 3 pears. How many fruits?")["input_ids"]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        runner.load_trainable(model, ckpt / "llm.pt", "the LLM")
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(merged(input_ids=ids).logits, base, atol=1e-4)
    assert not any(n for n, _ in merged.named_parameters() if "lora_" in n)
    for who, kw, match in (("client9", {}, r"the run has 2 client\(s\)"), ("bob", {}, "expected 'llm', 'client<K>'"),
                           ("slm", {}, r"host.name='fedcollm' only; this run's host is 'none'"),
                           ("llm", {"round": 2}, r"holds completed rounds 1..1")):
        with pytest.raises(ConfigError, match=match):
            export_model(res.run_dir, who, tmp_path / "x", **kw)
    with pytest.raises(ConfigError, match="expected a new or empty folder"):
        export_model(res.run_dir, "llm", llm_dir)
    assert not (tmp_path / "x").exists()
    # a full disk while writing (safetensors' own error) into a folder that was empty: one line, the folder emptied
    empty = tmp_path / "empty"
    empty.mkdir()
    full = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    real_save = models_mod.save_model

    def disk_full(model, tok, folder):  # a first file written, then the disk is full
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{}")
        raise full

    monkeypatch.setattr(models_mod, "save_model", disk_full)
    with pytest.raises(ConfigError, match=r"--out .*empty: cannot write the model .*No space left on device"):
        export_model(res.run_dir, "client1", empty)
    assert empty.is_dir() and not any(empty.iterdir())
    # another export into the same folder finishes first: this one is refused and leaves the other's files alone

    def raced(model, tok, folder):
        real_save(model, tok, folder)
        (Path(folder).parent / "fedlada_export.json").write_text('{"model": "the other one"}')

    monkeypatch.setattr(models_mod, "save_model", raced)
    with pytest.raises(ConfigError, match="another export wrote a model there meanwhile"):
        export_model(res.run_dir, "client1", empty)
    assert [p.name for p in empty.iterdir()] == ["fedlada_export.json"]
    (empty / "fedlada_export.json").unlink()
    monkeypatch.setattr(models_mod, "save_model", real_save)
    assert (export_model(res.run_dir, "client1", empty) / "fedlada_export.json").is_file()  # the same command again
    # an export killed (-9) while moving its files leaves part of a model and its work folder: the work folder of a
    # dead process is cleared, and the refusal says what the folder holds
    killed = tmp_path / "killed"
    (killed / ".export-999999999").mkdir(parents=True)
    (killed / ".export-999999999" / "model.safetensors").write_bytes(b"x")
    assert export_model(res.run_dir, "client1", killed) == killed and not (killed / ".export-999999999").exists()
    (killed / "fedlada_export.json").unlink()
    with pytest.raises(ConfigError, match=r"holds part of a model but no fedlada_export.json.*delete the folder"):
        export_model(res.run_dir, "client1", killed)
    # a damaged checkpoint: export names it (resuming advice does not apply here)
    (ckpt / "client_0.pt").write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError, match=r"checkpoint file .*client_0.pt is unreadable") as err:
        export_model(res.run_dir, "client0", tmp_path / "y")
    assert "to resume" not in str(err.value)  # the resuming advice is not for an export
    assert not (tmp_path / "y").exists()


def test_a_run_that_another_process_finished_while_this_one_loaded_its_data_is_left_alone(tiny_overrides,
                                                                                           monkeypatch):
    """The folder is checked before the data loads (a start that fails on its data changes nothing) and again once
    locked: a run another process finished in it meanwhile is not cleared as "a new run's folder"."""
    cfg = load_config(overrides=tiny_overrides + ["rounds=1"])
    real_load = runner.load_data

    def slow_load(c):  # meanwhile another process ran 2 rounds into the folder and finished
        _fake_run(Path(cfg.out_dir), load_config(overrides=tiny_overrides + ["rounds=2"]), rounds_done=2)
        (Path(cfg.out_dir) / "summary.json").write_text("{}")
        return real_load(c)

    monkeypatch.setattr(runner, "build_states", lambda *a, **k: pytest.fail("models prepared"))
    with pytest.raises(ConfigError, match="holds 2 completed rounds, more than rounds=1|changed while this run"):
        runner.begin_run(cfg, resume=True, events=runner.Events(), t_start=0.0, load=slow_load)
    out = Path(cfg.out_dir)
    assert (out / "summary.json").is_file() and (out / "checkpoints" / "round_002" / "COMPLETE").is_file()


def test_resuming_needs_the_metrics_of_every_checkpointed_round(tiny_overrides):
    """A metrics.jsonl cut short would lose rounds from the extended run's summary: refused, naming the rounds."""
    cfg = load_config(overrides=tiny_overrides + ["rounds=3"])
    out = Path(cfg.out_dir)
    _fake_run(out, cfg, rounds_done=2)
    digest = runner.data_digest(runner.load_data(cfg))
    rows = [{"round": 0, "event": "setup", "data_digest": digest},
            {"round": 0, "event": "eval", "who": "llm", "accuracy": 0.1}] + [
        row for t in (1, 2) for row in ({"round": t, "event": "eval", "who": "llm", "accuracy": 0.1},
                                        {"round": t, "event": "round_time", "seconds": 1.0})]
    RunDir(out).append("metrics.jsonl", rows[:-2])  # round 2's rows lost
    with pytest.raises(ConfigError, match=r"metrics.jsonl lacks the rows of round\(s\) 2, although the checkpoints "
                                          r"hold rounds 1..2"):
        run(cfg)
    assert (out / "checkpoints" / "round_002" / "COMPLETE").is_file()  # nothing changed
    RunDir(out).append("metrics.jsonl", rows[-2:])
    RunDir(out).append("audit.jsonl", [{"round": t, "client": 0} for t in (1, 2)])
    runner.check_metrics_complete(RunDir(out), 2)  # complete now


def test_the_cache_survives_full_disks_kills_races_and_damage(tiny_overrides, monkeypatch):
    from fedlada import prepare
    from fedlada.errors import ModelError

    cfg = load_config(overrides=tiny_overrides)
    root = prepare.cache_root(cfg)
    # a full disk while saving a model (safetensors' own error): one line, no temporary folder left
    tmp = root / "models" / f"entry.tmp{os.getpid()}"
    with pytest.raises(ConfigError, match=r"cannot write the cache .*No space left on device"):
        with prepare._writing_cache(root, tmp):
            tmp.mkdir(parents=True)
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert not tmp.exists()
    # a process killed while writing left its temporary folder: the next writer removes it (a live one's stays)
    # (hours ago: a fresh folder may be a process in another container's, whose pid this one cannot see)
    dead, live = root / "tokenizers" / "a.tmp999999999", root / "tokenizers" / f"b.tmp{os.getppid()}"
    fresh = root / "tokenizers" / "c.tmp999999998"
    for d in (dead, live, fresh):
        d.mkdir(parents=True)
    hours_ago = time.time() - prepare.STALE_AFTER_S - 60
    for d in (dead, live):
        os.utime(d, (hours_ago, hours_ago))
    with prepare._writing_cache(root):
        pass
    assert not dead.exists() and live.exists() and fresh.exists()
    # two processes publishing one entry: the second's rename fails because the first's is there; not an error
    final, mine = root / "data" / "x", root / "data" / "x.tmp1"
    mine.mkdir(parents=True)
    real_replace = Path.replace

    def raced(self, target):
        Path(target).mkdir()
        (Path(target) / "f").write_text("theirs")
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(Path, "replace", raced)
    prepare._publish(mine, final)
    monkeypatch.setattr(Path, "replace", real_replace)
    assert (final / "f").read_text() == "theirs" and not mine.exists()
    # an incomplete entry (a file deleted by hand) is built again, not kept over the new copy
    data = prepare.load_data(cfg)
    _, key = prepare.prepare_tokenizer(cfg, data, vocab_size=128)
    (root / "tokenizers" / key / "tokenizer.json").unlink()
    assert prepare.prepare_tokenizer(cfg, data, vocab_size=128)[1] == key
    assert (root / "tokenizers" / key / "tokenizer.json").is_file()
    bench = Path(data.source["benchmark"])
    (bench / "manifest.json").unlink()
    (bench / "public.jsonl").write_text("")
    assert prepare.load_data(cfg).public == data.public and (bench / "manifest.json").is_file()
    # a damaged cached tokenizer is named with the way out
    (root / "tokenizers" / key / "tokenizer.json").write_text('{"trunc')
    with pytest.raises(ModelError, match=r"the cached tokenizer .* cannot be read .*delete that folder"):
        prepare.prepare_tokenizer(cfg, data, vocab_size=128)


def test_an_out_dir_that_cannot_be_made_names_out_dir(tiny_overrides, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = load_config(overrides=tiny_overrides + [f"out_dir={afile / 'sub'}"])
    with pytest.raises(ConfigError, match=r"out_dir .*afile/sub: cannot write there \(Not a directory.*--out"):
        runner.begin_run(cfg, resume=True, events=runner.Events(), t_start=0.0)
    assert afile.read_text() == "x"


def test_an_extension_whose_set_up_fails_leaves_the_finished_run_as_it_was(tiny_overrides, monkeypatch):
    """Extending a finished run rewrites config.toml (more rounds) and removes summary.json; when the set-up then
    fails (a model, or on Flower a node refusing), the finished run must still look finished, as before."""
    cfg = load_config(overrides=tiny_overrides + ["rounds=1"])
    rd = run(cfg).run_dir
    (rd / "flower.jsonl").write_text('{"round": 1, "kind": "train"}\n')  # as a Flower run leaves it
    before = {n: (rd / n).read_text() for n in ("summary.json", "config.toml", "flower.jsonl", "metrics.jsonl")}

    def refuse(*a, **kw):
        (rd / "flower.jsonl").open("a").write('{"round": 1, "kind": "setup"}\n')  # what a set-up appends
        raise ConfigError("client 1: no checkpoint client_1.pt")

    monkeypatch.setattr(runner, "build_states", refuse)
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(load_config(overrides=tiny_overrides + ["rounds=2"]))
    assert {n: (rd / n).read_text() for n in before} == before
    assert run(cfg).summary["rounds_done"] == 1  # still the finished 1-round run (the folder's lock released)
    monkeypatch.undo()
    # refused while loading its checkpoint (a damaged file): the same
    ckpt = rd / "checkpoints" / "round_001" / "client_1.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(FedLadaError, match=r"client_1.pt"):
        run(load_config(overrides=tiny_overrides + ["rounds=2"]))
    assert {n: (rd / n).read_text() for n in before} == before


def test_a_run_trained_with_other_prompts_is_not_resumed_with_these(tmp_path):
    """Plain prompts start with the BOS token where the tokenizer adds one itself; a run started before that (no
    prompt_bos in its setup line) or with another tokenizer was trained on other prompts: not resumed (nor
    exported) with these."""
    cfg = load_config(overrides=[f"out_dir={tmp_path}"])
    rd = RunDir(tmp_path)
    rd.append("metrics.jsonl", [{"round": 0, "event": "setup", "models": {"llm": {"weights_fingerprint": "a"},
                                                                          "client0": {"prompt_bos": "<s>"}}}])
    runner.check_models_unchanged(rd, cfg, {"llm": {"prompt_bos": ""}, "client0": {"prompt_bos": "<s>"}})
    with pytest.raises(ConfigError, match=r"the prompts of the LLM now start with '<s>' .* this run started with ''"):
        runner.check_models_unchanged(rd, cfg, {"llm": {"prompt_bos": "<s>"}})
    with pytest.raises(ConfigError, match=r"client0's SLM now start with '' .* started with '<s>'"):
        runner.check_models_unchanged(rd, cfg, {"client0": {"prompt_bos": ""}})
    runner.check_models_unchanged(rd, cfg, {"client0": {"prompt_bos": ""}}, prompts_warn=True)  # an export: warned


def test_a_run_prompted_with_another_instruction_is_not_resumed_with_this_one(tmp_path):
    """A chat-template prompt's instruction is recorded in the setup line; a run started before it was recorded
    asked for a number (models.DEFAULT_INSTRUCTION)."""
    from fedlada.models import DEFAULT_INSTRUCTION, instruction_for

    cfg = load_config(overrides=[f"out_dir={tmp_path}"])
    rd = RunDir(tmp_path)
    letter = instruction_for("auto", ["B", "(C)"])
    rd.append("metrics.jsonl", [{"round": 0, "event": "setup", "models": {"llm": {"instruction": letter},
                                                                          "client0": {"role": "slm0"}}}])
    runner.check_models_unchanged(rd, cfg, {"llm": {"instruction": letter}, "client0": {}})
    runner.check_models_unchanged(rd, cfg, {"client0": {"instruction": DEFAULT_INSTRUCTION}})  # an older run's
    with pytest.raises(ConfigError, match=r"the prompts of the LLM now end with the instruction .*<number>.* this "
                                          r"run started with .*<letter>"):
        runner.check_models_unchanged(rd, cfg, {"llm": {"instruction": DEFAULT_INSTRUCTION}})
    with pytest.raises(ConfigError, match=r"client0's SLM .* started with .*<number>"):
        runner.check_models_unchanged(rd, cfg, {"client0": {"instruction": ""}})


def test_a_chat_model_on_multiple_choice_data_is_asked_for_a_letter(tiny_overrides, tmp_path, caplog):
    """Own data whose answers are choice letters and an SLM with a chat template: the SLM's prompts ask for
    'Answer: <letter>' (instruction = "auto", from the public pool's answers), recorded in the setup line; the LLM,
    prompted plainly, records none."""
    from fedlada import prepare
    from fedlada.data.validate import write_records
    from fedlada.models import save_model

    def records(name: str, n: int) -> Path:
        recs = [Record(f"{name}{i}", f"Which number is {i % 4 + 1}? (A) 1 (B) 2 (C) 3 (D) 4", "ABCD"[i % 4],
                       domain="choice") for i in range(n)]
        write_records(recs, tmp_path / f"{name}.jsonl")
        return tmp_path / f"{name}.jsonl"

    data_over = [f"data.public={records('public', 30)}", 'data.clients=[{"train": "x", "test": "y"}]',
                 f"data.clients.0.train={records('train', 20)}", f"data.clients.0.test={records('test', 6)}"]
    over = [o for o in tiny_overrides if not o.startswith("data.")] + data_over + ["data.holdout_size=4",
                                                                                  "rounds=1"]
    cfg = load_config(overrides=over)
    model, tok, _ = prepare.prepare_model(cfg.models.slms[0], role="slm0", cfg=cfg, data=prepare.load_data(cfg))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    save_model(model, tok, tmp_path / "chat-slm")
    res = run(load_config(overrides=over + [f"models.slms.0.source={tmp_path / 'chat-slm'}"]))
    setup = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["event"] == "setup"
    assert setup["models"]["client0"]["instruction"].endswith("'Answer: <letter>'.")
    assert "instruction" not in setup["models"]["llm"]
    # its export's record holds the keys that apply to a loaded model, not the tiny-model defaults
    from fedlada.export import export_model

    caplog.clear()
    with caplog.at_level("WARNING"):
        out = export_model(res.run_dir, "client0", tmp_path / "out")
    assert "evaluated on 6 question(s) only" not in caplog.text  # the run said it; its export does not again
    spec = json.loads((out / "fedlada_export.json").read_text())["spec"]
    assert spec["source"] == str(tmp_path / "chat-slm") and "hidden_size" not in spec and "pretrain_tokens" not in spec
    assert spec["instruction"] == setup["models"]["client0"]["instruction"]  # as resolved, not "auto"


def test_a_resume_notices_a_lost_audit_or_selections_file(tmp_path):
    """Every completed round has audit lines (>= 1 client reported) and as many selections lines as its round_time
    row counted: a file lost or cut short is refused on resume (the report would silently miss those rounds)."""
    rd = RunDir(tmp_path)
    rd.append("metrics.jsonl", [{"round": t, "event": "eval", "who": w} for t in (0, 1, 2) for w in ("llm", "client0")]
              + [{"round": t, "event": "client_step", "who": "client0"} for t in (1, 2)]
              + [{"round": 1, "event": "round_time", "seconds": 1.0, "selections": 2},
                 {"round": 2, "event": "round_time", "seconds": 1.0, "selections": 0}])
    rd.append("audit.jsonl", [{"round": t, "client": 0} for t in (1, 2)])
    rd.append("selections.jsonl", [{"round": 1, "pair": "llm->client0", "selected": s} for s in (True, False)])
    runner.check_metrics_complete(rd, 2)
    (tmp_path / "selections.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"selections.jsonl holds 0 of round 1's 2 filter decisions"):
        runner.check_metrics_complete(rd, 2)
    rd.append("selections.jsonl", [{"round": 1, "pair": "llm->client0", "selected": s} for s in (True, False)])
    # one client's line of one round
    full = (tmp_path / "audit.jsonl").read_text()
    (tmp_path / "audit.jsonl").write_text(full.splitlines()[1] + "\n")
    with pytest.raises(ConfigError, match=r"audit.jsonl has no line of client0 in round 1, although it reported"):
        runner.check_metrics_complete(rd, 2)
    (tmp_path / "audit.jsonl").write_text(full)
    metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(m for m in metrics if not ('"client0"' in m and '"eval"' in m
                                                                              and '"round": 2' in m)) + "\n")
    with pytest.raises(ConfigError, match=r"metrics.jsonl has no evaluation of client0 in round 2"):
        runner.check_metrics_complete(rd, 2)
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    (tmp_path / "audit.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"audit.jsonl has no line of client0 in round 1"):
        runner.check_metrics_complete(rd, 2)


def test_a_checkpoint_whose_bytes_were_changed_is_refused(tmp_path):
    """torch.load does not check a torch zip's CRCs: bytes flipped inside a tensor loaded silently (a resumed run
    then differed from an uninterrupted one). The stored checksums are checked, naming the file."""
    import torch

    from fedlada import checkpoints

    path = tmp_path / "round_002" / "client_0.pt"
    path.parent.mkdir()
    checkpoints.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    assert torch.equal(checkpoints.load(path)["w"], torch.arange(4096, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    at = data.index(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[4000:4064])
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"checkpoint file .*client_0.pt is unreadable .*CRC check.*delete .*round_002"):
        checkpoints.load(path)


def test_an_interrupt_while_an_extension_rewrites_its_config_leaves_the_finished_run(tiny_overrides, monkeypatch):
    cfg = load_config(overrides=tiny_overrides + ["rounds=1"])
    rd = run(cfg).run_dir
    before = {n: (rd / n).read_text() for n in ("summary.json", "config.toml")}

    def interrupted(self, name, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "write_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(overrides=tiny_overrides + ["rounds=2"]))
    monkeypatch.undo()
    assert {n: (rd / n).read_text() for n in before} == before


def test_a_resume_notices_lost_prediction_lines(tmp_path):
    rd = RunDir(tmp_path)
    rd.append("metrics.jsonl", [{"round": t, "event": "eval", "who": "llm", "n": 2} for t in (0, 1)]
              + [{"round": 1, "event": "round_time", "seconds": 1.0, "selections": 0}])
    rd.append("audit.jsonl", [{"round": 1, "client": 0}])
    rows = [{"round": t, "who": "llm", "id": f"q{i}", "correct": False} for t in (0, 1) for i in (0, 1)]
    rd.append("predictions.jsonl", rows)
    runner.check_metrics_complete(rd, 1)
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    with pytest.raises(ConfigError, match=r"predictions.jsonl holds 1 of the 2 answers of llm's evaluation in round 1"):
        runner.check_metrics_complete(rd, 1)
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(ConfigError, match=r"holds 0 of the 2 answers of llm's evaluation in round 1"):
        runner.check_metrics_complete(rd, 1)
    (tmp_path / "predictions.jsonl").write_text("")  # a run from before the file: nothing to check
    runner.check_metrics_complete(rd, 1)


def test_a_resume_under_another_thread_count_is_refused_before_any_model_is_prepared(tiny_overrides, tmp_path,
                                                                                       monkeypatch):
    """threads = 0 resolves to the cores a process may use; another count prepares other tiny models and gives other
    numbers: the setup line records the count, and a resume under another is refused naming both (it used to
    pretrain new models, then fail on a LoRA model's changed base weights)."""
    cfg = load_config(overrides=tiny_overrides + [f"out_dir={tmp_path / 'r'}", "rounds=1", "threads=1"])
    run(cfg)
    metrics = tmp_path / "r" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[0]["event"] == "setup" and rows[0]["threads"] == 1
    rows[0]["threads"] = 3  # as if it had started in a process with three cores and threads = 0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(runner, "prepare_model", lambda *a, **k: pytest.fail("prepared a model"))
    with pytest.raises(ConfigError, match=r"started with 3 torch thread\(s\) \(threads = 1 now gives 1\).*taskset "
                                          r"-c 0-2"):
        run(load_config(overrides=tiny_overrides + [f"out_dir={tmp_path / 'r'}", "rounds=2", "threads=1"]))


def test_export_of_a_fedcollm_runs_aggregated_slm(tiny_overrides, gold_sampler, tmp_path):
    """FedCoLLM's product is the server's aggregated SLM (checkpoints' host_slm.pt): ``--model slm`` writes it as a
    plain folder holding exactly those weights."""
    import torch

    from fedlada import checkpoints, prepare
    from fedlada.export import export_model
    from fedlada.models import load_model

    slms = ['models.slms=[{"hidden_size": 24, "num_layers": 2, "num_heads": 4, "pretrain_tokens": 2000}]']
    cfg = load_config(overrides=tiny_overrides + slms + ["rounds=1", "data.num_clients=2", "host.name=fedcollm",
                                                         f"out_dir={tmp_path / 'run'}"])
    gold_sampler(prepare.load_data(cfg).public)
    res = run(cfg)
    saved = checkpoints.load(res.run_dir / "checkpoints" / "round_001" / "host_slm.pt")
    out = export_model(res.run_dir, "slm", tmp_path / "slm")
    slm, _ = load_model(out)
    mine = slm.state_dict()
    assert saved and all(torch.equal(mine[k], v) for k, v in saved.items())
    record = json.loads((out / "fedlada_export.json").read_text())
    assert record["model"] == "slm" and record["accuracy"] is None


def test_a_garbage_checkpoint_file_gets_no_advice_to_load_it_unsafely(tmp_path):
    """torch's message for a file that is not a checkpoint advises loading it with weights_only=False and filing
    an issue: wrong for a damaged file. Its first line only, and what to do."""
    from fedlada.checkpoints import load

    path = tmp_path / "round_002" / "client_0.pt"
    path.parent.mkdir()
    path.write_text("garbage\n")
    with pytest.raises(ConfigError, match=r"client_0.pt is unreadable \(UnpicklingError: .*\): the checkpoint of that "
                                          r"round is damaged; delete .*round_002") as err:
        load(path)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
