"""The same LaDa run in each engine, side by side: wall time, peak memory, bytes per round and client, and whether
the engines' numbers agree.

    python benchmarks/bench_engines.py [--out benchmarks/results/engines.json] [--engines inprocess,simulation,...]
                                       [--repeat N] [--work DIR] [--default] [--set KEY=VALUE ...]

``--default`` measures the built-in default run (``fedlada run`` with no arguments); without it a small config
(two rounds of tiny models) keeps the whole comparison to a few minutes.

Engines (each in a fresh interpreter, one after the other):

  inprocess           ``fedlada.runner.run``
  simulation          ``fedlada_app.simulate.run_simulation`` (Flower's simulation engine, Ray; SLMs kept loaded
                      in the workers: ``flower.model_cache`` = 8)
  simulation-reload   the same with ``flower.model_cache=0``: every message prepares its SLM from the disk cache
  deployment          SuperLink + one SuperNode per client on 127.0.0.1 with TLS and SuperNode authentication,
                      then ``flwr run`` (``fedlada_app.loopback``); every message is a fresh ClientApp process

Wall time is the engine's whole run as the user waits for it: interpreter, imports, engine start-up (Ray, the
SuperLink/SuperNodes), data and models from the warm cache, all rounds, shutdown. Models are pretrained into a
fresh cache before any engine runs, so no engine pays for pretraining. Peak memory is the largest sum of RSS over
the engine's whole process tree (Ray workers, SuperNodes and their ClientApp processes included), sampled every
0.2 s. Bytes per round and client are the protocol's (teach + report, as ``metrics.jsonl`` counts them) and, for
the Flower engines, the Flower message contents (``flower.jsonl``: config, records, telemetry) per train message.
The machine is shared and noisy: the script records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# small but real: the built-in benchmark, 3 heterogeneous SLMs, every step of a round with real sizes
CONFIG = [
    "rounds=2", "threads=1", "seed=0",
    "data.num_clients=3", "data.train_per_client=160", "data.test_per_client=48", "data.public_size=200",
    "data.general_size=2000", "data.eval_limit=48", "data.holdout_size=16", "data.max_steps=1", "data.max_value=40",
    "models.llm.hidden_size=128", "models.llm.num_layers=4", "models.llm.num_heads=4", "models.llm.lora_r=8",
    "models.llm.pretrain_tokens=40000",
    "models.slms.0.hidden_size=64", "models.slms.0.num_layers=3", "models.slms.0.pretrain_tokens=25000",
    "models.slms.1.hidden_size=96", "models.slms.1.num_layers=2", "models.slms.1.pretrain_tokens=25000",
    "models.slms.2.hidden_size=48", "models.slms.2.num_layers=4", "models.slms.2.pretrain_tokens=25000",
    "lada.candidates_per_round=48", "lada.paths_per_question=4", "lada.client_paths_per_question=2",
    "lada.max_new_tokens=48", "lada.min_count=4",
    "train.batch_size=16", "train.max_length=160",
]
ENGINES = ("inprocess", "simulation", "simulation-reload", "deployment")


# ------------------------------------------------------------------------------------------------- workers


def _worker(engine: str, overrides: list[str], out: Path) -> None:
    """One engine's run (in this fresh interpreter)."""
    from fedlada.config import load_config

    if engine == "inprocess":
        from fedlada.runner import run

        run(load_config(overrides=overrides + [f"out_dir={out}"]))
    elif engine.startswith("simulation"):
        from fedlada_app.settings import FlowerConfig
        from fedlada_app.simulate import run_simulation

        fcfg = FlowerConfig(model_cache=0 if engine == "simulation-reload" else 8)
        run_simulation(load_config(overrides=overrides + [f"out_dir={out}", "engine=flower"]), flower=fcfg)
    elif engine == "deployment":
        from fedlada_app.loopback import Loopback

        cfg = load_config(overrides=overrides)
        n = cfg.data.n_clients
        with Loopback(out.parent / f"{out.name}-loopback", num_keys=n) as lb:
            lb.start()
            for k in range(n):
                lb.register(k)
                lb.start_supernode(f"supernode{k}", key=k, partition=k, num_partitions=n)
            res = lb.run(dict(o.split("=", 1) for o in overrides + [f"out_dir={out}"]), timeout=7200)
            if res.returncode != 0:
                raise SystemExit(f"flwr run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    else:
        raise SystemExit(f"unknown engine {engine!r}")


def _prepare_models(overrides: list[str], out: Path) -> float:
    """Pretrain every model into the (fresh) cache, so that no engine's time includes it."""
    from fedlada.config import load_config
    from fedlada.prepare import load_data, prepare_model

    t0 = time.perf_counter()
    cfg = load_config(overrides=overrides + [f"out_dir={out}"])
    data = load_data(cfg)
    prepare_model(cfg.models.llm, role="llm", cfg=cfg, data=data)
    for k in range(cfg.data.n_clients):
        prepare_model(cfg.models.slm_for(k), role=f"slm{k % len(cfg.models.slms)}", cfg=cfg, data=data)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- measuring


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _measure(engine: str, overrides: list[str], out: Path, env: dict) -> dict:
    import shutil

    import psutil

    for old in (out, out.parent / f"{out.name}-loopback"):  # a fresh run, never a resumed one
        shutil.rmtree(old, ignore_errors=True)
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--worker", engine, "--run-dir", str(out), "--set",
                              *overrides], env=env, cwd=REPO)
    ps = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss(ps))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        return {"engine": engine, "error": f"exit code {child.returncode}", "wall_seconds": wall}
    return {"engine": engine, "wall_seconds": round(wall, 1), "peak_rss_mb": round(peak / 2**20), **_run_stats(out)}


def _rows(run_dir: Path, name: str) -> list[dict]:
    p = run_dir / name
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def _run_stats(out: Path) -> dict:
    metrics = _rows(out, "metrics.jsonl")
    nbytes = [r for r in metrics if r["event"] == "bytes"]
    down = [r["server_to_client"] for r in nbytes]
    up = [r["client_to_server"] for r in nbytes]
    stats = {"protocol_bytes_per_round_client": {"server_to_client": round(sum(down) / max(len(down), 1)),
                                                 "client_to_server": round(sum(up) / max(len(up), 1))},
             "round_seconds": [r["seconds"] for r in metrics if r["event"] == "round_time"],
             "final": json.loads((out / "summary.json").read_text())["final"],
             "llm_paths_correct": [r.get("llm_paths_correct") for r in metrics if r["event"] == "server_teach"],
             "server_selected": [r.get("server_selected") for r in metrics if r["event"] == "server_learn"]}
    flower = [r for r in _rows(out, "flower.jsonl") if r["event"] == "train"]
    if flower:  # train messages: teach bytes + config + records out; report + telemetry + evaluation back
        sent = sum(r["clients"] for r in flower)
        replied = sum(r["clients"] - len(r["failed"]) for r in flower)
        stats["flower_bytes_per_round_client"] = {
            "server_to_client": round(sum(r["sent_bytes"] for r in flower) / max(sent, 1)),
            "client_to_server": round(sum(r["received_bytes"] for r in flower) / max(replied, 1))}
        stats["flower_exchange_seconds"] = {e: round(sum(r["seconds"] for r in _rows(out, "flower.jsonl")
                                                         if r["event"] == e), 1)
                                            for e in ("query.setup", "train", "evaluate", "query.save")}
    return stats


def _comparable(run_dir: Path) -> list[dict]:
    from fedlada.runner import comparable_metrics

    return comparable_metrics(_rows(run_dir, "metrics.jsonl"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engines.json"))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (after the default)")
    ap.add_argument("--default", action="store_true",
                    help="measure the built-in default run (`fedlada run`'s config) instead of the small config")
    ap.add_argument("--work", default="", help="work directory (default: a temporary one); its model cache is reused")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions, interleaved (the table shows medians)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, list(args.set), Path(args.run_dir))
        return 0

    overrides = ([] if args.default else CONFIG) + list(args.set)
    work = Path(args.work or tempfile.mkdtemp(prefix="fedlada-bench-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    from fedlada_app.loopback import base_env

    env = base_env({"FEDLADA_CACHE": str(work / "cache")})
    os.environ.update({"FEDLADA_CACHE": env["FEDLADA_CACHE"], "HF_HUB_OFFLINE": "1"})
    load0 = os.getloadavg()
    pretrain = _prepare_models(overrides, work / "prepare")
    engines = args.engines.split(",")
    runs: list[dict] = []
    for rep in range(args.repeat):  # interleaved, so slow drifts of a shared machine hit every engine alike
        for engine in engines:
            print(f"running {engine} (repetition {rep + 1}/{args.repeat}) ...", flush=True)
            out = work / f"{engine}-{rep}"
            runs.append({"rep": rep, **_measure(engine, overrides, out, env), "run_dir": str(out)})
            print(json.dumps(runs[-1]), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # partial results survive an interruption
            Path(args.out).write_text(json.dumps({"config": overrides, "partial": True, "runs": runs}, indent=1))
    ref = _comparable(work / "inprocess-0") if "inprocess" in engines else None
    results = []
    for engine in engines:
        mine = [r for r in runs if r["engine"] == engine and "error" not in r]
        if not mine:
            results.append({"engine": engine, "error": next(r["error"] for r in runs if r["engine"] == engine)})
            continue
        walls = sorted(r["wall_seconds"] for r in mine)
        res = {**{k: v for k, v in mine[0].items() if k not in ("rep", "wall_seconds", "run_dir")},
               "wall_seconds": statistics.median(walls), "wall_seconds_all": [r["wall_seconds"] for r in mine],
               "peak_rss_mb": max(r["peak_rss_mb"] for r in mine)}
        if ref is not None:
            res["metrics_identical_to_inprocess"] = all(_comparable(Path(r["run_dir"])) == ref for r in mine)
        results.append(res)
    base = next((r for r in results if r["engine"] == "inprocess" and "error" not in r), None)
    for r in results:
        if base and "error" not in r:
            r["wall_vs_inprocess"] = round(r["wall_seconds"] / base["wall_seconds"], 2)
    report = {"config": overrides, "pretrain_seconds": round(pretrain, 1), "repeat": args.repeat,
              "results": results, "runs": runs, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "work": str(work)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))

    print(f"\n{'engine':<18} {'wall s (median)':>16} {'x inproc':>9} {'peak MB':>8} {'proto B/rnd/cl down/up':>24} "
          f"{'flower B/rnd/cl down/up':>24} {'same numbers':>13}   all walls")
    for r in results:
        if "error" in r:
            print(f"{r['engine']:<18} {r['error']}")
            continue
        p = r["protocol_bytes_per_round_client"]
        f = r.get("flower_bytes_per_round_client")
        print(f"{r['engine']:<18} {r['wall_seconds']:>16.1f} {r.get('wall_vs_inprocess', 0):>9.2f} "
              f"{r['peak_rss_mb']:>8} {p['server_to_client']:>11}/{p['client_to_server']:<12} "
              f"{(str(f['server_to_client']) + '/' + str(f['client_to_server'])) if f else '-':>24} "
              f"{str(r.get('metrics_identical_to_inprocess', '-')):>13}   {r['wall_seconds_all']}")
    print(f"load average before {load0}, after {os.getloadavg()} (on {os.cpu_count()} CPUs); written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
