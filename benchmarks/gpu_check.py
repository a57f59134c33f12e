"""One prepared GPU check: a short LaDa round on a ~0.5B-parameter Qwen2-style model, with throughput and MFU.

Runs offline (no download): a byte-level BPE tokenizer is trained in seconds with ``fedlada.models.train_tokenizer``
on generated benchmark text (the benchmark's small word set caps its vocabulary near 720 tokens, so the model's
embedding and output head are small and nearly all parameters sit in the transformer blocks), and the model is a
randomly initialised ``Qwen2ForCausalLM`` (hidden 1024, 24 layers, 16 heads, 4 key/value heads, MLP 5504: about
0.47B parameters) in bfloat16. Then, timed separately:

1. matmul rate of the card in the check's dtype (bf16 on a GPU, fp32 on a CPU): a loop of large ``torch.matmul``
   calls (the MFU denominator, measured, not quoted);
2. generation: ``fedlada.generation.TransformersBackend`` (``paths.sample_paths``) samples M paths per public
   question; tokens/s counts the generated tokens (re-encoded from the decoded paths);
3. scoring: ``paths.score_paths`` of the reference paths of public questions and of the sampled paths;
4. training: LoRA adapters, then ``fedlada.train.train`` on contrastive pairs (reference path chosen, sampled path
   rejected) with bf16 autocast: one warm-up step, then timed steps.

Model FLOPs per token: 2 x N for a forward pass, N = parameters of the linear layers and the output head (the input
embedding is a lookup); attention-score FLOPs (4 x layers x hidden x context per token) are added. Training with
LoRA costs ~4N per token (forward + activation gradients; the frozen weights get no gradient) plus the 2N reference
pass ``train`` runs once per call, so 6N per token for one epoch. MFU = achieved model FLOP/s / measured matmul rate.

    python benchmarks/gpu_check.py                         # on a CUDA machine: ~0.47B model, bf16
    python benchmarks/gpu_check.py --tiny --device cpu     # seconds on a CPU: checks the script runs
    python benchmarks/gpu_check.py --profile               # plus torch.profiler tables of each phase
    python benchmarks/gpu_check.py --save-model DIR        # also save the (random) model and tokenizer to DIR,
                                                           # a local model `fedlada run` can load (models.*.source)

The JSON goes to ``$OUT/gpu_check.json`` when ``$OUT`` is set, else to ``--out``. Progress lines go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {text}", flush=True)


# (model shape, workload) for the full run and for --tiny
FULL = dict(hidden=1024, layers=24, heads=16, kv_heads=4, intermediate=5504, matmul_n=8192, matmul_iters=50,
            questions=64, paths=4, max_new_tokens=128, gen_batch=256, score_pairs=2048, score_batch=64,
            train_pairs=128, train_batch=16, lora_r=16)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, matmul_n=256, matmul_iters=20,
            questions=6, paths=2, max_new_tokens=16, gen_batch=12, score_pairs=48, score_batch=16,
            train_pairs=12, train_batch=4, lora_r=4)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def matmul_tflops(device, *, n: int, iters: int, dtype=None) -> float:
    """Measured dense matmul rate in ``dtype`` (default bf16), TFLOP/s (2 n^3 FLOPs per n x n x n product): the best of
    three timed blocks of ``iters`` products, so a moment when another process held the device does not lower it."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype or torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * iters / best / 1e12


def flops_per_token(model, context: float) -> dict:
    """Forward FLOPs per token: 2 x (linear + head parameters) + attention scores over ``context`` tokens."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    n_matmul = total - emb + (head if tied else 0)
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * context
    return {"params_total": total, "params_matmul": n_matmul, "forward_flops_per_token": 2 * n_matmul + attention}


def profile_phases(device, model, tok, backend, prompts, ref_p, ref_y, pairs, w, train_kw) -> str:
    """torch.profiler tables (top operators by device time, then by CPU time) of a 16-token generation, one scoring
    call of ``score_batch`` pairs and one training step: where each phase spends its time."""
    from torch.profiler import ProfilerActivity, profile

    from fedlada.paths import score_paths
    from fedlada.train import train

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_device = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    phases = {
        "generation (16 new tokens)": lambda: backend.sample(prompts, num_paths=w["paths"], temperature=1.0,
                                                             max_new_tokens=16, seed=1),
        "scoring (one batch)": lambda: score_paths(model, tok, ref_p[: w["score_batch"]], ref_y[: w["score_batch"]],
                                                   batch_size=w["score_batch"]),
        "training (one step)": lambda: train(model, tok, preference=pairs[: w["train_batch"]], **train_kw),
    }
    out = []
    for name, fn in phases.items():
        say(f"profiling {name}")
        with profile(activities=acts) as prof:
            fn()
            sync(device)
        avg = prof.key_averages()
        out.append(f"=== {name}: by device time\n{avg.table(sort_by=sort_device, row_limit=25)}")
        out.append(f"=== {name}: by CPU time\n{avg.table(sort_by='cpu_time_total', row_limit=25)}")
    return "\n\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a small model and workload (CPU check)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", help="model weights: auto (bfloat16 on CUDA, float32 on CPU) | "
                                                    "bfloat16 | float32")
    ap.add_argument("--out", default="gpu_check.json", help="JSON path when $OUT is not set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="also profile a short generation, a scoring batch and one training step (torch.profiler); "
                         "tables go to gpu_check_profile.txt next to the JSON")
    ap.add_argument("--save-model", default="", metavar="DIR",
                    help="save the freshly built model (random weights, before any training) and its tokenizer to "
                         "DIR, loadable as a local model (models.*.source = DIR)")
    ap.add_argument("--save-only", action="store_true", help="with --save-model: stop once the model is saved")
    args = ap.parse_args(argv)
    if args.save_only and not args.save_model:
        ap.error("--save-only needs --save-model DIR")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fedlada import reasoning
    from fedlada.data import make_benchmark, read_records
    from fedlada.generation import TransformersBackend
    from fedlada.models import apply_lora, resolve_device, train_tokenizer
    from fedlada.paths import score_paths
    from fedlada.train import PreferenceExample, train

    w = TINY if args.tiny else FULL
    device = resolve_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    result: dict = {"mode": "tiny" if args.tiny else "full", "device": str(device), "dtype": dtype_name,
                    "torch": torch.__version__, "python": platform.python_version(), "workload": w}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"}
        torch.backends.cuda.matmul.allow_tf32 = True
    say(f"device {device} ({result.get('gpu', {}).get('name', platform.processor() or 'cpu')}), dtype {dtype_name}")

    # 1. the card's matmul rate
    # in the dtype the model computes in: a CPU without bf16 units multiplies bf16 far slower than its fp32 model
    # runs, which made "MFU" exceed 1 there
    peak = matmul_tflops(device, n=w["matmul_n"], iters=w["matmul_iters"], dtype=dtype)
    result["matmul_tflops"] = float(f"{peak:.4g}")
    say(f"{dtype_name} matmul {w['matmul_n']}^3: {peak:.3g} TFLOP/s")

    # 2. data and tokenizer, offline
    with tempfile.TemporaryDirectory(prefix="fedlada-gpu-check-") as tmp:
        n_public = max(w["questions"], w["score_pairs"], w["train_pairs"])
        make_benchmark(tmp, seed=args.seed, num_clients=1, train_per_client=1, test_per_client=1,
                       public_size=n_public, general_size=2000 if not args.tiny else 300, max_steps=6)
        public = read_records(Path(tmp) / "public.jsonl")
        general = read_records(Path(tmp) / "general.jsonl")
    texts = [reasoning.format_prompt(r.question) + reasoning.format_path(r.rationale, r.answer)
             for r in general + public]
    t = time.perf_counter()
    tok = train_tokenizer(texts, vocab_size=4096)
    result["tokenizer"] = {"vocab": len(tok), "vocab_requested": 4096, "texts": len(texts),
                           "train_seconds": round(time.perf_counter() - t, 2)}
    say(f"tokenizer: vocab {len(tok)} (BPE stops when the text has nothing left to merge)")

    # 3. the model, built on the device
    config = Qwen2Config(vocab_size=len(tok), hidden_size=w["hidden"], intermediate_size=w["intermediate"],
                         num_hidden_layers=w["layers"], num_attention_heads=w["heads"],
                         num_key_value_heads=w["kv_heads"], max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    sync(device)
    if args.save_model:
        model.save_pretrained(args.save_model)
        tok.save_pretrained(args.save_model)
        say(f"saved the model and its tokenizer to {args.save_model}")
        if args.save_only:
            return 0
    mean_len = sum(len(x) for x in tok(texts[:200], add_special_tokens=False)["input_ids"]) / min(200, len(texts))
    fl = flops_per_token(model, context=mean_len)
    result["model"] = {"class": type(model).__name__, "hidden": w["hidden"], "layers": w["layers"],
                       "heads": w["heads"], "kv_heads": w["kv_heads"], "intermediate": w["intermediate"], **fl,
                       "build_seconds": round(time.perf_counter() - t, 2)}
    say(f"model: {fl['params_total'] / 1e6:.1f}M parameters, {fl['forward_flops_per_token'] / 1e9:.2f} GFLOP/token "
        f"forward")
    fpt = fl["forward_flops_per_token"]

    def mfu(flops: float, seconds: float) -> float:
        return round(flops / seconds / (peak * 1e12), 4)

    # 4. generation through the backend (warm-up on two prompts first)
    questions = public[: w["questions"]]
    prompts = [reasoning.format_prompt(r.question) for r in questions]
    backend = TransformersBackend(model, tok, batch_size=w["gen_batch"])
    backend.sample(prompts[:2], num_paths=2, temperature=1.0, max_new_tokens=4, seed=args.seed)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    sampled = backend.sample(prompts, num_paths=w["paths"], temperature=1.0, top_p=1.0,
                             max_new_tokens=w["max_new_tokens"], seed=args.seed)
    sync(device)
    secs = time.perf_counter() - t
    flat_p = [p for p, ys in zip(prompts, sampled) for _ in ys]
    flat_y = [y for ys in sampled for y in ys]
    gen_tokens = sum(len(x) for x in tok(flat_y, add_special_tokens=False)["input_ids"])
    prompt_tokens = sum(len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]) * w["paths"]
    result["generation"] = {"rows": len(flat_y), "generated_tokens": gen_tokens, "seconds": round(secs, 2),
                            "tokens_per_second": round(gen_tokens / secs, 1),
                            "mfu": mfu(fpt * (gen_tokens + prompt_tokens), secs), "peak_memory_gb": peak_mem_gb(device)}
    say(f"generation: {len(flat_y)} paths, {gen_tokens} tokens in {secs:.1f}s = {gen_tokens / secs:.0f} tok/s")

    # 5. scoring: reference paths of the public pool, then the sampled paths (shared prompts: KV-cache reuse)
    ref = public[: w["score_pairs"]]
    ref_p = [reasoning.format_prompt(r.question) for r in ref]
    ref_y = [reasoning.format_path(r.rationale, r.answer) for r in ref]
    score_paths(model, tok, ref_p[:8], ref_y[:8], batch_size=w["score_batch"])  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scoring = {}
    for name, (ps, ys) in {"reference_paths": (ref_p, ref_y), "sampled_paths": (flat_p, flat_y)}.items():
        t = time.perf_counter()
        sc = score_paths(model, tok, ps, ys, batch_size=w["score_batch"], max_length=512)
        sync(device)
        secs = time.perf_counter() - t
        seq_tokens = int(sc.num_tokens.sum()) + sum(len(x) for x in tok(ps, add_special_tokens=False)["input_ids"])
        scoring[name] = {"pairs": len(ps), "tokens": seq_tokens, "scored_tokens": int(sc.num_tokens.sum()),
                         "seconds": round(secs, 2), "tokens_per_second": round(seq_tokens / secs, 1),
                         "mfu": mfu(fpt * seq_tokens, secs), "mean_nll": round(float(sc.nll.mean()), 3)}
        say(f"scoring {name}: {len(ps)} pairs, {seq_tokens} tokens in {secs:.2f}s = {seq_tokens / secs:.0f} tok/s")
    scoring["peak_memory_gb"] = peak_mem_gb(device)
    result["scoring"] = scoring

    # 6. contrastive training with LoRA and bf16 autocast
    model = apply_lora(model, r=w["lora_r"], alpha=2 * w["lora_r"])
    rejected = {p: ys[0] for p, ys in zip(prompts, sampled)}
    pairs = [PreferenceExample(p, y, rejected.get(p) or "Answer: 0")
             for p, y in zip(ref_p[: w["train_pairs"]], ref_y[: w["train_pairs"]])]
    for i, ex in enumerate(pairs):  # rejected paths: sampled text where there is one, else another question's path
        if ex.prompt not in rejected:
            pairs[i] = PreferenceExample(ex.prompt, ex.chosen, ref_y[(i + 1) % len(ref_y)])
    kw = dict(lr=1e-4, epochs=1, batch_size=w["train_batch"], bf16=True, beta=0.1, lambda_da=1.0, mu=0.5,
              max_length=384, seed=args.seed)
    warm = train(model, tok, preference=pairs[: w["train_batch"]], **kw)  # one step: kernels, allocator
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = train(model, tok, preference=pairs, distill_sft=(), **kw)
    sync(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["training"] = {"pairs": len(pairs), "steps": stats.steps, "warmup_steps": warm.steps,
                          "tokens": stats.tokens, "seconds": round(stats.seconds, 2),
                          "tokens_per_second": round(stats.tokens / stats.seconds, 1),
                          "mfu": mfu(3 * fpt * stats.tokens, stats.seconds), "loss": round(stats.loss, 4),
                          "lora_r": w["lora_r"], "trainable_params": trainable, "peak_memory_gb": peak_mem_gb(device),
                          "flops_note": "6N per token: forward + activation gradients (4N) + reference pass (2N)"}
    say(f"training: {stats.steps} steps, {stats.tokens} tokens in {stats.seconds:.1f}s = "
        f"{stats.tokens / stats.seconds:.0f} tok/s, loss {stats.loss:.4f}")

    out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        tables = profile_phases(device, model, tok, backend, prompts, ref_p, ref_y, pairs, w, kw)
        (out.parent / "gpu_check_profile.txt").write_text(tables)
        say(f"profile tables written to {out.parent / 'gpu_check_profile.txt'}")
    result["total_seconds"] = round(time.perf_counter() - T0, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")
    say(f"MFU: generation {result['generation']['mfu']:.1%}, scoring "
        f"{scoring['reference_paths']['mfu']:.1%}, training {result['training']['mfu']:.1%} of "
        f"{peak:.3g} TFLOP/s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
