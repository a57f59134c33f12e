"""Is the built-in benchmark learnable by a tiny model in CPU minutes, and does difficulty matter?

Trains one tiny Llama-style model from scratch on (a) the general corpus only and (b) the general corpus plus every
client's private train split (which teach the domain rules), for the same token budget, then reports greedy
accuracy on the clients' test splits by number of reasoning steps and by domain.

    python benchmarks/learnability.py --tokens 1000000 --hidden 96 --layers 3 --heads 4 --eval 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per model")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="default: models.pretrain_lr (the default run's recipe)")
    ap.add_argument("--eval", type=int, default=300, help="test questions per client")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/learnability.json",
                    help="where the JSON result goes (the committed one is benchmarks/results/learnability.json)")
    args = ap.parse_args()
    for key in ("tokens", "hidden", "layers", "heads", "eval", "threads"):
        if getattr(args, key) < 1:
            ap.error(f"--{key}: expected an integer >= 1, found {getattr(args, key)}")
    if args.hidden % args.heads:
        ap.error(f"--heads {args.heads} must divide --hidden {args.hidden}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fedlada.config import load_config
    from fedlada.data import make_benchmark, read_records
    from fedlada.models import PromptFormatter, build_tiny_model, train_tokenizer
    from fedlada.prepare import _corpus_texts, _pretrain_examples
    from fedlada.rounds import Side, evaluate
    from fedlada.train import train

    cfg = load_config()
    scratch = tempfile.TemporaryDirectory(prefix="fedlada-learnability-")  # removed when the script ends
    work = Path(scratch.name)
    layout = make_benchmark(work / "bench")
    general = read_records(layout.general)
    general, general_test = general[: -2 * args.eval], general[-2 * args.eval:]  # held out: no domain rule needed
    clients = [(c.domain, read_records(c.train), read_records(c.test)[: args.eval]) for c in layout.clients]
    # the tokenizer sees the domain words too (as the run's shared tokenizer sees the public pool's questions)
    public = read_records(layout.public)
    tok = train_tokenizer(_corpus_texts(general) + [r.question for r in public],
                          vocab_size=cfg.models.llm.tokenizer_vocab)
    fmt = PromptFormatter(tok, use_chat_template="off")
    lr = args.lr or cfg.models.pretrain_lr
    results = {"tokens_budget": args.tokens, "shape": [args.hidden, args.layers, args.heads], "variants": {},
               "recipe": {"lr": lr, "batch_size": cfg.models.pretrain_batch_size,
                          "schedule": cfg.models.pretrain_schedule, "eval_per_client": args.eval}}
    for name, corpus in (("general only", general),
                         ("general + client data", general + [r for _, tr, _ in clients for r in tr])):
        model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                                 max_position_embeddings=512, seed=0)
        ex, epochs = _pretrain_examples(fmt, corpus, tok, tokens=args.tokens, seed=0)
        t0 = time.perf_counter()
        mc = cfg.models  # the default tiny models' pretraining recipe (batch, schedule, warm-up)
        stats = train(model, tok, sft=ex, lr=lr, epochs=epochs,
                      batch_size=mc.pretrain_batch_size, max_length=cfg.train.max_length, seed=0,
                      lr_schedule=mc.pretrain_schedule, warmup=mc.pretrain_warmup, bf16=mc.pretrain_bf16)
        secs = time.perf_counter() - t0
        side = Side(model, tok, fmt)
        evals = {dom: evaluate(side, te, max_new_tokens=96) for dom, _, te in clients}
        gen_eval = evaluate(side, general_test, max_new_tokens=96)
        by_steps: dict[str, list[float]] = {}
        for e in evals.values():
            for s, a in e["by_steps"].items():
                by_steps.setdefault(s, []).append(a)
        results["variants"][name] = {
            "params": sum(p.numel() for p in model.parameters()), "train_tokens": stats.tokens,
            "train_seconds": round(secs, 1), "final_loss": stats.loss,
            "accuracy_by_domain": {d: e["accuracy"] for d, e in evals.items()} | {"general": gen_eval["accuracy"]},
            "accuracy_by_steps": {s: sum(v) / len(v) for s, v in sorted(by_steps.items(), key=lambda x: int(x[0]))},
            "general_accuracy_by_steps": dict(sorted(gen_eval["by_steps"].items(), key=lambda x: int(x[0]))),
        }
        print(f"[{name}] {stats.tokens:,} tokens in {secs:.0f}s, loss {stats.loss:.3f}", flush=True)
    print()
    steps = sorted({s for v in results["variants"].values() for s in v["accuracy_by_steps"]}, key=int)
    doms = [d for d, _, _ in clients] + ["general"]
    print("| variant | test set | " + " | ".join(f"{s} step(s)" for s in steps) + " | all |")
    print("|---" * (3 + len(steps)) + "|")
    for name, v in results["variants"].items():
        for label, acc, total in (("held-out general", v["general_accuracy_by_steps"],
                                   v["accuracy_by_domain"]["general"]),
                                  ("client domains", v["accuracy_by_steps"],
                                   sum(v["accuracy_by_domain"][d] for d in doms[:-1]) / (len(doms) - 1))):
            print(f"| {name} | {label} | " + " | ".join(f"{acc.get(s, float('nan')):.2f}" for s in steps)
                  + f" | {total:.2f} |")
    print("\n| variant | " + " | ".join(doms) + " |")
    print("|---" * (1 + len(doms)) + "|")
    for name, v in results["variants"].items():
        print(f"| {name} | " + " | ".join(f"{v['accuracy_by_domain'][d]:.2f}" for d in doms) + " |")
    out = Path(os.environ["OUT"]) / "learnability.json" if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
