"""Training throughput of the local contrastive distillation (``fedlada.train.train`` with preference pairs only).

Compared side by side, in one process, on the same tiny Llama, the same tokens and the same batch size:

* ``ours``        -- ``train(preference=..., lambda_da=1, mu=0)`` with its defaults: reference log-probs computed
                     once inside ``train``, batches bucketed by length, and on a CPU each prompt run once for its
                     chosen and rejected path (``reuse_prefix``; off by default on a GPU, where it does not pay).
                     ``ours_reuse`` / ``ours_noreuse`` force prefix reuse on / off, and ``ours_noreuse_nobucket``
                     turns off bucketing too (one full [chosen; rejected] row per path).
* ``plain``       -- a bare PyTorch loop: forward, HF causal-LM loss on the path tokens, backward, clip, AdamW step,
                     on the same [chosen; rejected] rows in random batches. No reference pass, no pairwise loss.
* ``trl_precompute`` -- TRL ``DPOTrainer`` (sigmoid loss) with ``precompute_ref_log_probs=True``: the reference
                     semantics closest to ours (the initial model, scored once before training).
* ``trl_refmodel``   -- TRL ``DPOTrainer`` with a reference model copy scored at every step (TRL's default).
* ``ours_compile`` / ``trl_precompute_compile`` -- ``ours`` with ``train(compile=True)`` and ``trl_precompute`` with
                     ``DPOConfig(torch_compile=True)``: both run the model through ``torch.compile``. The compilation
                     happens in the untimed warm-up (its time is reported as ``warmup_s``); later runs in the same
                     process reuse the compiled code, as later rounds of a federated run do.

TRL is configured to do the same work: fp32 unless --bf16 (then bf16 autocast everywhere), no gradient
checkpointing, constant learning rate, no eval/saving/logging/reporting, in-process data loading, same max_length.
"Tokens" are counted identically for every variant: prompt + chosen + rejected non-pad tokens per example (eos
included). Two throughputs are reported: ``steps`` (the optimizer steps only) and ``end_to_end`` (everything a caller
waits for: tokenisation, the reference pass, trainer construction and the steps).

Usage: python benchmarks/bench_train.py [--out benchmarks/results/train.json] [--reps 5] [--bf16]
       [--threads 1 --clock cpu]   # CPU-time ratios that survive a busy shared machine
       [--device cuda --bf16 --hidden 1024 --layers 12]   # on a GPU (wall clock, synchronised)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import fedlada.train as ftrain  # noqa: E402
from fedlada.models import build_tiny_model, count_parameters, train_tokenizer  # noqa: E402
from fedlada.paths import collate, encode_pair  # noqa: E402

# The clock every variant is timed with: wall-clock by default; --clock cpu uses this process's CPU time, which
# other processes on a shared machine barely disturb (use it with --threads 1, where no thread ever spin-waits).
_now = time.perf_counter
_DEVICE = torch.device("cpu")


def _sync() -> None:
    """Wait for queued GPU work, so that a wall-clock reading after it covers the work (no-op on a CPU)."""
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize(_DEVICE)

NAMES = ["Tom", "Ana", "Lee", "Mia", "Raj", "Zoe", "Sam", "Ivy"]
ITEMS = ["apples", "pens", "coins", "books", "eggs", "cards", "shells", "stamps"]


# ------------------------------------------------------------------------------------------------ data


def _sentence(rng: random.Random) -> str:
    who, what = rng.choice(NAMES), rng.choice(ITEMS)
    return rng.choice([f"{who} has {rng.randint(2, 19)} boxes of {rng.randint(2, 12)} {what}. ",
                       f"{who} gives away {rng.randint(1, 9)} {what}. ",
                       f"Then {who} buys {rng.randint(2, 30)} more {what}. "])


def _line(rng: random.Random, wrong: bool) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 20)
    op = rng.choice("+-*")
    c = {"+": a + b, "-": a - b, "*": a * b}[op] + (rng.randint(1, 9) if wrong else 0)
    return f"{a} {op} {b} = {c}\n"


def make_data(n: int, seed: int):
    """n (prompt, chosen, rejected) triples: prompts ~40 tokens, paths 60-100 tokens (under the trained tokenizer)."""
    rng = random.Random(seed)
    corpus = [_sentence(rng) + _line(rng, False) for _ in range(2000)]
    tok = train_tokenizer(corpus + ["Question: How many are left?\nReasoning:\nAnswer: "], vocab_size=512)

    def n_tok(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def grow(make, start, target):
        text = start
        while n_tok(text) < target:
            text += make()
        return text

    def path(wrong):  # lines until the path (answer line and eos included) reaches a 60-100 token target
        target, answer = rng.randint(63, 97), f"Answer: {rng.randint(1, 999)}"
        return grow(lambda: _line(rng, wrong), "", target - n_tok(answer) - 6) + answer

    triples = []
    for _ in range(n):
        body = grow(lambda: _sentence(rng), "", rng.randint(24, 32))
        triples.append((f"Question: {body}How many are left?\nReasoning:\n", path(False), path(True)))
    return tok, triples


# ------------------------------------------------------------------------------------------------ variants


def run_ours(model, tok, triples, *, lr, batch_size, max_length, bf16, bucket, reuse, compile=False):
    timing = {"reference": 0.0}
    original = ftrain._reference_logprobs

    def timed_reference(*args, **kwargs):
        t = _now()
        original(*args, **kwargs)
        _sync()
        timing["reference"] += _now() - t

    ftrain._reference_logprobs = timed_reference
    try:
        pref = [ftrain.PreferenceExample(p, c, r) for p, c, r in triples]
        t0 = _now()
        stats = ftrain.train(model, tok, preference=pref, lr=lr, batch_size=batch_size, max_length=max_length,
                             bf16=bf16, lambda_da=1.0, mu=0.0, bucket_by_length=bucket,
                             reuse_prefix=reuse, compile=compile, seed=0)
        _sync()
        total = _now() - t0
    finally:
        ftrain._reference_logprobs = original
    # steps_s = train() minus its reference pass (its tokenisation stays in, which slightly favours TRL)
    return dict(end_to_end_s=total, steps_s=total - timing["reference"], reference_s=timing["reference"],
                loss=stats.components["da"], steps=stats.steps, forward_tokens=stats.tokens)


def run_plain(model, tok, triples, *, lr, batch_size, max_length, bf16):
    t0 = _now()
    enc = [(encode_pair(tok, p, c, max_length=max_length), encode_pair(tok, p, r, max_length=max_length))
           for p, c, r in triples]
    order = list(range(len(enc)))
    random.Random(0).shuffle(order)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    autocast = torch.autocast(_DEVICE.type, dtype=torch.bfloat16, enabled=bf16)
    t_steps, steps, losses, fwd_tokens = _now(), 0, [], 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = collate(tok, [enc[i][0] for i in idx] + [enc[i][1] for i in idx])
        batch = {k: v.to(_DEVICE) for k, v in rows.items()}
        labels = batch["input_ids"].clone()
        path_positions = torch.zeros_like(batch["loss_mask"], dtype=torch.bool)
        path_positions[:, 1:] = batch["loss_mask"][:, :-1] != 0
        labels[~path_positions] = -100
        with autocast:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                         use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        losses.append(loss.item())
        fwd_tokens += int(batch["attention_mask"].sum())
    _sync()
    end = _now()
    return dict(end_to_end_s=end - t0, steps_s=end - t_steps, reference_s=0.0, loss=sum(losses) / len(losses),
                steps=steps, forward_tokens=fwd_tokens)


def run_trl(model, tok, triples, *, lr, batch_size, max_length, bf16, precompute, rep, compile=False):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    out = tempfile.mkdtemp(prefix="bench-trl-")
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, num_train_epochs=1,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.1, loss_type=["sigmoid"], max_length=max_length, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=batch_size, gradient_checkpointing=False, bf16=bf16, fp16=False,
        use_cpu=_DEVICE.type == "cpu",
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=0, dataset_num_proc=None,
        torch_compile=compile,
    )
    # a column unique to this repetition gives the data set a new fingerprint, so TRL's on-disk cache of reference
    # log-probs from an earlier repetition is not reused (each repetition pays what a fresh run pays)
    data = Dataset.from_dict({"prompt": [t[0] for t in triples], "chosen": [t[1] for t in triples],
                              "rejected": [t[2] for t in triples], "rep": [rep] * len(triples)})
    t0 = _now()
    ref = None if precompute else copy.deepcopy(model).eval()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    _sync()
    t_steps = _now()
    result = trainer.train()
    _sync()
    end = _now()
    ds = trainer.train_dataset
    trl_tokens = sum(len(a) + len(b) + len(c) for a, b, c in zip(ds["prompt_ids"], ds["chosen_ids"],
                                                                  ds["rejected_ids"]))
    shutil.rmtree(out, ignore_errors=True)  # TRL's output directory (nothing is saved into it)
    return dict(end_to_end_s=end - t0, steps_s=end - t_steps, reference_s=(t_steps - t0) if precompute else None,
                setup_s=t_steps - t0, loss=result.training_loss, steps=result.global_step, counted_tokens=trl_tokens)


# ------------------------------------------------------------------------------------------------ main


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



def write_report(results, config, out: Path) -> dict:
    """Summarise the repetitions so far and write the JSON report (after every repetition, so a cut-off run
    still leaves its numbers)."""
    # best (min time) is the estimator least hurt by other processes on a shared machine; the median is kept too
    summary = {}
    for v, rs in results.items():
        if not rs:
            continue
        summary[v] = {f"{stat}_{k}": f(r[k] for r in rs)
                      for stat, f in (("best", max), ("median", statistics.median))
                      for k in ("tokens_per_s_steps", "tokens_per_s_end_to_end")}
        summary[v]["loss"] = statistics.median(r["loss"] for r in rs)
        summary[v]["reps"] = len(rs)
    ratios = {}
    pairs = [("ours", b) for b in ("trl_precompute", "trl_refmodel", "plain", "ours_reuse", "ours_noreuse",
                                   "ours_noreuse_nobucket", "trl_precompute_compile")]
    pairs += [("ours_compile", b) for b in ("trl_precompute", "trl_refmodel", "trl_precompute_compile", "ours")]
    pairs += [("trl_precompute_compile", "trl_precompute")]
    for ours, base in pairs:
        if ours in summary and base in summary:
            for stat in ("best", "median"):
                for kind in ("steps", "end_to_end"):
                    key = f"{stat}_tokens_per_s_{kind}"
                    ratios[f"{ours}/{base}/{kind}/{stat}"] = summary[ours][key] / summary[base][key]
    report = dict(config=config, loadavg_at_write=os.getloadavg(), summary=summary, ratios=ratios, runs=results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/train.json")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (one device for every variant)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--variants",
                    default="ours,ours_noreuse,ours_compile,plain,trl_precompute,trl_refmodel,trl_precompute_compile")
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING)
    for name in ("transformers", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    variants = [v for v in args.variants.split(",") if v]
    known = ("ours", "ours_reuse", "ours_noreuse", "ours_noreuse_nobucket", "ours_compile", "plain", "trl_precompute",
             "trl_refmodel", "trl_precompute_compile")
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        raise SystemExit(f"error: --variants: expected a comma-separated list of {', '.join(known)}; "
                         f"found {args.variants!r}")
    trl_version = None
    if any(v.startswith("trl_") for v in variants):
        try:
            import datasets
            import trl
        except ImportError as e:
            raise SystemExit(f"error: the TRL variants need TRL ({e}); install it with `pip install -r "
                             "benchmarks/requirements.txt torch==2.13.0`, or leave them out: --variants "
                             "ours,ours_noreuse,plain") from None
        datasets.disable_progress_bars()
        datasets.disable_caching()
        trl_version = trl.__version__

    global _now, _DEVICE
    _DEVICE = torch.device(args.device)
    if _DEVICE.type == "cuda" and args.clock == "cpu":
        raise SystemExit("error: --clock cpu measures this process's CPU time, not GPU work; use --clock wall")
    if _DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    _now = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    tok, triples = make_data(args.examples, seed=0)
    enc = [(encode_pair(tok, p, c, max_length=args.max_length), encode_pair(tok, p, r, max_length=args.max_length))
           for p, c, r in triples]
    counted = sum(len(pc) + len(yc) + len(yr) for (pc, yc), (_, yr) in enc)
    prompt_lens = [len(pc) for (pc, _), _ in enc]
    path_lens = [len(y) for pair in enc for _, y in pair]

    def fresh_model():  # built on the device itself (a large model's CPU initialisation would dominate a GPU run)
        with torch.device(_DEVICE):
            return build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                                    seed=0)

    common = dict(lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, bf16=args.bf16)
    runners = {
        "ours": lambda m, d, rep: run_ours(m, tok, d, bucket=True, reuse=None, **common),
        "ours_reuse": lambda m, d, rep: run_ours(m, tok, d, bucket=True, reuse=True, **common),
        "ours_noreuse": lambda m, d, rep: run_ours(m, tok, d, bucket=True, reuse=False, **common),
        "ours_noreuse_nobucket": lambda m, d, rep: run_ours(m, tok, d, bucket=False, reuse=False, **common),
        "ours_compile": lambda m, d, rep: run_ours(m, tok, d, bucket=True, reuse=None, compile=True, **common),
        "plain": lambda m, d, rep: run_plain(m, tok, d, **common),
        "trl_precompute": lambda m, d, rep: run_trl(m, tok, d, precompute=True, rep=rep, **common),
        "trl_refmodel": lambda m, d, rep: run_trl(m, tok, d, precompute=False, rep=rep, **common),
        "trl_precompute_compile": lambda m, d, rep: run_trl(m, tok, d, precompute=True, rep=rep, compile=True,
                                                            **common),
    }
    warmup_s = {}
    for v in variants:  # warm-up, excluded: two steps each (a compiled variant compiles here)
        t = time.perf_counter()
        runners[v](fresh_model(), triples[:2 * args.batch_size], -1)
        warmup_s[v] = time.perf_counter() - t
        print(f"warm-up {v:15s} {warmup_s[v]:6.1f}s (wall clock)", flush=True)

    config = dict(vars(args), params=count_parameters(fresh_model()), vocab=len(tok), counted_tokens=counted,
                  prompt_tokens_mean=statistics.mean(prompt_lens), path_tokens_min=min(path_lens),
                  path_tokens_max=max(path_lens), path_tokens_mean=statistics.mean(path_lens),
                  torch=torch.__version__, transformers=transformers.__version__, trl=trl_version,
                  python=platform.python_version(), cpu=_cpu_name(), cpu_count=os.cpu_count(),
                  gpu=torch.cuda.get_device_name(_DEVICE) if _DEVICE.type == "cuda" else None,
                  torch_threads=torch.get_num_threads(), loadavg_start=os.getloadavg(), warmup_s=warmup_s)
    out = Path(args.out)
    results = {v: [] for v in variants}
    for rep in range(args.reps):  # round-robin, so that machine noise hits every variant alike
        for v in variants:
            r = runners[v](fresh_model(), triples, rep)
            r["tokens_per_s_steps"] = counted / r["steps_s"]
            r["tokens_per_s_end_to_end"] = counted / r["end_to_end_s"]
            results[v].append(r)
            print(f"rep {rep} {v:15s} steps {r['steps_s']:6.2f}s ({r['tokens_per_s_steps']:7.0f} tok/s)  "
                  f"end-to-end {r['end_to_end_s']:6.2f}s ({r['tokens_per_s_end_to_end']:7.0f} tok/s)  "
                  f"loss {r['loss']:.4f}", flush=True)
        write_report(results, config, out)

    report = write_report(results, config, out)
    print(json.dumps(dict(summary=report["summary"], ratios=report["ratios"]), indent=2))


if __name__ == "__main__":
    main()
