"""A Flower deployment on loopback with TLS and SuperNode authentication (the commands of docs/deployment.md):
registered SuperNodes train and give the in-process runner's numbers; an unregistered SuperNode is refused."""

from __future__ import annotations

import json

import pytest

from flower_support import FAST, overrides_dict, reference_run, rows, strip
from fedlada_app.loopback import Loopback


@pytest.mark.slow
def test_tls_authenticated_deployment_matches_inprocess(model_cache, tmp_path, tmp_path_factory):
    ref = reference_run(tmp_path_factory.getbasetemp())
    out = tmp_path / "run"
    with Loopback(tmp_path / "loopback", num_keys=3) as lb:
        lb.start()
        assert f"https://127.0.0.1:{lb.port}" in lb.log("superlink")
        lb.register(0)
        lb.register(1)
        for k in (0, 1):
            lb.start_supernode(f"supernode{k}", key=k, partition=k, num_partitions=2)
        # key 2 was never registered: the SuperLink refuses it, and it gives up
        intruder = lb.start_supernode("intruder", key=2, partition=1, num_partitions=2,
                                      extra=["--max-retries", "2", "--max-wait-time", "60"])
        res = lb.run(overrides_dict(FAST + [f"out_dir={out}"]), timeout=900)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in lb.log("intruder")
        nodes = lb.list_nodes()
        assert sorted(n["status"] for n in nodes) == ["online", "online"]
    assert all(p.poll() is not None for p in lb.procs.values())

    assert json.loads((out / "summary.json").read_text())["rounds_done"] == 2
    assert strip(rows(out)) == strip(rows(ref))
    assert rows(out, "selections.jsonl") == rows(ref, "selections.jsonl")
    steps = [(e["round"], e["event"]) for e in rows(out, "flower.jsonl")]
    assert steps == [(0, "query.setup"), (1, "train"), (1, "query.save"), (2, "train"), (2, "query.save")]
