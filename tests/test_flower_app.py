"""The Flower glue without a Flower runtime: record conversion, the flower.* config, the app's run config in
pyproject.toml, the FAB's contents, a client's state across messages and resume, and a flwr-free library."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fedlada.config import RunConfig, load_config
from fedlada.errors import ConfigError
from fedlada_app import records
from fedlada_app.settings import FlowerConfig, pyproject_section, split_run_config

REPO = Path(__file__).resolve().parents[1]


def test_the_library_imports_no_flower_module():
    code = ("import importlib, pkgutil, sys, fedlada\n"
            "mods = [m.name for m in pkgutil.walk_packages(fedlada.__path__, 'fedlada.')]\n"
            "[importlib.import_module(m) for m in mods]\n"
            "from fedlada.cli import build_parser; build_parser()\n"
            "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
            "print(len(mods), bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    n, bad = out.stdout.split(" ", 1)
    assert int(n) >= 15 and bad.strip() == "[]"


def test_pyproject_run_config_is_the_default_config():
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import get_fused_config_from_dir

    conf, warnings = load_and_validate(REPO / "pyproject.toml")
    assert warnings == []
    app = conf["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedlada_app.server_app:app",
                                 "clientapp": "fedlada_app.client_app:app"}
    run_config = get_fused_config_from_dir(REPO, {})  # exactly what Flower hands the ServerApp
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    cfg, fcfg = split_run_config(run_config)
    assert (cfg.out_dir, cfg.engine) == ("runs/flower", "flower")
    assert dataclasses.replace(cfg, out_dir=RunConfig().out_dir, engine=RunConfig().engine) == RunConfig()
    assert fcfg == FlowerConfig()
    # every key is spelled out (flwr run --run-config may only set listed keys): the section is the rendered one
    text = (REPO / "pyproject.toml").read_text()
    assert pyproject_section() in text, "refresh [tool.flwr.app.config] with: python -m fedlada_app.settings"


def test_run_config_overrides_and_unknown_keys():
    from flwr.common.config import get_fused_config_from_dir

    base = get_fused_config_from_dir(REPO, {})
    cfg, fcfg = split_run_config({**base, "lada.budget": 0.25, "models.slms.1.hidden_size": 40,
                                  "flower.timeout": 12, "flower.telemetry": False, "data.clients": ""})
    assert (cfg.lada.budget, cfg.models.slms[1].hidden_size, cfg.data.clients) == (0.25, 40, ())
    assert (fcfg.timeout, fcfg.telemetry) == (12.0, False)
    with pytest.raises(ConfigError, match="flower.nope"):
        split_run_config({**base, "flower.nope": 1})
    with pytest.raises(ConfigError, match="lada.nope"):
        split_run_config({**base, "lada.nope": 1})
    with pytest.raises(ConfigError, match="flower.telemetry"):
        split_run_config({**base, "flower.telemetry": "maybe"})
    with pytest.raises(ConfigError, match="flower.timeout"):
        split_run_config({**base, "flower.timeout": 0})
    clients = json.dumps([{"train": "a.jsonl", "test": "b.jsonl"}])
    cfg, _ = split_run_config({**base, "data.clients": clients, "data.public": "p.jsonl"})
    assert [c.train for c in cfg.data.clients] == ["a.jsonl"]


def test_fedlada_run_takes_flower_keys_only_with_the_flower_engine(capsys):
    from fedlada.cli import _split_flower_sets, main
    from fedlada_app.settings import flower_config

    rest, flower = _split_flower_sets(["lada.budget=0.3", "flower.timeout=60", "flower.telemetry=false"])
    assert rest == ["lada.budget=0.3"] and flower == {"timeout": "60", "telemetry": "false"}
    fcfg = flower_config(flower)  # strings from the command line are parsed like run-config values
    assert (fcfg.timeout, fcfg.telemetry) == (60.0, False)
    with pytest.raises(ConfigError, match="flower.model_cache"):
        flower_config({"model_cache": "lots"})
    assert main(["run", "--set", "flower.timeout=60"]) != 0  # a user error: message, no traceback, no run
    err = capsys.readouterr().err
    assert "--engine flower" in err and "Traceback" not in err


def test_the_fab_holds_the_library_and_the_app_but_no_tests():
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert {"fedlada/runner.py", "fedlada/rounds.py", "fedlada_app/client_app.py", "fedlada_app/server_app.py",
            "pyproject.toml"} <= names
    assert not any(n.startswith(("tests/", ".venv/", "runs/", "benchmarks/")) for n in names)
    assert len(fab) < 2_000_000


def _cfg(**over) -> RunConfig:
    over_list = [f"{k}={v}" for k, v in over.items()]
    return load_config(overrides=['data.clients=[{"train": "t0.jsonl", "test": "e0.jsonl"}, '
                                  '{"train": "t1.jsonl", "test": "e1.jsonl", "format": "gsm8k"}]',
                                  "data.public=pub.jsonl", "models.slms.1.hidden_size=96", "lada.budget=0.3"]
                       + over_list)


def test_requests_and_config_round_trip_exactly():
    cfg, fcfg = _cfg(), FlowerConfig(timeout=7.5, model_cache=0)
    wire = records.wire_config(cfg, fcfg)
    assert records.config_from_wire(wire) == (cfg, fcfg)
    assert records.config_from_wire(records.wire_config(RunConfig(), FlowerConfig())) == (RunConfig(), FlowerConfig())
    digest = records.config_digest(cfg)
    assert digest == records.config_digest(_cfg()) != records.config_digest(_cfg(**{"lada.budget": 0.31}))
    for req in (records.Request(wire, digest), records.Request(wire, digest, round=3, resume_round=2,
                                                              checkpoint_dir="/x/ck", teach=b'{"k": 1}',
                                                              evaluate=True)):
        assert records.request_from(records.request_content(req)) == req


def test_replies_round_trip_and_malformed_replies_are_rejected():
    metrics = {"train_loss": 0.5, "reward": None, "filter": {"counts": {"kept": 3}, "q": [0.1, 0.2]}}
    selections = [{"round": 1, "id": "q1", "selected": True, "score": None, "reason": "kept: top"}]
    content = records.report_content(b'{"kind":"report"}', metrics, selections)
    assert records.report_from(content) == (b'{"kind":"report"}', metrics, selections)
    assert records.report_from(records.report_content(b"r")) == (b"r", {}, [])  # telemetry off
    result = {"accuracy": 0.25, "n": 8, "by_domain": {"a": 0.5}, "answer_extraction_version": "3"}
    assert records.eval_from(records.eval_content(result)) == result
    both = records.eval_content(result, records.report_content(b"r"))
    assert records.has_eval(both) and records.report_from(both)[0] == b"r"
    assert both[records.EVAL_METRICS]["accuracy"] == 0.25 and both[records.EVAL_METRICS]["num-examples"] == 8
    assert records.setup_from(records.setup_content(2, 3, {"parameters": 10}, {"train": 5})) == (
        2, 3, {"parameters": 10}, {"train": 5})

    from flwr.app import ConfigRecord, RecordDict

    with pytest.raises(records.RecordError, match="lacks record 'report'"):
        records.report_from(RecordDict({"other": ConfigRecord({"x": 1})}))
    with pytest.raises(records.RecordError, match="'report'.*expected"):
        records.report_from(RecordDict({records.REPORT: ConfigRecord({"report": "not bytes"})}))
    bad_tel = RecordDict({records.REPORT: ConfigRecord({"report": b"r"}),
                          records.TELEMETRY: ConfigRecord({"metrics": "{oops", "selections": "[]"})})
    with pytest.raises(records.RecordError, match="not JSON"):
        records.report_from(bad_tel)
    with pytest.raises(records.RecordError, match="round"):
        records.request_from(RecordDict({records.REQUEST: ConfigRecord(
            {"config": "{}", "digest": "d", "round": True, "resume-round": 0, "checkpoint-dir": "",
             "evaluate": False})}))


def test_node_state_round_trips_weights_and_filter_exactly():
    from flwr.app import RecordDict

    from fedlada.filter import LearnabilityFilter

    g = torch.Generator().manual_seed(0)
    weights = {"a.weight": torch.randn(5, 3, generator=g), "b.bias": torch.randn(7, generator=g)}
    flt = LearnabilityFilter(6, hidden=8, seed=3)
    flt.observe(torch.randn(10, 6, generator=g).numpy(), torch.randn(10, generator=g).numpy())
    flt.fit()
    state = RecordDict()
    assert records.load_state(state) is None
    records.store_state(state, weights=weights, filter_state=flt.state_dict(), state_id="s1", round=2, digest="d")
    node = records.load_state(state)
    assert (node.state_id, node.round, node.digest) == ("s1", 2, "d")
    back = node.weights()
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    fs = node.filter_state()
    flt2 = LearnabilityFilter(6, hidden=8, seed=99)
    flt2.load_state_dict(fs)
    x = torch.randn(4, 6, generator=g).numpy()
    for a, b in zip(flt.predict(x), flt2.predict(x)):
        assert (a == b).all()
    assert math.isclose(fs["reward_scale"], flt.reward_scale) and fs["num_fits"] == flt.num_fits


def test_a_node_reads_only_its_own_client_files(tmp_path):
    """On separate machines only node K has client K's files: each node loads its own and the public pool."""
    from fedlada.data import make_benchmark, read_records
    from fedlada.errors import DataError
    from fedlada_app.client_app import _client_files

    lay = make_benchmark(tmp_path / "b", num_clients=2, train_per_client=20, test_per_client=6, public_size=10,
                         general_size=0)
    clients = json.dumps([{"train": str(c.train), "test": str(c.test)} for c in lay.clients])
    cfg = load_config(overrides=[f"data.clients={clients}", f"data.public={lay.public}"])
    lay.clients[0].train.unlink()  # this machine is node 1's
    mine, data = _client_files(cfg, 1)
    assert [r.id for r in mine.train] == [r.id for r in read_records(lay.clients[1].train)]
    assert len(mine.test) == 6 and len(data.public) == 10 and data.general == []
    with pytest.raises(DataError, match="client 0"):
        _client_files(cfg, 0)


def test_a_client_follows_its_node_state_and_resumes_from_checkpoint_files(tiny_overrides, tmp_path):
    """The cached SLM is brought to whatever state the node's context holds, from any earlier state."""
    from flwr.app import Context, RecordDict

    from fedlada_app import client_app

    cfg = load_config(overrides=tiny_overrides)
    digest = records.config_digest(cfg)
    req = records.Request(records.wire_config(cfg, FlowerConfig()), digest, round=1,
                          checkpoint_dir=str(tmp_path / "ck"))
    entry = client_app._prepare(cfg, 1)
    model = entry.state.side.model
    initial = client_app.trainable_state(model)
    assert initial.keys() and all(torch.equal(initial[k], entry.initial[k]) for k in initial)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                  run_config={})

    def now():
        return client_app.trainable_state(model)

    def equal(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # a "trained" state stored in the context, then the model is changed behind the cache's back
    trained = {k: v + 0.5 for k, v in initial.items()}
    records.store_state(ctx.state, weights=trained, filter_state=None, state_id="t1", round=1, digest=digest)
    entry.holds = ""
    client_app._sync(entry, ctx, req, cfg, 1)
    assert entry.holds == "t1" and equal(now(), trained)
    # a node without state on a fresh run: back to the prepared weights
    fresh = Context(run_id=2, node_id=5, node_config=ctx.node_config, state=RecordDict(), run_config={})
    client_app._sync(entry, fresh, req, cfg, 1)
    assert entry.holds == "init" and equal(now(), initial)
    # resume: the node loads the files of the round the server resumes from (those InProcessClients.save writes)
    d = tmp_path / "ck" / "round_001"
    d.mkdir(parents=True)
    saved = {k: v * 2 for k, v in initial.items()}
    torch.save(saved, d / "client_1.pt")
    resume = dataclasses.replace(req, round=2, resume_round=1)
    client_app._sync(entry, fresh, resume, cfg, 1)
    assert entry.holds == "resume-1" and equal(now(), saved) and entry.state.filter is None
    # its newest files up to the last checkpointed round (here round 3 has none for it: round 1's)
    later = client_app._prepare(cfg, 1)
    client_app._sync(later, fresh, dataclasses.replace(resume, resume_round=3), cfg, 1)
    assert later.holds == "resume-1" and equal(client_app.trainable_state(later.state.side.model), saved)
    with pytest.raises(ConfigError, match=r"client 0: no checkpoint client_0.pt in .*round_001..round_001 to resume"):
        client_app._sync(client_app._prepare(cfg, 0), fresh, resume, cfg, 0)
    # a state from another config is refused
    other = dataclasses.replace(req, digest="0" * 16)
    with pytest.raises(ConfigError, match="belongs to config"):
        client_app._sync(entry, ctx, other, cfg, 1)


def test_threads_resolve_the_same_way_in_every_engine(monkeypatch):
    """threads=0 means every core this process may use, in the runner, the ServerApp and each ClientApp; the
    simulation then reserves that many CPUs per ClientApp (they take turns, as clients do in-process)."""
    import os

    from fedlada.config import load_config, resolve_threads
    from fedlada_app.settings import FlowerConfig
    from fedlada_app.simulate import backend_config

    cores = len(os.sched_getaffinity(0))
    assert resolve_threads(0) == cores and resolve_threads(3) == 3
    assert backend_config(FlowerConfig(), load_config())["client_resources"]["num_cpus"] == cores
    assert backend_config(FlowerConfig(), load_config(overrides=["threads=1"]))["client_resources"]["num_cpus"] == 1
    assert backend_config(FlowerConfig(client_cpus=0.5), load_config())["client_resources"]["num_cpus"] == 0.5
    with pytest.raises(ConfigError, match="flower.client_cpus"):
        FlowerConfig(client_cpus=-1)


def test_clientapps_may_reserve_gpus_and_see_them_when_they_reserve_none(tmp_path):
    """``flower.client_gpus`` is Ray's GPU share per ClientApp (0 = none reserved); Ray must not hide the GPUs from
    workers that reserve none, or an SLM on device "auto" would train on the CPU under Flower only. A share this
    machine cannot place is refused before Ray starts."""
    from fedlada_app.settings import FlowerConfig
    from fedlada_app.simulate import QUIET_ENV, backend_config, run_simulation

    assert QUIET_ENV["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"
    assert backend_config(FlowerConfig(), load_config())["client_resources"]["num_gpus"] == 0
    assert backend_config(FlowerConfig(client_gpus=0.5), load_config())["client_resources"]["num_gpus"] == 0.5
    with pytest.raises(ConfigError, match="flower.client_gpus"):
        FlowerConfig(client_gpus=-0.5)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"'flower.client_gpus': a ClientApp asking for {gpus + 1} GPUs can never "
                                          rf"be placed on this machine \({gpus} CUDA device"):
        run_simulation(load_config(overrides=[f"out_dir={tmp_path / 'r'}"]), flower=FlowerConfig(client_gpus=gpus + 1))
    assert not (tmp_path / "r").exists()


def test_a_failed_clientapps_tracebacks_go_to_a_file_and_the_terminal_gets_one_line(tmp_path, caplog):
    """Flower logs a failed ClientApp as three ERROR records of 40-60 lines (printed twice); without ``verbose``
    they are kept in the run's flower-errors.log and one warning names that file. Other Flower records pass."""
    import logging

    from fedlada_app.simulate import ClientAppTracebacks

    path = tmp_path / "run" / "flower-errors.log"
    keep = ClientAppTracebacks(path)

    def record(module, level, msg):
        return logging.LogRecord("flwr", level, f"/x/{module}.py", 1, msg, None, None)

    with caplog.at_level(logging.WARNING, logger="fedlada_app.simulate"):
        assert keep.filter(record("raybackend", logging.ERROR, "An exception was raised")) is False
        assert keep.filter(record("vce_api", logging.ERROR, "\x1b[36mray::ClientAppActor.run()\x1b[39m")) is False
        assert keep.filter(record("vce_api", logging.ERROR, "Traceback ...\nRuntimeError: boom")) is False
        assert keep.filter(record("vce_api", logging.WARNING, "a warning")) is True
        assert keep.filter(record("server_app", logging.ERROR, "another error")) is True
    text = path.read_text()
    assert "An exception was raised" in text and "RuntimeError: boom" in text and "another error" not in text
    assert "ray::ClientAppActor.run()" in text and "\x1b" not in text  # Ray's colours are not kept
    assert keep.diverted == 3
    assert caplog.text.count("Flower's traceback is in") == 1 and str(path) in caplog.text


def test_compute_lock_makes_clientapps_on_one_machine_take_turns(tmp_path):
    """Node config ``compute-lock``: a handler holds the lock file while it computes; without the key, no lock."""
    import fcntl

    from fedlada_app.client_app import _compute_lock

    lock = tmp_path / "compute.lock"
    with _compute_lock(types.SimpleNamespace(node_config={"compute-lock": str(lock)})):
        with open(lock, "a") as other:  # another ClientApp process on this machine
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the handler is done
        fcntl.flock(other, fcntl.LOCK_UN)
    with _compute_lock(types.SimpleNamespace(node_config={"partition-id": 0})):
        pass  # no key: nothing to hold


def test_a_refused_host_pairing_stops_the_server_before_any_work(tmp_path):
    from fedlada.errors import ConfigError
    from fedlada_app.server_app import serve

    class UntouchedGrid:
        def __getattr__(self, name):
            pytest.fail(f"the grid was used ({name}) before the host pairing was checked")

    cfg = load_config(overrides=["host.name=fedcollm", f"out_dir={tmp_path / 'run'}"])  # default SLMs differ
    with pytest.raises(ConfigError, match="'fedcollm' averages the SLMs' weights"):
        serve(UntouchedGrid(), cfg, FlowerConfig())
    assert not (tmp_path / "run").exists()


def test_set_up_gets_the_connect_window_and_a_failed_connect_says_why(tmp_path, monkeypatch):
    from fedlada.runner import RunDir
    from fedlada_app import server_app
    from fedlada_app.server_app import ConnectError, FlowerClients

    monkeypatch.setattr(server_app, "Message", lambda **kw: kw)  # outside a Flower run; the grid never reads them

    class SilentGrid:  # two SuperNodes that never answer
        def __init__(self):
            self.waits: list[float] = []

        def get_node_ids(self):
            return [11, 12]

        def send_and_receive(self, messages, *, timeout):
            self.waits.append(timeout)
            return []

    grid = SilentGrid()
    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path}"])
    pool = FlowerClients(grid, cfg, FlowerConfig(timeout=0.5, connect_timeout=0.2), RunDir(tmp_path))
    with pytest.raises(ConnectError, match=r"0 of 2 clients connected.*2 SuperNode\(s\) answered the set-up with an "
                                           r"error, not in time"):
        pool.connect()
    assert grid.waits == [0.5]  # max(timeout, connect_timeout): set-up never waits less than a step
    pool2 = FlowerClients(grid, cfg, FlowerConfig(timeout=0.5, connect_timeout=2.0), RunDir(tmp_path))
    with pytest.raises(ConnectError):
        pool2.connect()
    assert grid.waits[1] == 2.0  # a short step timeout no longer cuts the set-up short


def test_a_node_that_cannot_start_its_client_stops_the_run_with_its_reason(tmp_path, monkeypatch):
    """A user error on a node (its data, its model) comes back as a setup refusal: the server stops at once with the
    node's one-line reason, as the in-process runner does, instead of waiting out connect_timeout."""
    from fedlada.runner import RunDir
    from fedlada_app import server_app
    from fedlada_app.server_app import FlowerClients, SetupRefused

    monkeypatch.setattr(server_app, "Message", lambda **kw: kw)  # outside a Flower run; the grid never reads them
    reason = "data.clients.1.train (c1.jsonl): 1 question(s) whose prompt ... 'q7' (274 tokens)"

    class RefusingGrid:
        def __init__(self):
            self.calls = 0

        def get_node_ids(self):
            return [21]

        def send_and_receive(self, messages, *, timeout):
            self.calls += 1
            reply = types.SimpleNamespace(metadata=types.SimpleNamespace(src_node_id=21), has_error=lambda: False,
                                          content=records.setup_refusal_content(1, 2, reason))
            return [reply]

    grid = RefusingGrid()
    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path}"])
    pool = FlowerClients(grid, cfg, FlowerConfig(timeout=5, connect_timeout=300), RunDir(tmp_path))
    with pytest.raises(SetupRefused, match=r"client 1 \(SuperNode 21\) cannot start: data.clients.1.train .*'q7'"):
        pool.connect()
    assert grid.calls == 1
    assert records.setup_refusal(records.setup_content(0, 2, {}, {})) is None

    class TwoRefusals(RefusingGrid):  # both nodes refuse: both are named, each a fix on another machine
        def get_node_ids(self):
            return [21, 22]

        def send_and_receive(self, messages, *, timeout):
            return [types.SimpleNamespace(metadata=types.SimpleNamespace(src_node_id=n), has_error=lambda: False,
                                          content=records.setup_refusal_content(k, 2, f"problem {k}"))
                    for k, n in ((1, 21), (0, 22))]

    pool = FlowerClients(TwoRefusals(), cfg, FlowerConfig(timeout=5, connect_timeout=300), RunDir(tmp_path))
    with pytest.raises(SetupRefused, match=r"2 SuperNodes cannot start:\n  client 1 \(SuperNode 21\) cannot start: "
                                           r"problem 1\n  client 0 \(SuperNode 22\) cannot start: problem 0"):
        pool.connect()


def test_a_node_whose_partition_does_not_fit_the_run_refuses_the_set_up(tmp_path, monkeypatch):
    """A SuperNode started with a partition-id outside the run's clients answers the set-up with a refusal (the
    server then stops at once) instead of raising, which left the server waiting out connect_timeout."""
    from flwr.app import Context, RecordDict

    from fedlada_app import client_app

    monkeypatch.setattr(client_app, "Message", lambda content, reply_to: content)
    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path}"])
    req = records.Request(records.wire_config(cfg, FlowerConfig()), records.config_digest(cfg), round=-1)
    msg = types.SimpleNamespace(content=records.request_content(req))
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 2, "num-partitions": 2}, state=RecordDict(),
                  run_config={})
    reason = records.setup_refusal(client_app.setup(msg, ctx))
    assert reason == "node config partition-id=2 num-partitions=2; the run has 2 clients (partition-id 0..1)"

    def refusal(node_config):
        c = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
        return records.setup_refusal(client_app.setup(msg, c))

    # a mistyped key of ours would be ignored silently (telemetry left on): refused with the right spelling
    ok = {"partition-id": 0, "num-partitions": 2}
    assert refusal({**ok, "telemtry": False}) == ("node config key 'telemtry' is not one FedLaDa reads; did you mean "
                                                   "'telemetry'? (keys: partition-id, num-partitions, telemetry, "
                                                   "checkpoint-dir, compute-lock)")
    assert "did you mean 'checkpoint-dir'" in refusal({**ok, "checkpoint_dir": "/x"})
    assert refusal({**ok, "telemetry": "disabled"}) == "node config telemetry='disabled': expected true or false"
    assert client_app._telemetry(Context(run_id=1, node_id=5, node_config={**ok, "telemetry": " OFF"},
                                         state=RecordDict(), run_config={}), True) is False


def test_an_error_the_superlink_writes_for_a_lost_node_is_that_clients_reason(tmp_path, monkeypatch):
    """Flower answers a message to a node it lost with an error whose sender is the SuperLink (node 0); it is
    matched to the client by the message it replies to, not reported as a timeout."""
    from fedlada.runner import RunDir
    from fedlada_app import server_app
    from fedlada_app.server_app import FlowerClients

    def message(**kw):
        return types.SimpleNamespace(metadata=types.SimpleNamespace(message_id=""), **kw)

    monkeypatch.setattr(server_app, "Message", message)

    class LosingGrid:
        def send_and_receive(self, messages, *, timeout):
            for i, m in enumerate(messages):
                m.metadata.message_id = f"m{i}"
            err = types.SimpleNamespace(code=3, reason="Error: Node unavailable")
            return [types.SimpleNamespace(metadata=types.SimpleNamespace(src_node_id=0, reply_to_message_id="m0"),
                                          has_error=lambda: True, error=err)]

    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path}"])
    pool = FlowerClients(LosingGrid(), cfg, FlowerConfig(timeout=5, connect_timeout=5), RunDir(tmp_path))
    req = records.Request(records.wire_config(cfg, FlowerConfig()), records.config_digest(cfg), round=1)
    out = pool._exchange("train", {1: 7}, lambda key: req, round=1, timeout=5)
    assert [(r.client_id, r.error) for r in out] == [(1, "Flower error 3: Error: Node unavailable")]


def test_a_node_that_cannot_keep_checkpoints_refuses_and_a_lost_save_is_a_failed_step(tmp_path, monkeypatch):
    from fedlada.errors import ConfigError
    from fedlada.runner import RunDir, summarize_run
    from fedlada_app import client_app
    from fedlada_app.server_app import FlowerClients, _Reply

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"checkpoint directory .*a-file/ck .* is not writable on this node"):
        client_app._check_checkpoint_root(blocker / "ck")
    client_app._check_checkpoint_root(tmp_path / "ok" / "ck")
    assert (tmp_path / "ok").is_dir() and not (tmp_path / "ok" / "ck").exists()  # probed, not left behind
    (tmp_path / "ok" / "ck").mkdir()
    client_app._check_checkpoint_root(tmp_path / "ok" / "ck")
    assert (tmp_path / "ok" / "ck").is_dir() and not any((tmp_path / "ok" / "ck").iterdir())  # one it had: kept

    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path / 'run'}"])
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    pool = FlowerClients(types.SimpleNamespace(), cfg, FlowerConfig(), rd)
    monkeypatch.setattr(pool, "_to_clients", lambda kind, req, round: [
        _Reply(0), _Reply(1, error="Flower error 2: FileNotFoundError: /proc/nope")])
    rd.append("metrics.jsonl", [{"round": 2, "event": "eval", "who": "llm", "accuracy": 0.1, "n": 1}])  # evaluated,
    pool.save(tmp_path / "run" / "checkpoints" / "round_002")  # then saved: a lost save fails the round's step
    assert summarize_run(rd, cfg)["failed_steps"] == {"client1": [2]}


def test_a_fedlada_config_file_becomes_a_flwr_run_config_file(tmp_path):
    """``python -m fedlada_app.settings --run-config FILE``: the keys that differ from the app's defaults, which
    Flower's own parser and the app read back as the same config."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from fedlada_app.settings import run_config_file

    mine = load_config(REPO / "configs" / "smoke.toml")
    path = tmp_path / "smoke-flat.toml"
    path.write_text(run_config_file(mine))
    cfg, _ = split_run_config(get_fused_config_from_dir(REPO, parse_config_args([str(path)])))
    n = len(mine.models.slms)
    assert (cfg.rounds, cfg.data, cfg.lada, cfg.train, cfg.models.llm, cfg.models.slms[:n]) == \
        (mine.rounds, mine.data, mine.lada, mine.train, mine.models.llm, mine.models.slms)
    one_spec = load_config(overrides=["data.num_clients=3", 'models.slms=[{"hidden_size": 32}]'])
    flat = run_config_file(one_spec)  # shared in turn: spelled out per client
    assert all(f"models.slms.{k}.hidden_size = 32" in flat for k in range(3))
    path.write_text(flat)  # the spelled-out specs are the same model as the shared one: same roles, same LoRA init
    back, _ = split_run_config(get_fused_config_from_dir(REPO, parse_config_args([str(path)])))
    assert [back.models.slm_role(k) for k in range(3)] == [one_spec.models.slm_role(k) for k in range(3)] == \
        ["slm0"] * 3
    with pytest.raises(ConfigError, match="1 SLM spec\\(s\\) are shared by 4 clients in turn"):
        run_config_file(load_config(overrides=["data.num_clients=4", 'models.slms=[{"hidden_size": 32}]']))
    # plug-in selection rules travel too
    rules = load_config(overrides=['lada.plugins=["/abs/my_rules.py", "pkg.rules"]', "lada.method=gap-first"])
    path.write_text(run_config_file(rules))
    cfg, _ = split_run_config(get_fused_config_from_dir(REPO, parse_config_args([str(path)])))
    assert (cfg.lada.plugins, cfg.lada.method) == (("/abs/my_rules.py", "pkg.rules"), "gap-first")
    # the command line: --set overrides keys of the file
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fedlada_app.settings", "--run-config", "configs/smoke.toml", "--set",
                          "threads=1", "--set", "lada.budget=0.3"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "threads = 1\n" in out.stdout and "lada.budget = 0.3\n" in out.stdout


def test_the_flwr_run_config_file_gets_absolute_paths(tmp_path):
    """The ServerApp runs in the SuperLink's working directory: relative paths of the config (out_dir, data files,
    a local model folder) are made absolute against the directory the file is written from; hub ids stay."""
    from fedlada_app.settings import absolute_paths

    (tmp_path / "models" / "slm").mkdir(parents=True)
    cfg = load_config(overrides=["out_dir=runs/x", "data.public=d/public.jsonl", "data.general=/abs/general.jsonl",
                                 'data.clients=[{"train": "d/c0/train.jsonl", "test": "d/c0/test.jsonl"}]',
                                 "models.llm.source=Qwen/Qwen2.5-0.5B", 'models.slms=[{"source": "models/slm"}]'])
    fixed, changed = absolute_paths(cfg, tmp_path)
    assert fixed.out_dir == str(tmp_path / "runs/x")
    assert (fixed.data.public, fixed.data.general) == (str(tmp_path / "d/public.jsonl"), "/abs/general.jsonl")
    assert fixed.data.clients[0].train == str(tmp_path / "d/c0/train.jsonl")
    assert (fixed.models.llm.source, fixed.models.slms[0].source) == ("Qwen/Qwen2.5-0.5B", str(tmp_path / "models/slm"))
    assert changed == ["data.clients.0.train", "data.clients.0.test", "data.public", "models.slms.0.source", "out_dir"]
    assert absolute_paths(fixed, tmp_path / "elsewhere") == (fixed, [])


def test_flower_error_reasons_keep_the_exception_and_its_message():
    from fedlada_app.server_app import _last_line

    reason = "Traceback (most recent call last):\n  ...\n<class 'FileNotFoundError'>:<'client 1: no checkpoint'>"
    assert _last_line(reason) == "FileNotFoundError: client 1: no checkpoint"
    assert _last_line("Error: Node unavailable") == "Error: Node unavailable"


def test_two_supernodes_claiming_one_client_stop_the_run(tmp_path, monkeypatch):
    from fedlada.runner import RunDir
    from fedlada_app import server_app
    from fedlada_app.server_app import FlowerClients, SetupRefused

    monkeypatch.setattr(server_app, "Message", lambda **kw: kw)

    class TwinGrid:  # nodes 31 and 32 both started with partition-id=0
        def get_node_ids(self):
            return [31, 32]

        def send_and_receive(self, messages, *, timeout):
            return [types.SimpleNamespace(metadata=types.SimpleNamespace(src_node_id=m["dst_node_id"]),
                                          has_error=lambda: False, content=records.setup_content(0, 2, {}, {}))
                    for m in messages]

    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path}"])
    pool = FlowerClients(TwinGrid(), cfg, FlowerConfig(timeout=5, connect_timeout=300), RunDir(tmp_path))
    with pytest.raises(SetupRefused, match=r"SuperNodes 31 and 32 both serve client 0 \(node config partition-id=0\)"):
        pool.connect()


def test_a_supernode_with_another_public_pool_stops_the_run(tmp_path, monkeypatch):
    """Each node reads its own copy of data.public; the server's question ids name records of its own copy."""
    from fedlada.runner import RunDir
    from fedlada_app import server_app
    from fedlada_app.server_app import FlowerClients, SetupRefused

    monkeypatch.setattr(server_app, "Message", lambda **kw: kw)

    class Grid:  # node 41 serves client 0 with the server's pool, node 42 client 1 with an older copy
        def get_node_ids(self):
            return [41, 42]

        def send_and_receive(self, messages, *, timeout):
            return [types.SimpleNamespace(
                metadata=types.SimpleNamespace(src_node_id=m["dst_node_id"]), has_error=lambda: False,
                content=records.setup_content(m["dst_node_id"] - 41, 2, {}, {
                    "public_digest": "aaaa" if m["dst_node_id"] == 41 else "bbbb", "public": 40}))
                for m in messages]

    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path}"])
    pool = FlowerClients(Grid(), cfg, FlowerConfig(timeout=5, connect_timeout=300), RunDir(tmp_path),
                         public=("aaaa", 40))
    with pytest.raises(SetupRefused, match=r"client 1 \(SuperNode 42\) reads another public pool than the server "
                                           r"\(40 records, digest bbbb; the server's: 40 records, digest aaaa\)"):
        pool.connect()
    assert pool.setup[0] == ({}, {})  # the digest is checked, then left out of the setup row (as in-process)


def test_a_teach_message_naming_unknown_questions_is_a_data_error(tiny_overrides):
    from fedlada import rounds
    from fedlada.errors import DataError
    from fedlada.messages import TeachMessage
    from fedlada.prepare import load_data
    from fedlada.runner import Events, build_states

    cfg = load_config(overrides=tiny_overrides)
    server, clients, _ = build_states(cfg, load_data(cfg), Events())
    teach = TeachMessage(round=1, question_ids=(next(iter(server.public)), "not-in-the-pool"))
    with pytest.raises(DataError, match="1 question id\\(s\\) that are not in this public pool of .* "
                                        "\\(e.g. 'not-in-the-pool'\\)"):
        rounds.client_step(clients[0], teach, public=server.public, cfg=cfg, round=1)


def test_a_restarted_supernode_under_a_new_id_serves_its_client_again(tmp_path, monkeypatch):
    from fedlada.runner import RunDir
    from fedlada_app import server_app
    from fedlada_app.server_app import FlowerClients

    monkeypatch.setattr(server_app, "Message", lambda **kw: kw)

    class RestartGrid:  # client 1's node 12 died; it came back as node 13
        def __init__(self):
            self.setups: list[int] = []

        def get_node_ids(self):
            return [11, 13]

        def send_and_receive(self, messages, *, timeout):
            out = []
            for m in messages:
                if m["message_type"] == records.SETUP_TYPE:
                    self.setups.append(m["dst_node_id"])
                    out.append(types.SimpleNamespace(metadata=types.SimpleNamespace(src_node_id=m["dst_node_id"]),
                                                     has_error=lambda: False,
                                                     content=records.setup_content(1, 2, {}, {})))
            return out

    grid = RestartGrid()
    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path}"])
    pool = FlowerClients(grid, cfg, FlowerConfig(timeout=5, connect_timeout=5), RunDir(tmp_path))
    pool.nodes = {0: 11, 1: 12}
    req = records.Request(records.wire_config(cfg, FlowerConfig()), records.config_digest(cfg), round=2)
    replies = pool._to_clients(records.EVALUATE, lambda k: req, round=2)
    assert grid.setups == [13] and pool.nodes == {0: 11, 1: 13}
    # the SuperLink returned at once without replies: not called a timeout
    assert all("the SuperLink returned after" in r.error for r in replies)


def test_node_checkpoints_are_kept_per_run_and_a_resume_needs_them_at_set_up(tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict

    from fedlada_app import client_app

    def ctx(node_config):
        return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})

    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path / 'run'}"])
    req = records.Request(records.wire_config(cfg, FlowerConfig()), records.config_digest(cfg), round=-1,
                          checkpoint_dir=str(tmp_path / "run" / "checkpoints"))
    shared = {"partition-id": 0, "num-partitions": 2, "checkpoint-dir": str(tmp_path / "node")}
    root = client_app._checkpoint_root(ctx(shared), req, cfg)
    assert root.parent == tmp_path / "node" and root.name.startswith("run-")
    longer = dataclasses.replace(cfg, rounds=9)  # extending a run keeps its files; another run has its own
    assert client_app._checkpoint_root(ctx(shared), req, longer) == root
    assert client_app._checkpoint_root(ctx(shared), req, dataclasses.replace(cfg, seed=1)) != root
    assert client_app._checkpoint_root(ctx({"partition-id": 0}), req, cfg) == tmp_path / "run" / "checkpoints"
    # a partition-id that is not a number is refused at once, naming the value
    monkeypatch.setattr(client_app, "Message", lambda content, reply_to: content)
    msg = types.SimpleNamespace(content=records.request_content(req))
    reason = records.setup_refusal(client_app.setup(msg, ctx({"partition-id": "one", "num-partitions": 2})))
    assert reason == "node config partition-id='one' num-partitions=2: expected integers (partition-id 0..1)"


def test_a_user_error_in_a_client_step_stops_the_run_as_in_process(tmp_path, monkeypatch):
    """A client whose step hits a user error (a plug-in selection rule that raises) answers with its reason, and the
    server stops the run on it, as the in-process runner does, instead of counting a failed client and going on."""
    from flwr.app import Context, RecordDict

    from fedlada.messages import TeachMessage
    from fedlada.runner import RunDir
    from fedlada_app import client_app
    from fedlada_app.server_app import FlowerClients, _Reply

    cfg = load_config(overrides=["data.num_clients=2", f"out_dir={tmp_path}"])
    pool = FlowerClients(types.SimpleNamespace(get_node_ids=lambda: []), cfg, FlowerConfig(), RunDir(tmp_path))
    monkeypatch.setattr(pool, "_refresh", lambda round: None)
    reply = _Reply(1, message=types.SimpleNamespace(content=records.stop_content("selection rule 'oops' raised")))
    monkeypatch.setattr(pool, "_to_clients", lambda *a, **kw: [reply])
    with pytest.raises(ConfigError, match=r"^round 2: client 1: selection rule 'oops' raised$"):
        pool.step(b"teach", 2)
    # the client's side: a ConfigError in its step becomes that reply
    monkeypatch.setattr(client_app, "Message", lambda content, reply_to: content)
    entry = types.SimpleNamespace(state=None, public={}, holds="")
    monkeypatch.setattr(client_app, "_entry", lambda *a: entry)
    monkeypatch.setattr(client_app, "_sync", lambda *a: None)

    def failing_step(*a, **kw):
        raise ConfigError("selection rule 'oops' (round 1, pair llm->client0) raised KeyError: 'x'")

    import fedlada.host_rounds

    monkeypatch.setattr(fedlada.host_rounds, "client_step", failing_step)
    teach = TeachMessage(round=1, question_ids=(), paths=())
    req = records.Request(records.wire_config(cfg, FlowerConfig()), records.config_digest(cfg), round=1,
                          teach=teach.to_bytes())
    msg = types.SimpleNamespace(content=records.request_content(req))
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config={})
    assert records.stop_reason(client_app.train(msg, ctx)) == ("selection rule 'oops' (round 1, pair llm->client0) "
                                                               "raised KeyError: 'x'")


def test_flowers_deprecation_of_run_simulation_is_not_shown_to_users(caplog):
    """``fedlada run --engine flower`` calls Flower's run_simulation, which Flower 1.42 warns is deprecated: that
    is the framework's concern, so the warning is dropped (other Flower warnings stay)."""
    import logging

    from flwr.supercore.logger import warn_deprecated_feature

    from fedlada_app.simulate import _not_our_deprecation

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(_not_our_deprecation)
    try:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
            warn_deprecated_feature("something else")
    finally:
        flwr_logger.removeFilter(_not_our_deprecation)
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 1 and "something else" in shown[0]


def test_a_model_cache_smaller_than_the_clients_per_worker_is_warned_about(monkeypatch, caplog, tmp_path):
    """Ray's workers serve the clients in the same order every round, so an LRU cache of fewer entries than a
    worker's clients never hits: every client is prepared again for every message. Said up front, with the value
    that keeps them all."""
    import logging

    import flwr.simulation

    from fedlada_app import simulate
    from fedlada_app.settings import FlowerConfig

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: None)  # nothing runs
    monkeypatch.setattr(simulate, "resolve_threads", lambda n: 2 if n == 0 else n)  # a 2-core machine
    cfg = load_config(None, ["data.num_clients=20", "threads=1", f"out_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING, logger="fedlada_app.simulate"), \
            pytest.raises(RuntimeError, match="ended without finishing"):
        simulate.run_simulation(cfg, flower=FlowerConfig(model_cache=8))
    assert "flower.model_cache=8 prepared clients per worker x 2 worker(s) hold fewer than the run's 20" in caplog.text
    assert "--set flower.model_cache=10" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedlada_app.simulate"), pytest.raises(RuntimeError):
        simulate.run_simulation(cfg, flower=FlowerConfig(model_cache=10))
    assert "model_cache" not in caplog.text


def test_replies_are_counted_as_they_come(tmp_path):
    """A grid that can push and pull is polled, so the terminal shows how many clients answered a step (a grid
    with only ``send_and_receive`` is asked through it); replies to other messages are not counted."""
    from fedlada.runner import Events, RunDir
    from fedlada_app.server_app import FlowerClients

    class Counting(Events):
        def __init__(self):
            self.seen = []

        def progress(self, done, total):
            self.seen.append((done, total))

    def reply(to):
        return types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=to))

    class PollGrid:  # one reply per pull, then nothing more
        pull_interval = 0.0

        def __init__(self):
            self.pulls = 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            return [reply(sorted(ids)[0])] if self.pulls <= 2 else []

    events = Counting()
    grid = PollGrid()
    pool = FlowerClients(grid, load_config(overrides=[f"out_dir={tmp_path}"]), FlowerConfig(), RunDir(tmp_path),
                         events)
    got = pool._send_and_receive(["a", "b", "c"], timeout=0.3)
    assert [m.metadata.reply_to_message_id for m in got] == ["m0", "m1"]
    assert events.seen == [(0, 3), (1, 3), (2, 3)] and grid.pulls > 3  # polled until the timeout for the third

    class OnlySendAndReceive:
        def send_and_receive(self, messages, *, timeout):
            return [reply("x")]

    pool = FlowerClients(OnlySendAndReceive(), load_config(overrides=[f"out_dir={tmp_path}"]), FlowerConfig(),
                         RunDir(tmp_path), events)
    assert len(pool._send_and_receive(["a"], timeout=1)) == 1
