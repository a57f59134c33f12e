"""The prepared benchmark scripts run to completion on a CPU and write the JSON they promise: the GPU check in its
``--tiny`` mode, the scoring benchmark on two tiny shapes, and the pool-memory benchmark on a small pool (about 10 s
each on an idle 2-core machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def test_gpu_check_tiny_on_cpu_writes_its_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu"],
                          cwd=tmp_path, env=_env(OUT=str(out)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())  # $OUT wins over --out
    assert result["mode"] == "tiny" and result["device"] == "cpu" and result["matmul_tflops"] > 0
    assert result["tokenizer"]["vocab"] > 100 and result["model"]["params_total"] > 0
    w = result["workload"]
    assert result["generation"]["rows"] == w["questions"] * w["paths"] and result["generation"]["tokens_per_second"] > 0
    for key in ("reference_paths", "sampled_paths"):
        # the MFU's denominator is a large fp32 matmul timed on the same shared CPU: under other load it can come out
        # far too low (MFU 2.9 once), so only its sign and finiteness are checked here, not its size (a benchmark's)
        mfu = result["scoring"][key]["mfu"]
        assert result["scoring"][key]["tokens"] > 0 and 0 < mfu < float("inf")
    assert result["scoring"]["reference_paths"]["pairs"] == w["score_pairs"]
    train = result["training"]
    assert train["steps"] == w["train_pairs"] // w["train_batch"] and train["tokens"] > 0
    assert 0 < train["mfu"] < float("inf")
    assert train["trainable_params"] < result["model"]["params_total"]  # LoRA adapters only
    assert "training:" in proc.stdout and "MFU" in proc.stdout


def test_gpu_check_saves_a_model_fedlada_can_load(tmp_path):
    """``--save-model DIR --save-only``: the check's (random) model and tokenizer, loadable as a local model."""
    from fedlada.models import load_model

    target = tmp_path / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--save-model", str(target), "--save-only"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generation:" not in proc.stdout  # stopped once saved
    model, tok = load_model(str(target))
    assert type(model).__name__ == "Qwen2ForCausalLM" and len(tok) > 100
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--save-only"], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--save-model" in bad.stderr


def test_scoring_benchmark_times_every_shape_and_agrees_with_the_naive_loop(tmp_path):
    out = tmp_path / "scoring.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--reps", "1",
                           "--questions", "3", "--shapes", "32x1x4,48x2x4", "--threads", "1", "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["shape"] for r in result["shapes"]] == ["32x1x4", "48x2x4"]
    for r in result["shapes"]:
        assert r["pairs"] == 3 * 4 and r["tokens"] > 0 and r["ratio_batched_over_naive"] > 0
        assert max(r["max_abs_diff_vs_naive"].values()) < 1e-4  # the three scorers give the same numbers
    assert result["ratio_batched_over_naive"] == result["shapes"][0]["ratio_batched_over_naive"]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--shapes", "32x1"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "HIDDENxLAYERSxHEADS" in bad.stderr and "Traceback" not in bad.stderr


def test_pool_memory_benchmark_on_small_pools(tmp_path):
    out = tmp_path / "pool.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_pool_memory.py"), "--sizes", "200",
                           "--chunk-size", "64", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pool_size"], r["mode"]) for r in rows] == [(200, "stream"), (200, "eager")]
    for r in rows:
        assert r["records"] == r["pool_size"] and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
        assert r["scored_tokens"] > r["records"] and r["mean_nll"] > 0
    assert rows[0]["mean_nll"] == rows[1]["mean_nll"]  # same records, same model: same scores
    assert rows[0]["cpu_seconds"] > 0
    assert "| pool |" in proc.stdout


def test_quality_benchmark_is_fedlada_compare_with_the_baselines(monkeypatch, capsys):
    import importlib.util

    import fedlada.cli

    seen = []
    monkeypatch.setattr(fedlada.cli, "main", lambda argv: seen.append(argv) or 0)
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--set", "rounds=3", "--seeds", "2", "--out", "x"])
    assert mod.main() == 0
    argv = seen[0]
    assert argv[:2] == ["compare", "--methods"] and argv[2] == "local,all,random,lada-sft,lada"
    assert argv[argv.index("--seeds") + 1] == "2" and argv[argv.index("--out") + 1] == "x"
    assert argv[argv.index("--set") + 1] == "rounds=3"
    assert "wall time" in capsys.readouterr().out


def test_scenario_claims_pair_runs_by_seed(tmp_path):
    """benchmarks/scenarios.py: every shipped scenario config loads with its method list, and the claim table
    pairs treatment and control seed by seed (hand-computed differences)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scenarios
    finally:
        sys.path.pop(0)
    from fedlada.compare import parse_method
    from fedlada.config import load_config
    from fedlada.host_rounds import check_host_config

    for config, methods in scenarios.SCENARIOS.values():
        base = load_config(ROOT / config)
        for m in methods:  # a host the scenario does not support would be refused here
            host, method, _ = parse_method(m, base.host.name)
            check_host_config(load_config(ROOT / config, [f"host.name={host}", f"lada.method={method}"]))

    def put(method, seed, slm, llm):
        d = tmp_path / "a" / method / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"mean_slm_accuracy": slm, "final": {"llm": llm}}))

    for seed, (t, c) in enumerate([(0.30, 0.20), (0.25, 0.25), (0.20, 0.30)]):
        put("fedmkt-lada", seed, t, 0.1)
        put("fedmkt-host", seed, c, 0.05)
    md, res = scenarios.claims(tmp_path, ["a"], range(3))
    p = res["a: FedMKT + LaDa vs FedMKT alone"]
    assert p["seeds"] == 3 and p["wins"] == 1 and p["ties"] == 1
    assert abs(p["diff"][0]) < 1e-12 and abs(p["diff"][1] - 0.1) < 1e-12  # diffs +0.1, 0, -0.1
    assert abs(p["diff_llm"][0] - 0.05) < 1e-12
    assert "| a | FedMKT + LaDa vs FedMKT alone | 25.0 ± 5.0 | 25.0 ± 5.0 | 0.0 ± 10.0 | 1/1/3 | 5.0 ± 0.0 |" in md
    assert len(res) == 1  # comparisons without runs are left out
    # the seeds of claims.md are the table's: counted from the config's seed, as fedlada compare counts them
    seeds = scenarios.scenario_seeds(2, ["seed=1"], ROOT)
    assert set(seeds) == set(scenarios.SCENARIOS) and all(s == range(1, 3) for s in seeds.values())
    md, res = scenarios.claims(tmp_path, ["a"], {"a": range(1, 3)})
    assert res["a: FedMKT + LaDa vs FedMKT alone"]["seeds"] == 2  # seeds 1 and 2 only
    assert scenarios.scenario_seeds(3, [], ROOT)["a"] == range(0, 3)


@pytest.mark.slow
def test_gpu_suite_dry_run_on_a_cpu(tmp_path):
    """``DEVICE=cpu QUICK=1 benchmarks/gpu_suite.sh``: the GPU suite's steps that need no TRL run on a CPU, the
    `fedlada run` step loads the saved check model as its LLM, and every step ends with exit status 0."""
    out = tmp_path / "suite"
    env = _env(DEVICE="cpu", QUICK="1", STEPS="run scoring gpu-check", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "suite.log").read_text()
    for name in ("save-run", "run", "scoring", "gpu-check"):
        assert f"=== {name}: exit 0" in log, log[-3000:]
    assert "train-small" not in log  # not asked for
    assert {"suite.log", "run.toml", "run.tar.gz", "scoring.json", "gpu_check.json", "gpu_check_profile.txt"} <= {
        p.name for p in out.iterdir()}
    assert "mean SLM accuracy" in log and json.loads((out / "scoring.json").read_text())["device"] == "cpu"


def test_gpu_suite_refuses_cuda_without_a_gpu_before_writing_anything(tmp_path):
    """Asked for CUDA where torch sees none, the suite stops at once with exit status 2 and creates no folder (a
    stand-in interpreter that answers "no GPU" keeps this fast and the same on a GPU machine)."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")  # `python -c "...cuda.is_available()..."` -> not available
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "out")], cwd=ROOT,
                          env=_env(DEVICE="cuda", PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and not (tmp_path / "out").exists()


def test_training_benchmark_without_trl_variants(tmp_path):
    """``bench_train.py`` runs its own variants without TRL installed (TRL is imported only for the ``trl_*`` ones),
    and an unknown variant is refused with the list of known ones."""
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--variants", "ours,plain",
                           "--examples", "16", "--reps", "1", "--hidden", "32", "--layers", "1", "--heads", "4",
                           "--threads", "1", "--out", str(out)], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"ours", "plain"} and report["config"]["trl"] is None
    assert report["ratios"]["ours/plain/steps/best"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--variants", "ours,bogus"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "trl_precompute" in bad.stderr and "Traceback" not in bad.stderr
