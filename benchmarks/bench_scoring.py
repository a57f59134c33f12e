"""Speed of path scoring: naive per-example loop vs batched ``score_paths`` vs batched with prompt-cache reuse.

    python benchmarks/bench_scoring.py [--out benchmarks/results/scoring.json] [--questions 32] [--paths 4]
                                       [--shapes 256x6x4,256x4x8,96x3x4,128x2x4,64x4x4] [--device cuda]

For each model shape (by default a 4.9M-parameter reference Llama, hidden 256 x 6 layers, then the default run's
LLM and three SLMs) builds a tiny Llama on one BPE tokenizer, takes questions and rationales
from the built-in benchmark's public pool (``fedlada.data.make_benchmark``), gives each question M paths (its own
rationale and M-1 others), and times in one process, interleaved, with a few repetitions:

  (a) naive: one forward per (prompt, path) pair, no padding, full log-softmax;
  (b) ``score_paths(..., reuse_prefix=False)``: length-bucketed right-padded batches;
  (c) ``score_paths(..., reuse_prefix=True)``: each prompt encoded once, its KV cache reused for its M paths.

Tokens/s counts prompt + path tokens of every pair (the same numerator for all three, so ratios are time ratios)
and uses the best of the repetitions (the machine is shared); medians are reported too.
The ideal speed-up of (c) over (b) counts token positions run through the model: without reuse every pair runs
P + C positions, with reuse a question runs P + M*C, so ideal = M*(P+C) / (P + M*C) for mean prompt length P and mean
path length C (it ignores attention's quadratic term, padding and the second forward call).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlada.models import build_tiny_model, count_parameters, train_tokenizer  # noqa: E402
from fedlada.paths import encode_pair, score_paths  # noqa: E402


def _prompt(question: str) -> str:
    try:
        from fedlada.reasoning import format_prompt
        return format_prompt(question)
    except ImportError:
        return f"Question: {question}\nReasoning:\n"


def _path(rationale: str, answer: str) -> str:
    try:
        from fedlada.reasoning import format_path
        return format_path(rationale, answer)
    except ImportError:
        return f"{rationale}\nAnswer: {answer}"


def _synthetic(n: int, seed: int) -> list[tuple[str, str]]:
    """Arithmetic word problems, one equation per rationale line (used if the benchmark generator is absent)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        name, item = rng.choice(["Ava", "Ben", "Chloe", "Dev"]), rng.choice(["apples", "pens", "coins", "cards"])
        steps, value = int(rng.integers(1, 7)), int(rng.integers(2, 20))
        q, lines = f"{name} starts with {value} {item}.", []
        for _ in range(steps):
            k = int(rng.integers(1, 20))
            q += f" Then {name} gets {k} more {item} from a friend at the market."
            lines.append(f"{value} + {k} = {value + k}")
            value += k
        out.append((q + f" How many {item} does {name} have now?", _path("\n".join(lines), str(value))))
    return out


def load_items(n: int, seed: int) -> tuple[list[tuple[str, str]], str]:
    """(question, path) items from the benchmark's public pool, else synthetic ones; and where they came from."""
    try:
        from fedlada.data import make_benchmark, read_records
    except ImportError:
        return _synthetic(n, seed), "synthetic"
    with tempfile.TemporaryDirectory() as d:
        layout = make_benchmark(d, seed=seed, num_clients=1, train_per_client=8, test_per_client=8,
                                public_size=max(n, 64), general_size=200)
        records = read_records(layout.public)
    return [(r.question, _path(r.rationale, r.answer)) for r in records[:n]], "fedlada.data.make_benchmark public pool"


def naive_scores(model, tok, prompts, paths, max_length=512) -> np.ndarray:
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for p, y in zip(prompts, paths):
            pi, yi = encode_pair(tok, p, y, max_length=max_length)
            logp = torch.log_softmax(model(torch.tensor([pi + yi], device=device)).logits[0].float(), dim=-1)
            idx = torch.arange(len(pi) - 1, len(pi) + len(yi) - 1, device=device)
            out.append(logp[idx, torch.tensor(yi, device=device)].double().sum().item())
    return np.array(out)


# hidden x layers x heads: the benchmark's reference model, then the default run's LLM and its three SLMs
DEFAULT_SHAPES = "256x6x4,256x4x8,96x3x4,128x2x4,64x4x4"


def _shape(text: str) -> tuple[int, int, int]:
    try:
        h, l, a = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: --shapes: expected HIDDENxLAYERSxHEADS (e.g. 256x4x8), found {text!r}") from None
    return h, l, a


def bench_shape(shape, tok, prompts, paths, args) -> dict:
    """Time the three scorers on one model shape (interleaved repetitions) and return its row."""
    hidden, layers, heads = shape
    device = torch.device(args.device)
    model = build_tiny_model(tok, hidden_size=hidden, num_layers=layers, num_heads=heads, seed=args.seed).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    pairs = [encode_pair(tok, p, y, max_length=512) for p, y in zip(prompts, paths)]
    P = float(np.mean([len(p) for p, _ in pairs]))
    C = float(np.mean([len(y) for _, y in pairs]))
    tokens = int(sum(len(p) + len(y) for p, y in pairs))
    M = args.paths
    methods = {
        "naive": lambda: naive_scores(model, tok, prompts, paths),
        "batched": lambda: score_paths(model, tok, prompts, paths, batch_size=args.batch_size,
                                       reuse_prefix=False).logprob,
        "batched+reuse": lambda: score_paths(model, tok, prompts, paths, batch_size=args.batch_size,
                                             reuse_prefix=True).logprob,
    }
    results = {name: fn() for name, fn in methods.items()}  # warm-up, and the agreement check
    max_diff = {name: float(np.abs(r - results["naive"]).max()) for name, r in results.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    # The machine is shared and noisy: the best of the interleaved repetitions is the least disturbed estimate.
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    n_params = count_parameters(model)
    # forward FLOPs of the naive loop (2 x weights x positions, attention ignored): how close to the device's limit
    naive_gflops = 2 * n_params * tokens / best["naive"] / 1e9
    return {
        "shape": f"{hidden}x{layers}x{heads}", "model_params": n_params, "pairs": len(pairs),
        "mean_prompt_tokens": P, "mean_path_tokens": C, "tokens": tokens,
        "seconds": times, "best_seconds": best, "median_seconds": median,
        "tokens_per_s": {name: tokens / t for name, t in best.items()},
        "naive_forward_gflops_per_s": naive_gflops,
        "ratio_batched_over_naive": best["naive"] / best["batched"],
        "ratio_reuse_over_batched": best["batched"] / best["batched+reuse"],
        "ratio_reuse_over_naive": best["naive"] / best["batched+reuse"],
        "median_ratio_batched_over_naive": median["naive"] / median["batched"],
        "median_ratio_reuse_over_batched": median["batched"] / median["batched+reuse"],
        "ideal_ratio_reuse_over_batched": M * (P + C) / (P + M * C),
        "max_abs_diff_vs_naive": max_diff,
    }


def _matmul_gflops(device: torch.device) -> float:
    """fp32 GEMM throughput of the device (2048 x 256 @ 256 x 256, the tiny models' widest shape; on a GPU
    8192^3, so that the card is filled): the ceiling."""
    n_rows, width = (8192, 8192) if device.type == "cuda" else (2048, 256)
    a, b = torch.randn(n_rows, width, device=device), torch.randn(width, width, device=device)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, n = time.perf_counter(), 50
    for _ in range(n):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n_rows * width * width * n / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/scoring.json")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--paths", type=int, default=4, help="M, paths per question")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (fp32 weights; TF32 matmuls on a GPU)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES,
                    help=f"comma-separated HIDDENxLAYERSxHEADS model shapes (default: {DEFAULT_SHAPES})")
    args = ap.parse_args(argv)
    shapes = [_shape(x) for x in args.shapes.split(",") if x.strip()]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    items, source = load_items(max(args.questions * args.paths, 256), args.seed)
    tok = train_tokenizer([_prompt(q) + y for q, y in items], vocab_size=512)
    rng = np.random.default_rng(args.seed)
    prompts, paths = [], []
    for i in range(args.questions):
        others = rng.choice([j for j in range(len(items)) if j != i], size=args.paths - 1, replace=False)
        for j in [i, *others]:
            prompts.append(_prompt(items[i][0]))
            paths.append(items[j][1])
    peak = _matmul_gflops(device)
    rows = []
    for shape in shapes:
        rows.append(bench_shape(shape, tok, prompts, paths, args))
        r = rows[-1]
        print(f"{r['shape']:>9} ({r['model_params'] / 1e6:.2f}M params): naive {r['tokens_per_s']['naive']:>7.0f} "
              f"tok/s ({r['naive_forward_gflops_per_s']:.0f} GFLOP/s of a {peak:.0f} GFLOP/s GEMM), batched "
              f"{r['ratio_batched_over_naive']:.2f}x naive, +reuse {r['ratio_reuse_over_batched']:.2f}x batched "
              f"(ideal {r['ideal_ratio_reuse_over_batched']:.2f}x), max |diff| {max(r['max_abs_diff_vs_naive'].values()):.1e}",
              flush=True)
    first = rows[0]
    report = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.processor(),
        "data": source, "vocab": len(tok), "questions": args.questions, "paths_per_question": args.paths,
        "batch_size": args.batch_size, "reps": args.reps, "gemm_fp32_gflops_per_s": peak,
        "ideal_formula": "M*(P+C) / (P + M*C)", "shapes": rows,
        # the first shape's numbers at the top level, as before
        **{k: first[k] for k in ("model_params", "pairs", "mean_prompt_tokens", "mean_path_tokens", "tokens",
                                 "seconds", "best_seconds", "median_seconds", "tokens_per_s",
                                 "ratio_batched_over_naive", "ratio_reuse_over_batched",
                                 "median_ratio_batched_over_naive", "median_ratio_reuse_over_batched",
                                 "ideal_ratio_reuse_over_batched", "max_abs_diff_vs_naive")},
    }
    print(f"targets: batched >= 5x naive, reuse >= 1.3x batched at M={args.paths}")
    print(f"{'shape':>9}{'params':>9}{'naive tok/s':>13}{'batched/naive':>15}{'reuse/batched':>15}{'ideal':>7}"
          f"{'reuse/naive':>13}")
    for r in rows:
        print(f"{r['shape']:>9}{r['model_params'] / 1e6:>8.2f}M{r['tokens_per_s']['naive']:>13.0f}"
              f"{r['ratio_batched_over_naive']:>14.2f}x{r['ratio_reuse_over_batched']:>14.2f}x"
              f"{r['ideal_ratio_reuse_over_batched']:>6.2f}x{r['ratio_reuse_over_naive']:>12.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
