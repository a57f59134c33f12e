"""The run directory is safe to point anywhere: a folder that is not a run is refused and left alone, a start that
fails writes nothing, a resumed run must see its own config and data, and a finished run is not redone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlada import runner
from fedlada.config import dump_toml, load_config
from fedlada.data import Record
from fedlada.errors import ConfigError, FedLadaError
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
    with pytest.raises(ConfigError, match=r"differs in: lada.budget, rounds"):
        check_run_dir(other, resume=True)
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


def test_a_resumed_run_must_see_the_data_it_started_with(tmp_path):
    rd = RunDir(tmp_path)
    rd.append("metrics.jsonl", [{"round": 0, "event": "setup", "data_digest": "aaaa"}])
    check_data_unchanged(rd, "aaaa")
    check_data_unchanged(RunDir(tmp_path / "older"), "bbbb")  # no digest recorded: nothing to compare
    with pytest.raises(ConfigError, match="the data changed since this run started"):
        check_data_unchanged(rd, "bbbb")


def test_min_clients_above_the_number_of_clients_fails_up_front(tiny_overrides, monkeypatch):
    monkeypatch.setattr(runner, "build_states", lambda *a, **k: pytest.fail("models prepared"))
    with pytest.raises(ConfigError, match="'min_clients': expected at most the number of clients \\(2\\)"):
        run(load_config(overrides=tiny_overrides + ["min_clients=3"]))


def test_a_finished_run_is_not_prepared_or_run_again(tiny_overrides, monkeypatch):
    cfg = load_config(overrides=tiny_overrides)
    _fake_run(Path(cfg.out_dir), cfg, rounds_done=cfg.rounds)
    summary = {"method": "lada", "rounds_done": cfg.rounds, "mean_slm_accuracy": 0.5}
    (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(runner, "load_data", lambda *a, **k: pytest.fail("data loaded"))
    monkeypatch.setattr(runner, "build_states", lambda *a, **k: pytest.fail("models prepared"))
    res = run(cfg)
    assert res.summary == summary and res.resumed_from == cfg.rounds


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
