"""Peak memory and time of validating and scoring a public pool of 1k, 10k and 100k records, streamed in chunks.

For each pool size a fresh subprocess loads one tiny model, then reads the pool with ``fedlada.data.iter_records``
(validating every record, two passes) and scores every record's reference path with ``fedlada.pool.score_pool`` in
chunks of ``--chunk-size`` records. Its peak resident memory (``ru_maxrss``) and wall time are reported next to the
same work done eagerly (``read_records`` into a list, then ``score_pool`` over the list), which holds every record
as a Python object at once. Streaming should keep the peak flat as the pool grows; the eager peak grows with it.
The children use one torch thread and report CPU time next to wall time: on a shared machine CPU time is the
steadier measure of the work.

    python benchmarks/bench_pool_memory.py                       # 1k, 10k, 100k; JSON in benchmarks/results/
    python benchmarks/bench_pool_memory.py --sizes 1000,5000     # a quick look

Pools come from ``fedlada.data.make_benchmark`` (public pool only), so they are JSONL in the data contract (ids are
unique; at 100k the generator runs out of distinct short questions and some question texts repeat).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(pool: Path, model_dir: Path, mode: str, chunk_size: int, batch_size: int) -> dict:
    import numpy as np
    import torch

    from fedlada.data import iter_records, read_records
    from fedlada.models import load_model
    from fedlada.pool import score_pool

    torch.set_num_threads(1)
    model, tok = load_model(model_dir)
    base = rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    if mode == "stream":
        records = iter_records(pool)
    else:
        records = read_records(pool)
    after_read = rss_mb()
    scores = score_pool(model, tok, records, chunk_size=chunk_size, batch_size=batch_size, max_length=512)
    secs, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"mode": mode, "records": len(scores), "seconds": round(secs, 1), "cpu_seconds": round(cpu, 1),
            "baseline_rss_mb": round(base, 1), "rss_after_read_mb": round(after_read, 1),
            "peak_rss_mb": round(rss_mb(), 1), "peak_over_baseline_mb": round(rss_mb() - base, 1),
            "mean_nll": round(float(np.mean(scores.nll)), 4), "scored_tokens": int(scores.num_tokens.sum())}


def prepare(work: Path, sizes: list[int]) -> Path:
    from fedlada import reasoning
    from fedlada.data import make_benchmark, read_records
    from fedlada.models import build_tiny_model, save_model, train_tokenizer

    # Large pools exhaust the generator's distinct short questions; its "repeated question" warnings are expected.
    logging.getLogger("fedlada.data.benchmark").setLevel(logging.ERROR)
    for n in sizes:
        out = work / f"pool_{n}"
        if not (out / "public.jsonl").is_file():
            print(f"generating a pool of {n} records", flush=True)
            make_benchmark(out, seed=0, num_clients=1, train_per_client=1, test_per_client=1, public_size=n,
                           general_size=0)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        recs = read_records(work / f"pool_{min(sizes)}" / "public.jsonl")
        tok = train_tokenizer([reasoning.format_prompt(r.question) + reasoning.format_path(r.rationale, r.answer)
                               for r in recs], vocab_size=512)
        save_model(build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0), tok, model_dir)
    return model_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--modes", default="stream,eager", help="stream and/or eager")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", default="", help="where pools and the model are kept (default: a temp dir)")
    ap.add_argument("--out", default=str(HERE / "results" / "pool_memory.json"))
    ap.add_argument("--child", nargs=2, metavar=("POOL", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.mode, args.chunk_size,
                               args.batch_size)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="fedlada-pool-bench-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare(work, sizes)
    rows = []
    for n in sizes:
        pool = work / f"pool_{n}" / "public.jsonl"
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", str(pool), str(model_dir), "--mode", mode,
                   "--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            row = {"pool_size": n, "pool_mb": round(pool.stat().st_size / 2**20, 1),
                   **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{n:>7} {mode:6} peak {row['peak_rss_mb']:8.1f} MB (+{row['peak_over_baseline_mb']:7.1f} over the "
                  f"loaded model)  {row['seconds']:7.1f} s wall, {row['cpu_seconds']:7.1f} s CPU", flush=True)
    result = {"chunk_size": args.chunk_size, "batch_size": args.batch_size, "threads": 1,
              "model": "tiny Llama, hidden 32, 2 layers (fedlada.models.build_tiny_model)", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n| pool | file MB | mode | peak RSS MB | over baseline MB | wall s | CPU s | records per CPU s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pool_size']} | {r['pool_mb']} | {r['mode']} | {r['peak_rss_mb']} | {r['peak_over_baseline_mb']} "
              f"| {r['seconds']} | {r['cpu_seconds']} | {r['records'] / max(r['cpu_seconds'], 1e-9):.0f} |")
    print(f"\nwrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
