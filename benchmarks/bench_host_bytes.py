"""Bytes on the wire per round per client: LaDa (paths + scalars) vs FedMKT-like (top-k logits) vs FedCoLLM-like
(adapters), on the same data.

    python benchmarks/bench_host_bytes.py [--config configs/scenario-a-identical.toml] [--candidates 32]
        [--topk 16,64,128] [--out benchmarks/results/host_bytes.json]

Every row serialises real messages (``fedlada.messages``) with real payloads (``fedlada.hosts``), so the numbers are
what ``metrics.jsonl`` reports as bytes per direction. The data are the same for every row: ``--candidates`` public
questions of the built-in benchmark (sized by the config), each with one answer-correct path per direction -- its
reference rationale and answer, standing in for a round where the LLM and the SLM each have one correct path per
question (the most a round can send with deduplication and one path per side; real rounds send fewer). Model shapes
and tokenizer come from the config; weights do not change any size (values are fixed-width), so the models are
freshly initialised instead of pretrained.

Per direction and client:
  LaDa        teach: question ids + LLM paths + (logprob, tokens); report: SLM paths + scalars + metrics
  FedMKT      the same messages plus top-k logits (fp16 values, uint16 ids) at every path token, one path a question
  FedCoLLM    the same messages plus the SLM's trainable weights (LoRA adapters when the SLM has LoRA)
Server -> client counts the broadcast teach message once per client, as the runner does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlada import reasoning  # noqa: E402
from fedlada.config import load_config  # noqa: E402
from fedlada.host_rounds import topk_targets, trainable_state  # noqa: E402
from fedlada.hosts import encode_state, encode_topk  # noqa: E402
from fedlada.messages import PathItem, ReportMessage, TeachMessage  # noqa: E402
from fedlada.models import apply_lora, build_tiny_model, count_parameters  # noqa: E402
from fedlada.paths import score_paths  # noqa: E402


def _model(tok, spec):
    m = build_tiny_model(tok, hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads)
    return apply_lora(m, r=spec.lora_r, alpha=spec.lora_alpha) if spec.lora else m


def main(argv=None) -> dict:
    scratch = None
    if not os.environ.get("FEDLADA_CACHE"):  # its own throw-away model cache, removed when done
        scratch = tempfile.TemporaryDirectory(prefix="fedlada-bytes-")
        os.environ["FEDLADA_CACHE"] = scratch.name
    try:
        return _measure(argv)
    finally:
        if scratch is not None:
            del os.environ["FEDLADA_CACHE"]
            scratch.cleanup()


def _measure(argv) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/scenario-a-identical.toml"))
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--topk", default="16,64,128")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedlada.prepare import load_data, prepare_tokenizer

    cfg = load_config(args.config)
    data = load_data(cfg)
    llm_spec, slm_spec = cfg.models.llm, cfg.models.slm_for(0)
    tok, _ = prepare_tokenizer(cfg, data, vocab_size=llm_spec.tokenizer_vocab)
    llm, slm = _model(tok, llm_spec), _model(tok, slm_spec)
    recs = data.public[: args.candidates]
    prompts = [reasoning.format_prompt(r.question) for r in recs]
    paths = [reasoning.format_path(r.rationale, r.answer) for r in recs]
    qids = tuple(r.id for r in recs)
    L = cfg.train.max_length

    def items(model):
        s = score_paths(model, tok, prompts, paths, max_length=L)
        return tuple(PathItem(q, y, float(lp), int(n)) for q, y, lp, n in zip(qids, paths, s.logprob, s.num_tokens))

    llm_items, slm_items = items(llm), items(slm)
    tokens = sum(it.num_tokens for it in llm_items)
    teach = TeachMessage(round=1, question_ids=qids, paths=llm_items)
    report = ReportMessage(round=1, client=0, paths=slm_items, metrics={"selected": len(qids), "correct_paths":
                                                                       len(qids)})
    rows = [{"method": "LaDa (paths + scalars)", "server_to_client": len(teach.to_bytes()),
             "client_to_server": len(report.to_bytes()), "payload_down": 0, "payload_up": 0}]
    for k in [int(x) for x in args.topk.split(",")]:
        down = encode_topk([e.__class__(i, e.ce, e.values, e.indices) for i, e in enumerate(
            topk_targets(llm, tok, prompts, paths, k=k, max_length=L))], k=min(k, len(tok)))
        up = encode_topk([e.__class__(i, e.ce, e.values, e.indices) for i, e in enumerate(
            topk_targets(slm, tok, prompts, paths, k=k, max_length=L))], k=min(k, len(tok)))
        rows.append({"method": f"FedMKT-like, top-{k} logits", "server_to_client": len(
            TeachMessage(1, qids, llm_items, host=down).to_bytes()), "client_to_server": len(
            ReportMessage(1, 0, slm_items, report.metrics, host=up).to_bytes()), "payload_down": len(down),
            "payload_up": len(up)})
    state = trainable_state(slm)
    for dtype in ("float32", "float16"):
        blob = encode_state(state, dtype=dtype, meta={"train_size": 150, "selected": list(qids)})
        rows.append({"method": f"FedCoLLM-like, {dtype} {'adapters' if slm_spec.lora else 'weights'}",
                     "server_to_client": len(TeachMessage(1, qids, llm_items, host=blob).to_bytes()),
                     "client_to_server": len(ReportMessage(1, 0, slm_items, report.metrics, host=blob).to_bytes()),
                     "payload_down": len(blob), "payload_up": len(blob)})
    base = rows[0]["server_to_client"] + rows[0]["client_to_server"]
    for r in rows:
        r["total"] = r["server_to_client"] + r["client_to_server"]
        r["x_lada"] = round(r["total"] / base, 1)
    result = {"config": args.config, "candidates": len(qids), "path_tokens_per_direction": tokens,
              "vocab": len(tok), "llm_params": count_parameters(llm), "slm_trainable_params":
              count_parameters(slm, trainable_only=True), "rows": rows, "python": platform.python_version()}
    print(f"bytes per round per client, {len(qids)} candidate questions, one correct path per question and "
          f"direction ({tokens} path tokens), vocabulary {len(tok)}, SLM trainable parameters "
          f"{result['slm_trainable_params']:,}")
    print(f"| {'method':<34} | {'server->client':>14} | {'client->server':>14} | {'total':>10} | x LaDa |")
    print(f"|{'-' * 36}|{'-' * 15}:|{'-' * 15}:|{'-' * 11}:|-------:|")
    for r in rows:
        print(f"| {r['method']:<34} | {r['server_to_client']:>14,} | {r['client_to_server']:>14,} | "
              f"{r['total']:>10,} | {r['x_lada']:>6} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
