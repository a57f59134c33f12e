"""LaDa in Flower's simulation engine gives the in-process runner's numbers: through ``run_simulation`` (the
``fedlada run --engine flower`` path) with a client failing in round 2, and through ``flwr run . local``."""

from __future__ import annotations

import json

import pytest
import torch

from flower_support import FAST, overrides_dict, reference_run, rows, strip
from fedlada.config import load_config
from fedlada.runner import ClientFailure, run
from fedlada_app.client_app import FAIL_ENV
from fedlada_app.loopback import run_local_simulation, stop_local_superlink
from fedlada_app.settings import FlowerConfig
from fedlada_app.simulate import run_simulation


def _same_reason(records: list[dict]) -> list[dict]:
    return [{**r, "reason": "-"} if r.get("event") == "client_failed" else r for r in records]


@pytest.mark.slow
def test_simulation_matches_inprocess_with_a_failing_client(model_cache, tmp_path, monkeypatch):
    over = FAST + ["data.num_clients=3"]

    def crash(round, client):
        if (round, client) == (2, 1):
            raise ClientFailure("down")

    ref = run(load_config(overrides=over + [f"out_dir={tmp_path / 'inprocess'}"]), fail_hook=crash)
    monkeypatch.setenv(FAIL_ENV, "2:1")
    # model_cache=0: every message prepares the SLM afresh, so each one restores the node's state from its context
    sim = run_simulation(load_config(overrides=over + [f"out_dir={tmp_path / 'flower'}", "engine=flower"]),
                         flower=FlowerConfig(model_cache=0))
    assert sim.summary["rounds_done"] == 2 and sim.extra["engine"] == "flower-simulation"

    got = strip(rows(sim.run_dir))
    failed = [r for r in got if r["event"] == "client_failed"]
    assert [(r["round"], r["who"]) for r in failed] == [(2, "client1")]
    assert "injected failure" in failed[0]["reason"]
    # Flower's tracebacks of that failure are kept in the run folder, not printed
    assert "injected failure (FEDLADA_TEST_FAIL) of client 1 in round 2" in (sim.run_dir / "flower-errors.log").read_text()
    assert _same_reason(got) == _same_reason(strip(rows(ref.run_dir)))
    assert rows(sim.run_dir, "selections.jsonl") == rows(ref.run_dir, "selections.jsonl")
    assert rows(sim.run_dir, "audit.jsonl") == rows(ref.run_dir, "audit.jsonl")
    assert {r["who"] for r in got if r["event"] == "client_step" and r["round"] == 2} == {"client0", "client2"}

    # the failed client kept its state: evaluated again (a plain evaluate message) with the same result ...
    ev = {(r["round"], r["who"]): {k: v for k, v in r.items() if k != "round"} for r in got if r["event"] == "eval"}
    assert ev[(2, "client1")] == ev[(1, "client1")]
    exchanges = rows(sim.run_dir, "flower.jsonl")
    assert [(e["round"], e["event"], e["failed"]) for e in exchanges if e["event"] in ("train", "evaluate")] == [
        (1, "train", []), (2, "train", [1]), (2, "evaluate", [])]
    # ... and the checkpoints hold, file for file, the in-process run's client states
    for t in (1, 2):
        for k in range(3):
            mine = torch.load(sim.run_dir / "checkpoints" / f"round_{t:03d}" / f"client_{k}.pt")
            theirs = torch.load(ref.run_dir / "checkpoints" / f"round_{t:03d}" / f"client_{k}.pt")
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    mine = torch.load(sim.run_dir / "checkpoints" / "round_002" / "client_1.pt")
    before = torch.load(sim.run_dir / "checkpoints" / "round_001" / "client_1.pt")
    assert all(torch.equal(mine[n], before[n]) for n in mine)


@pytest.mark.slow
def test_flwr_run_local_runs_the_app_and_matches_inprocess(model_cache, tmp_path, tmp_path_factory):
    ref = reference_run(tmp_path_factory.getbasetemp())
    out = tmp_path / "run"
    home = tmp_path / "flwr-home"
    res = run_local_simulation(home, overrides_dict(FAST + ["rounds=1", f"out_dir={out}"]), num_supernodes=2,
                               timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert stop_local_superlink(home) == []  # the detached local SuperLink is gone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_done"] == 1
    assert (out / "report.html").is_file() and (out / "plots" / "accuracy.png").is_file()  # as fedlada run writes
    logs = res.stdout + res.stderr  # the ServerApp's progress and summary reach flwr run --stream
    assert "round 1/1: evaluation" in logs and "mean SLM accuracy" in logs
    assert "engine = \"flower\"" in (out / "config.toml").read_text()
    expected = [r for r in strip(rows(ref)) if r["round"] <= 1]
    assert strip(rows(out)) == expected
