"""Round steps with a host framework: LaDa as a plug-in to FedMKT-like or FedCoLLM-like collaboration.

The three functions :func:`server_teach`, :func:`client_step` and :func:`server_learn` have the signatures of
their namesakes in ``fedlada.rounds``. With ``host.name = "none"`` they are those functions; otherwise they run
them for LaDa's part (paths, gaps, filter, contrastive loss, rewards) and add the host's own step on the samples
in play (LADA.md, per-round algorithm, step 6). The host's math and wire formats live in ``fedlada.hosts``.

Methods (``lada.method``) with a host:

* ``host`` -- the host alone on every candidate: LaDa's loop runs with the ``all`` rule and ``lambda_da = mu = 0``,
  so the models train on their local SFT plus the host's step only (no contrastive loss, no SFT on the other
  side's paths, no filter).
* ``host-random`` -- the same on a random subset at LaDa's budget (the ``random`` rule).
* ``lada`` / ``lada-sft`` -- host + LaDa: the host's step on the LaDa-selected samples, plus LaDa's own loss.
* ``all`` / ``random`` -- host + LaDa's loss on every / a random subset of the candidates (no filter).
* ``local`` -- no exchange at all; the host does nothing.

What a "sample in play" is [ours]: a public question of this round's candidates, and the text the host distils on is
a reasoning path LaDa already moves -- FedMKT distils on a labelled public set's reference responses, while our
public pool contributes questions and answers and LaDa exchanges answer-correct paths. Per direction:

* LLM -> client k: the LLM's most confident correct path of the question (lowest LLM per-token NLL), on the
  questions client k's selection S^{L->k} kept.
* client k -> LLM: client k's most confident correct path of the question, on the questions the server's
  selection S^{k->L} kept.

FedMKT-like (``fedmkt``): the teach message carries the LLM's top-k logits on its path of every candidate that has
a correct one (the client's filter runs after the message, so all are sent); client k distils on its selection
with FedMKT's min-CE target rule (``fedlada.hosts.choose_targets``: the LLM's target where the LLM's per-token CE of
the path is lower than the SLM's, else the SLM's own detached top-k), after its LaDa update; then it sends its own
top-k logits (after this round's updates, as FedMKT clients send logits after private training) on its path of
every question where it has a correct one, and the server distils the LLM the same way on S^{k->L}.

FedCoLLM-like (``fedcollm``): the server holds a copy of the SLM (built from the same spec, so from the same public
starting point). Every teach message carries its trainable weights, which each client loads before its step
(round 1 too, so all clients start from one adapter); each report carries the client's trainable weights after its
step, its train size and the public ids of its selection S^{L->k}. The server averages the weights (weighted by
train size), then distils mutually in FATE-LLM's order: the aggregated SLM learns from the LLM on the union of the
clients' S^{L->k}, then the LLM learns from the updated SLM on the server's S^{k->L}.

Departures [ours]:

* The host's KD step is its own short loop (:func:`kd_train`) run after LaDa's update, not one joint objective,
  because ``fedlada.train.train`` has no token-level KD term; LaDa's reward is measured before the KD step.
* Only hosts with one shared tokenizer are supported (no token alignment); :func:`check_host_config` refuses other
  configurations before any work, and the payloads carry a tokenizer fingerprint checked at run time.
* A malformed host payload in a client's report is logged and that client's host contribution is skipped; its
  LaDa part is used as usual.

Metrics: each side's step adds ``host_*`` keys (payload bytes, KD examples/steps/tokens/loss, how often the min-CE
rule took the other side's target); ``train_tokens`` / ``server_train_tokens`` include the host's KD tokens, so the
run summary's training tokens compare methods fairly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedlada import checkpoints, rounds
from fedlada.config import TINY_ONLY_KEYS, ModelSpec, RunConfig
from fedlada.data import Record
from fedlada.errors import ConfigError, ModelError
from fedlada.hosts import (TopK, choose_targets, decode_state, decode_topk, encode_state, encode_topk, fedavg,
                           tokenizer_fingerprint, topk_kd_loss)
from fedlada.losses import sft_loss
from fedlada.messages import MessageError, PathItem, ReportMessage, TeachMessage
from fedlada.paths import collate, encode_pair
from fedlada.rounds import ClientState, Progress, ServerState, Side, StepLog, derive_seed
from fedlada.train import TrainStats

log = logging.getLogger(__name__)

HOST_BASELINES = {"host": "all", "host-random": "random"}  # host-only method -> LaDa's selection rule
_ARCH_IGNORED = ("device", "dtype", "gradient_checkpointing")  # ModelSpec fields FedAvg does not care about
# fields that only shape a tiny model: a loaded model's architecture is its source's
_TINY_ONLY = TINY_ONLY_KEYS
# fields that only shape LoRA adapters: two fully fine-tuned SLMs average alike whatever they say
_LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def _secs(t0: float) -> float:
    return float(f"{time.perf_counter() - t0:.2f}")


def _f(x: float) -> float | None:
    return float(f"{x:.6g}") if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------ the config


def lada_config(cfg: RunConfig) -> RunConfig:
    """The config LaDa's own steps run with: a host-only method becomes its selection rule without LaDa's losses.
    A host-only method without a host is a ValueError (``check_host_config`` says it to a user up front)."""
    if cfg.lada.method in HOST_BASELINES and cfg.host.name == "none":
        raise ValueError(f"lada.method {cfg.lada.method!r} runs a host framework alone; host.name is 'none'")
    if cfg.lada.method in HOST_BASELINES:
        return replace(cfg, lada=replace(cfg.lada, method=HOST_BASELINES[cfg.lada.method], lambda_da=0.0, mu=0.0))
    return cfg


def describe(spec: ModelSpec) -> str:
    """A model spec in a few words, for error messages and payload metadata."""
    if spec.is_tiny:
        tok = "shared tokenizer" if spec.tokenizer == "shared" else "own tokenizer"
        return (f"tiny Llama hidden={spec.hidden_size} layers={spec.num_layers} heads={spec.num_heads}, {tok} "
                f"(vocab {spec.tokenizer_vocab})")
    return spec.source + (f" ({spec.gguf_file})" if spec.gguf_file else "")


def _same_tokenizer(a: ModelSpec, b: ModelSpec) -> bool | None:
    """True / False when the config decides it, None when only the loaded tokenizers can tell."""
    if a.is_tiny and b.is_tiny:  # "own" tokenizers are trained per role, so two of them always differ
        return a.tokenizer == b.tokenizer == "shared" and a.tokenizer_vocab == b.tokenizer_vocab
    if a.is_tiny != b.is_tiny:  # a loaded model may carry a tiny model's tokenizer (an exported SLM): checked loaded
        return None
    return True if (a.source, a.gguf_file) == (b.source, b.gguf_file) else None


@functools.lru_cache(maxsize=32)
def _tokenizer_fingerprint_of(source: str, gguf_file: str) -> str | None:
    """The vocabulary fingerprint of a loaded model's tokenizer, or None where it cannot be read here (loading the
    model then says why). Only the tokenizer is read, once per process."""
    from transformers import AutoTokenizer

    from fedlada.models import _split_source

    try:
        src, gguf = _split_source(source, gguf_file or None)
        tok = AutoTokenizer.from_pretrained(str(Path(src).expanduser()), **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:  # noqa: BLE001 - a model that cannot be read fails later with its own clear error
        log.debug("tokenizer of %s not readable up front: %s", source, e)
        return None
    return tokenizer_fingerprint(tok)


def _tokenizers_match(a: ModelSpec, b: ModelSpec) -> bool | None:
    """:func:`_same_tokenizer`, settled by reading both tokenizers where the config alone cannot tell."""
    same = _same_tokenizer(a, b)
    if same is None and not (a.is_tiny or b.is_tiny):  # a tiny model's tokenizer is known once built (there is no
        # folder to read: "tiny" would be looked up on the hub): settled after loading (check_loaded_tokenizers)
        fa, fb = _tokenizer_fingerprint_of(a.source, a.gguf_file), _tokenizer_fingerprint_of(b.source, b.gguf_file)
        same = None if fa is None or fb is None else fa == fb
    return same


def check_host_config(cfg: RunConfig) -> None:
    """Refuse, before any work, a method/host/model combination the host cannot run (ConfigError naming why)."""
    h, m = cfg.host.name, cfg.lada.method
    if m in HOST_BASELINES and h == "none":
        raise ConfigError(f"config key 'lada.method': '{m}' runs a host framework without LaDa; set host.name to "
                          f"'fedmkt' or 'fedcollm' (found host.name='none')")
    if h == "none" or m == "local":
        return
    n = cfg.data.n_clients
    llm = cfg.models.llm
    for k in range(n):
        spec = cfg.models.slm_for(k)
        if _tokenizers_match(llm, spec) is False:
            raise _mixed_tokenizers(cfg, k)
    if h == "fedcollm":
        first = cfg.models.slm_for(0)
        for k in range(1, n):
            spec = cfg.models.slm_for(k)
            ignored = (_ARCH_IGNORED + (() if first.is_tiny or spec.is_tiny else _TINY_ONLY)
                       + (_LORA_ONLY if not first.lora and not spec.lora else ()))
            diff = [f"{f.name} ({getattr(spec, f.name)!r} vs {getattr(first, f.name)!r})"
                    for f in dataclasses.fields(ModelSpec)
                    if f.name not in ignored and getattr(first, f.name) != getattr(spec, f.name)]
            if diff:
                raise ConfigError(
                    f"config key 'host.name': 'fedcollm' averages the SLMs' weights and needs every client to run "
                    f"the same SLM, but client {k}'s SLM differs from client 0's in {', '.join(diff)}. Use identical "
                    f"SLMs (models.slms), or host.name='fedmkt', which supports different SLM architectures "
                    f"sharing the LLM's tokenizer.")


def _mixed_tokenizers(cfg: RunConfig, k: int, detail: str = "") -> ConfigError:
    h, llm, spec = cfg.host.name, cfg.models.llm, cfg.models.slm_for(k)
    what = ("exchanges token-level logits" if h == "fedmkt" else
            "distils between the LLM and the aggregated SLM token by token (mutual KD)")
    return ConfigError(
        f"config key 'host.name': '{h}' {what} and needs the LLM and every SLM to share one tokenizer, but client "
        f"{k}'s SLM ({describe(spec)}) and the LLM ({describe(llm)}) use different tokenizers{detail}. No host here "
        f"supports mixed tokenizers (token alignment is not implemented); LaDa alone (host.name='none') works with "
        f"any tokenizers because it exchanges text only.")


def check_loaded_tokenizers(cfg: RunConfig, k: int, llm_tokenizer, slm_tokenizer) -> None:
    """Once both models are loaded, before any round: the check ``check_host_config`` could not settle from the
    config (a tiny model's tokenizer against a loaded model's, which may be the same, as for an exported SLM)."""
    if cfg.host.name == "none" or cfg.lada.method == "local":
        return
    if tokenizer_fingerprint(llm_tokenizer) != tokenizer_fingerprint(slm_tokenizer):
        raise _mixed_tokenizers(cfg, k, _token_difference(llm_tokenizer, slm_tokenizer))
    if cfg.host.name == "fedmkt" and llm_tokenizer.eos_token != slm_tokenizer.eos_token:
        log.warning("host 'fedmkt': the LLM ends its paths with %r and client %d's SLM with %r (one vocabulary, two "
                    "eos tokens, as an instruct model and its base model have): the top-k targets at a path's end "
                    "teach the other side's eos token, which it does not stop on", llm_tokenizer.eos_token, k,
                    slm_tokenizer.eos_token)


def _token_difference(a, b) -> str:
    """A few tokens one vocabulary has and the other lacks (or holds at another id), for the refusal."""
    va, vb = a.get_vocab(), b.get_vocab()
    only_a = sorted(t for t in va if t not in vb)[:3]
    only_b = sorted(t for t in vb if t not in va)[:3]
    moved = sorted(t for t in va if t in vb and va[t] != vb[t])[:3]
    parts = [f"{len(va)} vs {len(vb)} tokens"]
    if only_a:
        parts.append(f"only the LLM's has {', '.join(map(repr, only_a))}")
    if only_b:
        parts.append(f"only the SLM's has {', '.join(map(repr, only_b))}")
    if moved:
        parts.append(f"{', '.join(map(repr, moved))} at other ids")
    if a.eos_token != b.eos_token:
        parts.append(f"eos {a.eos_token!r} vs {b.eos_token!r}")
    return f" ({'; '.join(parts)})"


def _check_fingerprint(meta: dict, tokenizer, *, sender: str, receiver: str) -> None:
    theirs, ours = meta.get("tokenizer"), tokenizer_fingerprint(tokenizer)
    if theirs != ours:
        raise ConfigError(f"host payload from {sender} was made with tokenizer {theirs!r}, but {receiver} uses "
                          f"tokenizer {ours!r}: token-level hosts need one shared tokenizer; LaDa alone "
                          f"(host.name='none') works with any tokenizers")


# ----------------------------------------------------------------------------------------- model-side helpers


@dataclass(frozen=True)
class KDExample:
    """A path to distil on and the teacher's top-k logits of its tokens, ``values``/``indices`` (T,k)."""

    prompt: str
    path: str
    values: np.ndarray
    indices: np.ndarray


def _vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


@torch.no_grad()
def topk_targets(model, tokenizer, prompts: list[str], paths: list[str], *, k: int, max_length: int,
                 batch_size: int = 32) -> list[TopK]:
    """Per pair: the model's top-k logits at every path token position (T,k) and its per-token CE of the path.

    Positions and truncation follow ``paths.encode_pair``/``collate`` (T = scored path tokens, eos included); CE is
    the mean of -log pi(y_j | x, y_<j) under the full distribution, i.e. the path's per-token NLL.
    ``path_index`` of the result is the pair's index in the input.
    """
    enc = [encode_pair(tokenizer, p, y, max_length=max_length) for p, y in zip(prompts, paths)]
    # rows past the tokenizer's ids (an embedding table padded to a multiple of 64 or 128, as many released models
    # have) are no token: leaving them out keeps every id one a student sharing the tokenizer has a row for
    n_ids = min(len(tokenizer), _vocab(model))
    k = min(k, n_ids)
    out: list[TopK | None] = [None] * len(enc)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        order = sorted(range(len(enc)), key=lambda i: -sum(map(len, enc[i])))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = collate(tokenizer, [enc[i] for i in idx])
            logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                           use_cache=False).logits.float().cpu()
            for r, i in enumerate(idx):
                pos = b["loss_mask"][r].nonzero().squeeze(-1)
                lg, lab = logits[r, pos], b["labels"][r, pos]
                ce = float(F.cross_entropy(lg, lab))
                v, ix = lg[:, :n_ids].topk(k, dim=-1)
                out[i] = TopK(i, ce, v.half().numpy(), ix.numpy().astype(np.int64))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def kd_train(model, tokenizer, examples: Sequence[KDExample], *, lr: float, epochs: int = 1, batch_size: int = 16,
             max_grad_norm: float | None = 1.0, temperature: float = 1.0, kd_weight: float = 1.0,
             lm_weight: float = 0.0, student_support: str = "topk", max_length: int = 256,
             seed: int = 0) -> TrainStats:
    """The host's KD step: per micro-batch, kd_weight * topk_kd_loss + lm_weight * NLL of the path tokens.

    Both terms are means over the micro-batch's path tokens (positions where the teacher has no row -- its path was
    truncated further -- are left out of the KD term). AdamW over trainable parameters, constant ``lr``, seeded
    order and dropout. ``TrainStats.components``: kd, lm.
    """
    t0 = time.perf_counter()
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    if not examples or epochs == 0 or (kd_weight == 0 and lm_weight == 0):
        return TrainStats(0, 0, float("nan"), {"kd": float("nan"), "lm": float("nan")}, time.perf_counter() - t0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("host KD: the model has no parameter with requires_grad=True")
    V = _vocab(model)
    for ex in examples:
        if ex.indices.size and int(ex.indices.max()) >= V:
            raise ModelError(f"host KD: the teacher's top-k logits name token id {int(ex.indices.max())}, but the "
                             f"student's output layer has {V} rows: the host needs the LLM and the SLMs to share one "
                             "tokenizer whose every id both models have a row for")
    enc = [encode_pair(tokenizer, ex.prompt, ex.path, max_length=max_length) for ex in examples]
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(f"{seed}/kd")
    order = list(range(len(examples)))
    losses, kd_parts, lm_parts, tokens = [], [], [], 0
    was_training = model.training
    model.train()
    fork = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        for _ in range(epochs):
            rng.shuffle(order)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                b = {k: v.to(dev) for k, v in collate(tokenizer, [enc[i] for i in idx]).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                keep = torch.zeros_like(b["loss_mask"], dtype=torch.bool)
                tv, ti = [], []
                for r, i in enumerate(idx):
                    pos = b["loss_mask"][r].nonzero().squeeze(-1)[: len(examples[i].values)]
                    keep[r, pos] = True
                    tv.append(torch.from_numpy(examples[i].values[: len(pos)].astype(np.float32)))
                    ti.append(torch.from_numpy(examples[i].indices[: len(pos)]))
                kd = topk_kd_loss(logits[keep], torch.cat(tv).to(dev), torch.cat(ti).to(dev),
                                  temperature=temperature, student_support=student_support)
                lm = sft_loss(logits, b["labels"], b["loss_mask"])
                loss = kd_weight * kd + lm_weight * lm
                loss.backward()
                if max_grad_norm is not None and max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                kd_parts.append(kd.item())
                lm_parts.append(lm.item())
                tokens += int(b["attention_mask"].sum())
    model.train(was_training)
    stats = TrainStats(len(losses), tokens, sum(losses) / len(losses),
                       {"kd": sum(kd_parts) / len(kd_parts), "lm": sum(lm_parts) / len(lm_parts)},
                       time.perf_counter() - t0)
    log.info("host KD: %d examples, %d steps (%d per epoch), loss %.4f", len(examples), stats.steps,
             steps_per_epoch, stats.loss)
    return stats


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights (LoRA adapters of a peft model, every weight of a fully fine-tuned one), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor], *, where: str) -> None:
    """Copy ``state`` into the model's trainable weights; the names and shapes must be exactly those."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ConfigError(f"{where}: the received weights do not fit this SLM (missing {missing[:3]}, unexpected "
                          f"{extra[:3]}); host.name='fedcollm' needs identical SLMs")
    with torch.no_grad():
        for n, p in own.items():
            if tuple(p.shape) != tuple(state[n].shape):
                raise ConfigError(f"{where}: weight '{n}' has shape {tuple(state[n].shape)}, this SLM has "
                                  f"{tuple(p.shape)}; host.name='fedcollm' needs identical SLMs")
            p.copy_(state[n].to(p.dtype))


def _kd_kwargs(cfg: RunConfig, *, lr: float, seed: int) -> dict:
    h, tc = cfg.host, cfg.train
    return dict(lr=lr, epochs=h.kd_epochs, batch_size=tc.batch_size, max_grad_norm=tc.max_grad_norm,
                temperature=h.kd_temperature, kd_weight=h.kd_weight, lm_weight=h.lm_weight,
                student_support=h.kd_student, max_length=tc.max_length, seed=seed)


def _count_tokens(metrics: dict, key: str, stats: TrainStats) -> None:
    # the run summary's training tokens are the sum of these keys: the host's KD step is training too
    metrics[key] = (metrics.get(key) or 0) + stats.tokens


def _kd_metrics(prefix: str, stats: TrainStats, n: int, other: int | None = None) -> dict:
    m = {f"{prefix}_examples": n, f"{prefix}_steps": stats.steps, f"{prefix}_tokens": stats.tokens,
         f"{prefix}_loss": _f(stats.loss), f"{prefix}_seconds": float(f"{stats.seconds:.2f}")}
    if other is not None:
        m[f"{prefix}_other_target"] = other  # samples whose min-CE target was the other side's
    return m


def _best_paths(paths: Sequence[PathItem]) -> dict[str, int]:
    """Question id -> index of its most confident path (lowest per-token NLL; the first on ties)."""
    best: dict[str, int] = {}
    for i, p in enumerate(paths):
        if p.question_id not in best or p.nll < paths[best[p.question_id]].nll:
            best[p.question_id] = i
    return best


def _selected(logd: StepLog, pair: str) -> list[str]:
    return [r["id"] for r in logd.selections if r["pair"] == pair and r["selected"]]


def _min_ce_examples(side: Side, qids: list[str], texts: list[str], theirs: list[TopK], public: dict[str, Record],
                     cfg: RunConfig) -> tuple[list[KDExample], int]:
    """FedMKT's min-CE choice per sample between the sender's top-k (``theirs``) and the receiver's own, detached."""
    prompts = side.prompts([public[q].question for q in qids])
    own = topk_targets(side.model, side.tokenizer, prompts, texts, k=cfg.host.topk, max_length=cfg.train.max_length)
    use = choose_targets(np.array([t.ce for t in theirs]), np.array([o.ce for o in own]))
    ex = [KDExample(p, y, (t if u else o).values, (t if u else o).indices)
          for p, y, t, o, u in zip(prompts, texts, theirs, own, use)]
    return ex, int(use.sum())


def _topk_payload(side: Side, paths: Sequence[PathItem], public: dict[str, Record], cfg: RunConfig, *,
                  model_desc: str) -> bytes:
    """Top-k logits of ``side`` on its most confident path of each question in ``paths``."""
    best = _best_paths(paths)
    idx = list(best.values())
    prompts = side.prompts([public[paths[i].question_id].question for i in idx])
    entries = topk_targets(side.model, side.tokenizer, prompts, [paths[i].text for i in idx], k=cfg.host.topk,
                           max_length=cfg.train.max_length)
    entries = [replace(e, path_index=i) for e, i in zip(entries, idx)]
    k = min(cfg.host.topk, len(side.tokenizer), _vocab(side.model))  # as topk_targets caps it
    return encode_topk(entries, k=k, meta={"host": "fedmkt", "tokenizer": tokenizer_fingerprint(side.tokenizer),
                                           "model": model_desc})


def _topk_by_question(payload: bytes, paths: Sequence[PathItem], tokenizer, *, where: str, sender: str,
                      receiver: str) -> dict[str, TopK]:
    entries, meta = decode_topk(payload, where=where)
    _check_fingerprint(meta, tokenizer, sender=meta.get("model", sender), receiver=receiver)
    out: dict[str, TopK] = {}
    vocab = len(tokenizer)
    for e in entries:
        if e.path_index >= len(paths):
            raise MessageError(f"{where}: top-k entry names path {e.path_index} of {len(paths)}")
        if e.indices.size and (int(e.indices.min()) < 0 or int(e.indices.max()) >= vocab):
            raise MessageError(f"{where}: top-k token ids outside {receiver}'s vocabulary of {vocab}")
        out.setdefault(paths[e.path_index].question_id, e)
    return out


# ------------------------------------------------------------------------------------- the server's SLM copy


@dataclass
class HostServerState:
    """What the host keeps on the server between rounds (fedcollm: its copy of the SLM, aggregated weights in)."""

    slm: Side | None = None


def _host(state: ServerState) -> HostServerState:
    h = getattr(state, "host", None)
    if h is None:
        h = HostServerState()
        state.host = h
    return h


def _server_slm(cfg: RunConfig) -> Side:
    """The server's copy of the SLM: the same spec, built the same way, from server-side text only."""
    from fedlada.models import prompt_formatter
    from fedlada.prepare import load_server_data, prepare_model, quiet_data_warnings

    spec = cfg.models.slm_for(0)
    with quiet_data_warnings():  # the run's start said them
        data = load_server_data(cfg)
    model, tok, _ = prepare_model(spec, role="slm0", cfg=cfg, data=data)
    return Side(model, tok, prompt_formatter(tok, spec, data.public))


def _ensure_slm(state: ServerState, cfg: RunConfig) -> Side:
    h = _host(state)
    if h.slm is None:
        h.slm = _server_slm(cfg)
        if tokenizer_fingerprint(h.slm.tokenizer) != tokenizer_fingerprint(state.side.tokenizer):
            raise ConfigError(f"host.name='fedcollm': the SLM ({describe(cfg.models.slm_for(0))}) and the LLM "
                              f"({describe(cfg.models.llm)}) use different tokenizers; mutual KD needs one")
    return h.slm


def save_host_state(server: ServerState, d: Path) -> None:
    """Write the host's server state into checkpoint directory ``d`` (nothing for hosts without one)."""
    h = getattr(server, "host", None)
    if h is not None and h.slm is not None:
        checkpoints.save(trainable_state(h.slm.model), Path(d) / "host_slm.pt")


def load_host_state(server: ServerState, d: Path, cfg: RunConfig) -> None:
    """Restore what :func:`save_host_state` wrote (the fedcollm server's aggregated SLM)."""
    f = Path(d) / "host_slm.pt"
    if cfg.host.name == "fedcollm" and f.is_file():
        load_trainable(_ensure_slm(server, cfg).model, checkpoints.load(f), where=str(f))


# --------------------------------------------------------------------------------------------- the round steps


def server_teach(state: ServerState, *, cfg: RunConfig, round: int, progress: Progress | None = None
                 ) -> tuple[TeachMessage, StepLog]:
    """``rounds.server_teach``, plus the host's payload: the LLM's top-k logits (fedmkt) or the SLM weights
    (fedcollm)."""
    check_host_config(cfg)
    lcfg = lada_config(cfg)
    msg, logd = rounds.server_teach(state, cfg=lcfg, round=round, progress=progress)
    if cfg.host.name == "none" or cfg.lada.method == "local":
        return msg, logd
    t0 = time.perf_counter()
    if cfg.host.name == "fedmkt":
        payload = _topk_payload(state.side, msg.paths, state.public, cfg, model_desc=describe(cfg.models.llm))
    else:
        slm = _ensure_slm(state, cfg)
        payload = encode_state(trainable_state(slm.model), dtype=cfg.host.adapter_dtype,
                               meta={"host": "fedcollm", "round": round})
    logd.metrics.update({"host": cfg.host.name, "host_payload_bytes": len(payload),
                         "host_teach_seconds": _secs(t0)})
    return replace(msg, host=payload), logd


def client_step(state: ClientState, teach: TeachMessage, *, public: dict[str, Record], cfg: RunConfig,
                round: int, progress: Progress | None = None) -> tuple[ReportMessage, StepLog]:
    """``rounds.client_step`` inside the host's client step. Only the ``ReportMessage`` leaves the client."""
    lcfg = lada_config(cfg)
    if cfg.host.name == "none" or cfg.lada.method == "local":
        return rounds.client_step(state, teach, public=public, cfg=lcfg, round=round, progress=progress)
    k, side, h = state.client_id, state.side, cfg.host
    where = f"round {round} teach message to client {k}"
    me = f"client {k}'s SLM ({describe(cfg.models.slm_for(k))})"
    theirs: dict[str, TopK] = {}
    if teach.host is None:
        raise MessageError(f"{where}: host.name='{h.name}' but the message carries no host payload")
    if h.name == "fedcollm":  # start from the aggregated weights
        weights, _ = decode_state(teach.host, where=where)
        load_trainable(side.model, weights, where=where)
    else:
        theirs = _topk_by_question(teach.host, teach.paths, side.tokenizer, where=where, sender="the LLM",
                                   receiver=me)

    report, logd = rounds.client_step(state, teach, public=public, cfg=lcfg, round=round, progress=progress)
    t0 = time.perf_counter()
    selected = _selected(logd, f"llm->client{k}")
    if h.name == "fedmkt":
        qs = [q for q in selected if q in theirs]
        texts = [teach.paths[theirs[q].path_index].text for q in qs]
        ex, n_other = _min_ce_examples(side, qs, texts, [theirs[q] for q in qs], public, cfg)
        stats = kd_train(side.model, side.tokenizer, ex, **_kd_kwargs(
            cfg, lr=cfg.train.client_lr, seed=derive_seed(cfg.seed, "host-client-kd", round, k)))
        logd.metrics.update(_kd_metrics("host_kd", stats, len(ex), n_other))
        _count_tokens(logd.metrics, "train_tokens", stats)
        payload = _topk_payload(side, report.paths, public, cfg, model_desc=describe(cfg.models.slm_for(k)))
    else:
        payload = encode_state(trainable_state(side.model), dtype=h.adapter_dtype,
                               meta={"host": "fedcollm", "train_size": len(state.train), "selected": selected})
    logd.metrics.update({"host_payload_bytes": len(payload), "host_client_seconds": _secs(t0)})
    return replace(report, host=payload), logd


def _client_weights(rep: ReportMessage, where: str) -> tuple[dict[str, torch.Tensor], float, list[str]]:
    w, meta = decode_state(rep.host, where=where)
    n, sel = meta.get("train_size"), meta.get("selected", [])
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise MessageError(f"{where}: 'train_size' must be an integer >= 1, found {n!r}")
    if not isinstance(sel, list) or not all(isinstance(q, str) for q in sel):
        raise MessageError(f"{where}: 'selected' must be a list of public question ids")
    return w, float(n), sel


def _check_fits(weights: dict[str, torch.Tensor], mine: dict[str, torch.Tensor], where: str) -> None:
    """A client's weights must be the server's SLM copy's trainable weights (names and shapes) to be averaged."""
    missing, unknown = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
    wrong = [k for k in mine if k in weights and tuple(weights[k].shape) != tuple(mine[k].shape)]
    if missing or unknown or wrong:
        detail = (f"missing {missing[0]!r}" if missing else f"unknown {unknown[0]!r}" if unknown else
                  f"{wrong[0]!r} of shape {tuple(weights[wrong[0]].shape)}, expected {tuple(mine[wrong[0]].shape)}")
        raise MessageError(f"{where}: its SLM weights do not fit the server's copy ({detail})")


def server_learn(state: ServerState, reports: list[ReportMessage], *, cfg: RunConfig, round: int,
                 progress: Progress | None = None) -> StepLog:
    """``rounds.server_learn``, then the host's server step (fedmkt: LLM KD; fedcollm: FedAvg + mutual KD)."""
    lcfg = lada_config(cfg)
    logd = rounds.server_learn(state, reports, cfg=lcfg, round=round, progress=progress)
    if cfg.host.name == "none" or cfg.lada.method == "local" or not reports:
        return logd
    t0 = time.perf_counter()
    side, m = state.side, logd.metrics
    usable = []
    mine = trainable_state(_ensure_slm(state, cfg).model) if cfg.host.name == "fedcollm" else {}  # once, not per client
    for rep in sorted(reports, key=lambda r: r.client):
        where = f"round {round} report of client {rep.client}"
        try:
            if rep.host is None:
                raise MessageError(f"{where}: no host payload")
            if cfg.host.name == "fedmkt":
                got = _topk_by_question(rep.host, rep.paths, side.tokenizer, where=where,
                                        sender=f"client {rep.client}", receiver=f"the LLM ({describe(cfg.models.llm)})")
            else:
                got = _client_weights(rep, where)
                _check_fits(got[0], mine, where)
        except MessageError as e:
            log.warning("%s; its host contribution is skipped", e)
            m[f"host_rejected_client{rep.client}"] = str(e)
            continue
        usable.append((rep, got))
    kd_seed = derive_seed(cfg.seed, "host-server-kd", round)
    if cfg.host.name == "fedmkt":
        ex, n_other = [], 0
        for rep, theirs in usable:
            qs = [q for q in _selected(logd, f"client{rep.client}->llm") if q in theirs]
            texts = [rep.paths[theirs[q].path_index].text for q in qs]
            e, o = _min_ce_examples(side, qs, texts, [theirs[q] for q in qs], state.public, cfg)
            ex += e
            n_other += o
        stats = kd_train(side.model, side.tokenizer, ex, **_kd_kwargs(cfg, lr=cfg.train.server_lr, seed=kd_seed))
        m.update(_kd_metrics("host_llm_kd", stats, len(ex), n_other))
        _count_tokens(m, "server_train_tokens", stats)
    elif usable:
        _fedcollm_learn(state, usable, logd, cfg=cfg, round=round, seed=kd_seed)
    m["host_server_seconds"] = _secs(t0)
    return logd


def _fedcollm_learn(state: ServerState, usable: list, logd: StepLog, *, cfg: RunConfig, round: int,
                    seed: int) -> None:
    slm, side, m = _ensure_slm(state, cfg), state.side, logd.metrics
    try:
        agg = fedavg([w for _, (w, _, _) in usable], [n for _, (_, n, _) in usable])
    except ValueError as e:
        raise ConfigError(f"host.name='fedcollm': the clients' weights cannot be averaged ({e}); the SLMs must be "
                          f"identical") from None
    load_trainable(slm.model, agg, where=f"round {round} aggregated SLM")
    m["host_aggregated_clients"] = len(usable)
    # the aggregated SLM learns from the LLM on the union of the clients' selections, on the LLM's best correct path
    union = sorted({q for _, (_, _, sel) in usable for q in sel if q in state.public})
    llm_paths = {}
    for q in union:
        ok = [(lp / max(nt, 1), y) for y, lp, nt, c in state.own_paths.get(q, []) if c]
        if ok:
            llm_paths[q] = max(ok)[1]
    qs = sorted(llm_paths)
    t = topk_targets(side.model, side.tokenizer, side.prompts([state.public[q].question for q in qs]),
                     [llm_paths[q] for q in qs], k=cfg.host.topk, max_length=cfg.train.max_length)
    ex = [KDExample(p, llm_paths[q], e.values, e.indices)
          for q, p, e in zip(qs, slm.prompts([state.public[q].question for q in qs]), t)]
    stats = kd_train(slm.model, slm.tokenizer, ex, **_kd_kwargs(cfg, lr=cfg.train.client_lr, seed=seed))
    m.update(_kd_metrics("host_slm_kd", stats, len(ex)))
    _count_tokens(m, "server_train_tokens", stats)
    # then the LLM learns from the updated SLM on the server's selections, on each client's best correct path
    texts: list[tuple[str, str]] = []
    for rep, _ in usable:
        best = _best_paths(rep.paths)
        texts += [(q, rep.paths[best[q]].text) for q in _selected(logd, f"client{rep.client}->llm") if q in best]
    t = topk_targets(slm.model, slm.tokenizer, slm.prompts([state.public[q].question for q, _ in texts]),
                     [y for _, y in texts], k=cfg.host.topk, max_length=cfg.train.max_length)
    ex = [KDExample(p, y, e.values, e.indices)
          for (q, y), p, e in zip(texts, side.prompts([state.public[q].question for q, _ in texts]), t)]
    stats = kd_train(side.model, side.tokenizer, ex, **_kd_kwargs(cfg, lr=cfg.train.server_lr, seed=seed + 1))
    m.update(_kd_metrics("host_llm_kd", stats, len(ex)))
    _count_tokens(m, "server_train_tokens", stats)
