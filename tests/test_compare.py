"""The experiment table: aggregation (mean, sample std) and the written Markdown/CSV/plot."""

import csv
import math

import pytest

from fedlada.compare import aggregate, write_table


def _summary(c0, c1, llm, llm0=0.1):
    return {"final": {"client0": c0, "client1": c1, "llm": llm}, "mean_slm_accuracy": (c0 + c1) / 2,
            "accuracy": {"client0": {"0": 0.0}, "client1": {"0": 0.2}, "llm": {"0": llm0}},
            "bytes_client_to_server": 100, "bytes_server_to_client": 50, "train_tokens_federated": 1000}


def test_aggregate_mean_and_sample_std(tmp_path):
    rows = {("lada", 0): _summary(0.5, 0.7, 0.4), ("lada", 1): _summary(0.3, 0.5, 0.6),
            ("local", 0): _summary(0.2, 0.2, 0.1), ("local", 1): _summary(0.2, 0.4, 0.1)}
    res = aggregate(rows, methods=("local", "lada"), seeds=(0, 1))
    lada = {e["method"]: e for e in res["table"]}["lada"]
    assert lada["mean_slm"][0] == pytest.approx(0.5)
    assert lada["mean_slm"][1] == pytest.approx(math.sqrt(((0.6 - 0.5) ** 2 + (0.4 - 0.5) ** 2) / 1))
    assert lada["llm"] == (pytest.approx(0.5), pytest.approx(math.sqrt(0.02)))
    assert lada["slm_before"][0] == pytest.approx(0.1)
    assert lada["bytes"] == (150, 0.0)
    files = write_table(res, tmp_path, title="t")
    md = files["markdown"].read_text()
    assert "| lada | 2 | 50.0 ± 14.1 |" in md
    rows_csv = list(csv.reader(open(files["csv"])))
    assert ["lada", "mean_slm", "0.5", str(lada["mean_slm"][1])] in rows_csv
    assert files["plot"].stat().st_size > 1000
    # a run without a client's round-0 evaluation (or with a None accuracy) leaves it out of slm_before
    gap = _summary(0.4, 0.6, 0.5)
    gap["accuracy"]["client1"] = {"0": None}
    del gap["accuracy"]["client0"]
    res = aggregate({("lada", 0): _summary(0.5, 0.7, 0.4), ("lada", 1): gap}, methods=("lada",), seeds=(0, 1))
    assert res["table"][0]["slm_before"] == (pytest.approx(0.1), None)  # one value: no sample std


def test_methods_may_name_their_host():
    from fedlada.compare import parse_method
    from fedlada.errors import ConfigError

    assert parse_method("lada", "none") == ("none", "lada", "lada")
    assert parse_method("lada", "fedmkt") == ("fedmkt", "lada", "fedmkt-lada")
    assert parse_method("fedcollm:host-random", "none") == ("fedcollm", "host-random", "fedcollm-host-random")
    assert parse_method("none:all", "fedmkt") == ("none", "all", "all")
    with pytest.raises(ConfigError, match="host 'fedx'"):
        parse_method("fedx:lada", "none")
    with pytest.raises(ConfigError, match="method 'ladda'"):
        parse_method("ladda", "none")


def test_table_runs_keep_the_configs_list_lengths(tmp_path, monkeypatch):
    """A scenario config with one SLM spec stays with one in every run of its table (flattening it onto the
    defaults used to bring back the default's three SLMs for clients 1 and 2)."""
    from pathlib import Path

    from fedlada import runner
    from fedlada.compare import run_table
    from fedlada.config import load_config

    seen = []

    class Done:
        run_dir = tmp_path
        summary = {"final": {"client0": 0.1, "llm": 0.0}, "mean_slm_accuracy": 0.1, "accuracy": {
            "client0": {"0": 0.0}, "llm": {"0": 0.0}}, "bytes_client_to_server": 1, "bytes_server_to_client": 1,
            "train_tokens_federated": 1}

    monkeypatch.setattr(runner, "run", lambda cfg, **kw: seen.append(cfg) or Done())
    reports = []
    monkeypatch.setattr("fedlada.report.write_report", reports.append)
    base = load_config(Path(__file__).resolve().parent.parent / "configs" / "scenario-a-identical.toml")
    run_table(base, methods=("local", "fedcollm:host"), seeds=(0, 1), out=tmp_path)
    assert len(reports) == 4  # each run of the table gets its report
    assert len(seen) == 4 and all(len(c.models.slms) == 1 and c.models.slms == base.models.slms for c in seen)
    assert [(c.host.name, c.lada.method, c.seed) for c in seen] == [
        ("none", "local", 0), ("none", "local", 1), ("fedcollm", "host", 0), ("fedcollm", "host", 1)]
    assert seen[2].out_dir == str(tmp_path / "fedcollm-host" / "seed0")


def test_finished_only_tabulates_what_is_there_and_runs_nothing(tmp_path, monkeypatch):
    import json

    from fedlada import runner
    from fedlada.compare import run_table
    from fedlada.config import dump_toml, load_config, with_overrides

    def boom(cfg, **kw):
        raise AssertionError(f"finished_only ran {cfg.out_dir}")

    monkeypatch.setattr(runner, "run", boom)
    base = load_config(None, ["rounds=1"])
    for method, seed, acc in (("local", 0, 0.2), ("local", 1, 0.4), ("lada", 0, 0.3)):
        d = tmp_path / method / f"seed{seed}"
        d.mkdir(parents=True)
        cfg = with_overrides(base, {"lada.method": method, "seed": seed, "out_dir": str(d)})
        (d / "config.toml").write_text(dump_toml(cfg))
        (d / "summary.json").write_text(json.dumps(_summary(acc, acc, 0.1)))
    res = run_table(base, methods=("local", "lada", "random"), seeds=(0, 1), out=tmp_path, finished_only=True)
    rows = {e["method"]: e for e in res["table"]}
    assert set(rows) == {"local", "lada"} and rows["local"]["seeds"] == 2 and rows["lada"]["seeds"] == 1
    assert rows["local"]["mean_slm"][0] == pytest.approx(0.3)
    assert "| lada | 1 | 30.0 |" in write_table(res, tmp_path / "t")["markdown"].read_text()


def test_compare_counts_its_seeds_from_the_configured_seed(tmp_path, monkeypatch):
    import json

    from fedlada import runner
    from fedlada.cli import main
    from fedlada.config import dump_toml, load_config, with_overrides

    monkeypatch.setattr(runner, "run", lambda cfg, **kw: (_ for _ in ()).throw(AssertionError(cfg.out_dir)))
    base = load_config(None, ["rounds=1", "seed=7"])
    for seed in (7, 8):
        d = tmp_path / "local" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "config.toml").write_text(dump_toml(with_overrides(base, {"lada.method": "local", "seed": seed,
                                                                        "out_dir": str(d)})))
        (d / "summary.json").write_text(json.dumps(_summary(0.2, 0.2, 0.1)))
    assert main(["compare", "--finished-only", "--seeds", "2", "--methods", "local", "--set", "rounds=1",
                 "--set", "seed=7", "--out", str(tmp_path)]) == 0
    assert "| local | 2 |" in (tmp_path / "table.md").read_text()


def test_a_cell_another_process_runs_is_taken_after_the_others(tmp_path, monkeypatch):
    """Two tables into one folder: a cell the other process holds is not where this one stops; it runs the other
    cells first, then waits for that cell and takes its result."""
    from fedlada import compare, runner
    from fedlada.compare import run_table
    from fedlada.config import load_config
    from fedlada.errors import RunDirBusy

    calls, busy_left = [], [2]

    class Done:
        run_dir = tmp_path
        summary = {"final": {"client0": 0.1, "llm": 0.0}, "mean_slm_accuracy": 0.1, "accuracy": {
            "client0": {"0": 0.0}, "llm": {"0": 0.0}}, "bytes_client_to_server": 1, "bytes_server_to_client": 1,
            "train_tokens_federated": 1}

    def fake_run(cfg, **kw):
        calls.append((cfg.lada.method, cfg.seed))
        if (cfg.lada.method, cfg.seed) == ("local", 0) and busy_left[0]:
            busy_left[0] -= 1
            raise RunDirBusy(f"run directory {cfg.out_dir} is in use by another process (pid 1)")
        return Done()

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr("fedlada.report.write_report", lambda d: None)
    monkeypatch.setattr(compare, "BUSY_POLL_SECONDS", 0.0)
    res = run_table(load_config(None, ["rounds=1"]), methods=("local", "lada"), seeds=(0, 1), out=tmp_path)
    assert calls == [("local", 0), ("local", 1), ("lada", 0), ("lada", 1), ("local", 0), ("local", 0)]
    assert {e["method"]: e["seeds"] for e in res["table"]} == {"local": 2, "lada": 2}


def test_the_table_folder_is_not_a_runs_and_methods_are_named(tmp_path, monkeypatch, capsys):
    """``--out`` into a run's folder is refused before any run (the table's files and runs would land among its);
    an empty ``--methods`` is refused rather than running the five default methods."""
    from fedlada import runner
    from fedlada.cli import main
    from fedlada.compare import check_table_folder
    from fedlada.errors import ConfigError

    check_table_folder(tmp_path / "new")
    (tmp_path / "exp").mkdir()  # an experiment's folder holding its config (and notes): the table goes there too
    (tmp_path / "exp" / "config.toml").write_text("rounds = 1\n")
    (tmp_path / "exp" / "notes.txt").write_text("mine")
    check_table_folder(tmp_path / "exp")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="is a run's folder"):
        check_table_folder(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_table_folder(tmp_path / "file")

    monkeypatch.setattr(runner, "run", lambda cfg, **kw: (_ for _ in ()).throw(AssertionError(cfg.out_dir)))
    assert main(["compare", "--methods", " ", "--out", str(tmp_path / "t")]) == 2
    assert "--methods: expected comma-separated methods, found nothing" in capsys.readouterr().err
