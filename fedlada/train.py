"""The one local training loop, used by clients (SLMs) and by the server (LLM, LoRA) alike.

Objective (LADA.md, "Domain-adaptive reasoning distillation"), per optimizer step:

    L = L_SFT(sft) + lambda_da * L_DA(preference and/or listwise) + mu * L_SFT(distill_sft)

* L_SFT: token NLL of the path given the prompt, summed over path tokens and divided by the number of path tokens in
  the whole optimizer step (all accumulated micro-batches), so ``batch_size`` x ``grad_accum`` does not change the
  gradient (STYLE.md point 7). ``SFTExample.weight`` multiplies an example's token losses.
* L_DA, pairwise: ``losses.contrastive_path_loss`` averaged over the pairs of the step. The reference is the model as
  it is when ``train`` is called: its log-probs of every chosen and rejected path are computed once, before the first
  step (eval mode, no grad), so no second copy of the model is held.
* L_DA, listwise: ``losses.listwise_path_loss`` averaged over the step's questions; the teacher's log-probs come with
  the examples, the student's are computed with grad. Only valid paths are run through the model, and questions with
  fewer than two valid paths are dropped up front (they carry no ranking signal). If both pairwise and listwise
  examples are given, L_DA is the sum of the two means.

Batching -- a choice of ours: each epoch has ``n = max_k ceil(len(kind_k) / batch_size)`` micro-batches. Each kind
of example (sft, preference, listwise, distill_sft) is shuffled with its own RNG and split into ``n`` nearly equal
contiguous chunks, and micro-batch i holds chunk i of every kind. So a small distillation set is interleaved with the
local SFT data over the whole epoch instead of being trained in a block of its own, and every example is seen once
per epoch. Each kind gets its own forward pass (padded to its own longest row); the gradient of each term is
accumulated right away, so only one activation graph is alive at a time. With ``bucket_by_length`` the shuffled
examples are sorted by length inside windows of 16 chunks before chunking (less padding), then the chunk order is
shuffled again. ``n_steps = ceil(n / grad_accum)``; the last step of an epoch may hold fewer micro-batches and is
normalised by its own counts.

Prefix reuse (``reuse_prefix``, by default on a CPU only: ``paths.reuse_prefix_pays``): the paths of one prompt --
chosen and rejected, or a listwise example's valid paths -- are scored after a single pass over the prompt whose
key/value cache is shared by all of them, with gradients flowing through the cache. This is the same computation as
running every (prompt, path) row in full (tested to float rounding, gradients included) with one prompt pass per
prompt instead of one per path; the reference pass uses it too. SFT examples have one path per prompt and always
run as plain rows. On a GPU it is off by default: there the plain rows train at 1.6x the speed of the shared-prefix
passes (H200, bf16, ``benchmarks/results/gpu/train_*.json``), the saved prompt positions costing less than the
second forward call.

Other choices: a term whose weight (``lambda_da`` or ``mu``) is 0 is dropped before anything is computed, so
``lambda_da=0`` is bitwise the same as not passing the examples. Constant learning rate by default
(``lr_schedule="cosine"`` for pretraining), AdamW over the parameters with ``requires_grad`` only (a peft model
trains only its adapters), weight decay on all of them; on CUDA the fused AdamW kernel (same update, one launch).
``compile=True`` (config ``train.compile``) runs the forward passes through ``torch.compile(model, dynamic=True)``,
off by default because its one-off compilation (about a minute per architecture on a CPU) outweighs a short update.
A step whose loss is not finite is not applied: ``train`` raises :class:`TrainingError` instead (the weights keep
the previous step's values), and examples are checked when made (``SFTExample.weight`` finite and >= 0, a valid
listwise path's teacher log-probability <= 0, -inf allowed). Dropout makes the shared-prefix passes draw other masks
than plain rows, so ``reuse_prefix`` on and off agree to float rounding only with dropout off (the default tiny
models have none). The reference pass runs in eval mode (no dropout) and the training passes in train mode, so with
dropout (e.g. ``lora_dropout`` > 0) the pairwise loss at the first step is not exactly log 2. Determinism: shuffling
uses ``random.Random`` seeded from ``seed``; dropout uses the torch RNG forked and seeded with ``seed`` (the
caller's global RNG state is restored afterwards).
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch

from fedlada.config import LR_SCHEDULES
from fedlada.errors import ConfigError, FedLadaError
from fedlada.losses import contrastive_path_loss, listwise_path_loss, sequence_logprobs, sft_loss
from fedlada.paths import collate, encode_pair, path_logprobs, reuse_prefix_pays

logger = logging.getLogger(__name__)

_BUCKET_WINDOW = 16  # chunks per length-sorting window when bucket_by_length


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    path: str
    weight: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"SFTExample: weight must be a finite number >= 0, found {self.weight!r}")


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class ListwiseExample:
    """M paths of one prompt with the teacher's log joint probabilities; ``valid`` marks usable (correct) paths."""

    prompt: str
    paths: list[str]
    teacher_logp: list[float]
    valid: list[bool]

    def __post_init__(self):
        if not len(self.paths) == len(self.teacher_logp) == len(self.valid):
            raise ValueError(f"ListwiseExample: paths, teacher_logp and valid must have the same length, got "
                             f"{len(self.paths)}, {len(self.teacher_logp)}, {len(self.valid)}")
        bad = [lp for lp, ok in zip(self.teacher_logp, self.valid) if ok and (math.isnan(lp) or lp > 1e-6)]
        if bad:  # -inf is allowed: a path the teacher rules out counts 0 in the loss
            raise ValueError(f"ListwiseExample: a valid path's teacher_logp must be a log-probability (<= 0, not "
                             f"NaN), found {bad[0]!r}")


class TrainingError(FedLadaError):
    """Training stopped before a step that would have made the weights non-finite."""


@dataclass
class TrainStats:
    """steps: optimizer steps; tokens: non-pad tokens fed to the model in training forward passes (not the reference
    pass; with ``reuse_prefix`` a prompt counts once for all of its paths);
    loss: mean over steps of the objective; components: mean over steps of each unweighted term (``sft``, ``da``,
    ``distill``; NaN where a term had no data); seconds: wall-clock time of ``train``, reference pass included."""

    steps: int
    tokens: int
    loss: float
    components: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ encoding and plan


def _encode(tokenizer, examples, kind: str, max_length: int) -> list[dict]:
    """Tokenise once; each item keeps its pairs (prompt_ids, path_ids) and the values its loss needs."""
    items = []
    for ex in examples:
        if kind in ("sft", "distill"):
            items.append(dict(pairs=[encode_pair(tokenizer, ex.prompt, ex.path, max_length=max_length)],
                              weight=float(ex.weight)))
        elif kind == "pref":
            items.append(dict(pairs=[encode_pair(tokenizer, ex.prompt, ex.chosen, max_length=max_length),
                                     encode_pair(tokenizer, ex.prompt, ex.rejected, max_length=max_length)]))
        else:  # listwise: keep the valid paths only
            keep = [j for j, ok in enumerate(ex.valid) if ok]
            if len(keep) < 2:
                continue
            items.append(dict(pairs=[encode_pair(tokenizer, ex.prompt, ex.paths[j], max_length=max_length)
                                     for j in keep],
                              teacher=[float(ex.teacher_logp[j]) for j in keep]))
    for it in items:
        it["length"] = max(len(p) + len(y) for p, y in it["pairs"])
    return items


def _chunks(items: list[dict], n: int, rng: random.Random, bucket: bool) -> list[list[dict]]:
    """Shuffle ``items`` and split them into ``n`` nearly equal contiguous chunks (see the module docstring)."""
    order = list(items)
    rng.shuffle(order)
    if bucket:
        window = _BUCKET_WINDOW * max(1, math.ceil(len(order) / n))
        order = [it for s in range(0, len(order), window)
                 for it in sorted(order[s:s + window], key=lambda it: it["length"])]
    size, extra = divmod(len(order), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    chunks = [order[bounds[i]:bounds[i + 1]] for i in range(n)]
    if bucket:
        rng.shuffle(chunks)
    return chunks


def _collate_shared(tokenizer, prompts: list[list[int]], paths: list[list[int]], group: list[int]) -> dict:
    """Batch for :func:`_shared_logprobs`: G prompts left-padded (G,P); R paths right-padded (R,C), C = longest
    path - 1 (a path's last token is only predicted, never fed in); ``group[r]`` = the prompt of path r."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    G, P = len(prompts), max(len(p) for p in prompts)
    R, C = len(paths), max(len(y) for y in paths) - 1
    b = dict(prompt_ids=torch.full((G, P), pad), prompt_mask=torch.zeros((G, P), dtype=torch.long),
             path_ids=torch.full((R, C), pad), path_labels=torch.full((R, C), pad),
             path_mask=torch.zeros((R, C), dtype=torch.long), first=torch.tensor([y[0] for y in paths]),
             group=torch.tensor(group), path_len=torch.tensor([len(y) for y in paths]))
    for g, p in enumerate(prompts):
        b["prompt_ids"][g, P - len(p):] = torch.tensor(p)
        b["prompt_mask"][g, P - len(p):] = 1
    for r, y in enumerate(paths):
        b["path_ids"][r, :len(y) - 1] = torch.tensor(y[:-1], dtype=torch.long)
        b["path_labels"][r, :len(y) - 1] = torch.tensor(y[1:], dtype=torch.long)
        b["path_mask"][r, :len(y) - 1] = 1
    return b


def _collate_kind(tokenizer, kind: str, chunk: list[dict], device, *, reuse_prefix: bool = False) -> dict:
    """One padded batch for one kind; rows are [chosen..., rejected...] for pairs, flattened valid paths for lists.

    With ``reuse_prefix`` (pairs and lists only) each prompt appears once and its paths follow it through the key/value
    cache (:func:`_collate_shared`). Adds ``count`` (this batch's share of the step-global normaliser: path tokens for
    SFT kinds, examples otherwise) and ``tokens`` (non-pad tokens run through the model), counted on the CPU.
    """
    if kind == "pref":
        pairs = [it["pairs"][0] for it in chunk] + [it["pairs"][1] for it in chunk]
        group = list(range(len(chunk))) * 2
    else:
        pairs = [p for it in chunk for p in it["pairs"]]
        group = [g for g, it in enumerate(chunk) for _ in it["pairs"]]
    if reuse_prefix and kind in ("pref", "list"):
        batch = _collate_shared(tokenizer, [it["pairs"][0][0] for it in chunk], [y for _, y in pairs], group)
        extra = dict(tokens=int(batch["prompt_mask"].sum() + batch["path_mask"].sum()))
    else:
        batch = collate(tokenizer, pairs)
        batch["path_len"] = batch["loss_mask"].sum(-1)
        extra = dict(tokens=int(batch["attention_mask"].sum()))
    if kind in ("sft", "distill"):
        extra["count"] = int(batch["loss_mask"].sum())
        batch["weights"] = batch["loss_mask"].float() * torch.tensor([it["weight"] for it in chunk])[:, None]
    elif kind == "pref":
        extra["count"] = len(chunk)
        batch["ref"] = torch.tensor([it.get("ref", (0.0, 0.0)) for it in chunk])
    elif kind == "list":
        extra["count"] = len(chunk)
        m = max(len(it["pairs"]) for it in chunk)
        batch["teacher"] = torch.tensor([it["teacher"] + [0.0] * (m - len(it["teacher"])) for it in chunk])
        batch["valid"] = torch.tensor([[j < len(it["pairs"]) for j in range(m)] for it in chunk])
    return {**{k: v.to(device) for k, v in batch.items()}, **extra}


# ------------------------------------------------------------------------------------------------ losses per kind


def _forward_parameters(model) -> set[str]:
    base = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return set(inspect.signature(type(base).forward).parameters)


def _can_reuse_prefix(model) -> bool:
    """A key/value cache is needed; transformers drops it when activation checkpointing is on."""
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _shared_logprobs(model, batch: dict) -> torch.Tensor:
    """log pi(path | prompt) (R,), differentiable, running each prompt once for all of its paths.

    A prefix pass over the left-padded prompts (explicit position ids, so padding changes nothing) returns the
    distribution of every path's first token and the key/value cache; the cache rows are repeated for the paths of
    each prompt (a differentiable gather) and the paths run through right-padded after them. Equal to
    ``path_logprobs`` on the concatenated rows up to float rounding, with one prompt pass instead of one per path.
    """
    pmask, group = batch["prompt_mask"], batch["group"]
    params = _forward_parameters(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_argument = "cache" if "cache" in params else "past_key_values"  # the name before transformers 5
    out = model(input_ids=batch["prompt_ids"], attention_mask=pmask, position_ids=(pmask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, **keep)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[group].gather(-1, batch["first"][:, None])[:, 0]
    if batch["path_ids"].shape[1] == 0:  # every path is a single token
        return first
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_select_indices(group)
    cmask = batch["path_mask"]
    positions = pmask.sum(-1)[group][:, None] + torch.arange(cmask.shape[1], device=cmask.device)[None, :]
    logits = model(input_ids=batch["path_ids"], attention_mask=torch.cat([pmask[group], cmask], dim=1),
                   position_ids=positions, use_cache=True, **{cache_argument: cache}).logits
    return first + sequence_logprobs(logits, batch["path_labels"], cmask)


def _logprobs(model, batch: dict) -> torch.Tensor:
    return _shared_logprobs(model, batch) if "prompt_ids" in batch else path_logprobs(model, batch)


def _term(model, kind: str, batch: dict, denom: float, *, beta: float, tau: float) -> torch.Tensor:
    """This micro-batch's share of one objective term: its sum divided by the step-global count ``denom``."""
    if kind in ("sft", "distill"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return sft_loss(logits, batch["labels"], batch["weights"], num_tokens=denom)  # labels[:, t] = ids[:, t+1]
    logp = _logprobs(model, batch)
    if kind == "pref":
        chosen, rejected = logp.chunk(2)
        ref = batch["ref"]
        return contrastive_path_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=beta, reduction="sum") / denom
    valid = batch["valid"]
    student = torch.zeros(valid.shape, dtype=logp.dtype, device=logp.device).masked_scatter(valid, logp)
    lengths = torch.zeros(valid.shape, device=logp.device).masked_scatter(valid, batch["path_len"].float())
    return listwise_path_loss(student, batch["teacher"], lengths, valid, tau=tau, reduction="sum") / denom


@torch.no_grad()
def _reference_logprobs(model, tokenizer, items: list[dict], *, batch_size: int, autocast,
                        reuse_prefix: bool) -> None:
    """Store log pi_ref(chosen), log pi_ref(rejected) of the model as it is now in each preference item."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: items[i]["length"])  # similar lengths together: less padding
    for s in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[s:s + batch_size]]
        batch = _collate_kind(tokenizer, "pref", chunk, device, reuse_prefix=reuse_prefix)
        with autocast():
            chosen, rejected = _logprobs(model, batch).float().chunk(2)
        for it, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            it["ref"] = (c, r)
    model.train(was_training)


# ------------------------------------------------------------------------------------------------ the loop


def _cosine(step: int, *, total: int, warmup: float, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup * total`` steps, then cosine decay to ``floor``."""
    n_warm = int(warmup * total)
    if step < n_warm:
        return (step + 1) / n_warm
    frac = (step - n_warm) / max(total - n_warm, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train(model, tokenizer, *, sft: Sequence[SFTExample] = (), preference: Sequence[PreferenceExample] = (),
          listwise: Sequence[ListwiseExample] = (), distill_sft: Sequence[SFTExample] = (), lr: float,
          epochs: int = 1, batch_size: int = 16, grad_accum: int = 1, max_grad_norm: float | None = 1.0,
          weight_decay: float = 0.0, bf16: bool = False, beta: float = 0.1, lambda_da: float = 1.0, mu: float = 0.5,
          tau: float = 1.0, max_length: int = 256, seed: int = 0, bucket_by_length: bool = True,
          reuse_prefix: bool | None = None, lr_schedule: str = "constant", warmup: float = 0.0,
          compile: bool = False, progress: Callable[[int, int], None] | None = None) -> TrainStats:
    """Train ``model`` in place on the LaDa objective (module docstring) and return what it did.

    ``batch_size`` is per kind and per micro-batch (in examples; a preference example is two rows, a listwise example
    one row per valid path). ``max_grad_norm`` None or <= 0 disables clipping. ``progress(step, total)`` is called
    after every optimizer step. The model ends in the train/eval mode it came in. ``lr_schedule`` is ``"constant"``
    (the default, used for the short federated updates) or ``"cosine"`` (linear warm-up over the first ``warmup``
    fraction of steps, then cosine decay to 10% of ``lr``; used for pretraining the default tiny models).
    ``compile`` runs the training and reference forward passes through ``torch.compile(model, dynamic=True)``: the
    same computation up to float rounding, faster once compiled, but the first call in a process pays the
    compilation (about a minute per model architecture on a CPU); later calls on a model of the same architecture
    reuse it. Off by default: a short federated update rarely repays it.
    """
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum),
                       ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"train: {key}: expected an integer, found {value!r}")
    for key, value in (("lr", lr), ("beta", beta), ("tau", tau), ("lambda_da", lambda_da), ("mu", mu),
                       ("warmup", warmup)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"train: {key}: expected a finite number, found {value!r}")
    for key, value, ok, expected in (
            ("lr", lr, lr > 0, "> 0"), ("epochs", epochs, epochs >= 0, "an integer >= 0"),
            ("batch_size", batch_size, batch_size >= 1, "an integer >= 1"),
            ("grad_accum", grad_accum, grad_accum >= 1, "an integer >= 1"), ("beta", beta, beta > 0, "> 0"),
            ("tau", tau, tau > 0, "> 0"),
            ("lambda_da", lambda_da, lambda_da >= 0, ">= 0"), ("mu", mu, mu >= 0, ">= 0"),
            ("max_length", max_length, max_length >= 2, "an integer >= 2"),
            ("lr_schedule", lr_schedule, lr_schedule in LR_SCHEDULES, "'constant' or 'cosine'"),
            ("warmup", warmup, 0 <= warmup < 1, "a fraction in [0, 1)")):
        if not ok:
            raise ConfigError(f"train: {key}: expected {expected}, found {value!r}")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    weights = {"sft": 1.0, "pref": lambda_da, "list": lambda_da, "distill": mu}
    sources = {"sft": sft, "pref": preference, "list": listwise, "distill": distill_sft}
    data = {k: _encode(tokenizer, src, k, max_length) for k, src in sources.items() if src and weights[k] > 0}
    data = {k: v for k, v in data.items() if v}
    n_micro = max((math.ceil(len(v) / batch_size) for v in data.values()), default=0)
    total_steps = epochs * math.ceil(n_micro / grad_accum)
    components = {"sft": [], "da": [], "distill": []}
    if total_steps == 0:
        logger.info("train: nothing to train on (no examples, epochs=0 or zero-weight terms only)")
        return TrainStats(0, 0, float("nan"), {k: float("nan") for k in components}, time.perf_counter() - t0)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("train: the model has no parameter with requires_grad=True")
    autocast = ((lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if bf16 else nullcontext)
    if reuse_prefix is None:
        reuse_prefix = reuse_prefix_pays(device)
    if reuse_prefix and not _can_reuse_prefix(model):
        logger.info("train: activation checkpointing is on, so prompts are not shared between paths (reuse_prefix off)")
        reuse_prefix = False
    net = torch.compile(model, dynamic=True) if compile else model  # shares model's parameters
    if compile:
        logger.info("train: forward passes through torch.compile (the first update of an architecture in this "
                    "process compiles first: about a minute on a CPU)")
    if "pref" in data:
        _reference_logprobs(net, tokenizer, data["pref"], batch_size=batch_size, autocast=autocast,
                            reuse_prefix=reuse_prefix)
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, partial(_cosine, total=total_steps, warmup=warmup))
             if lr_schedule == "cosine" else None)
    rngs = {k: random.Random(f"{seed}/{k}") for k in data}
    logger.info("train: %s; %d steps of up to %d x %d micro-batches",
                ", ".join(f"{len(v)} {k}" for k, v in data.items()), total_steps, grad_accum, batch_size)

    step, tokens, losses = 0, 0, []
    was_training = model.training
    model.train()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        for _epoch in range(epochs):
            chunks = {k: _chunks(v, n_micro, rngs[k], bucket_by_length) for k, v in data.items()}
            for s in range(0, n_micro, grad_accum):
                micro = [{k: _collate_kind(tokenizer, k, chunks[k][i], device, reuse_prefix=reuse_prefix)
                          for k in data if chunks[k][i]} for i in range(s, min(s + grad_accum, n_micro))]
                present = [k for k in data if any(k in mb for mb in micro)]  # a small set may miss some steps
                denom = {k: sum(mb[k]["count"] for mb in micro if k in mb) for k in present}
                term_sums = {k: torch.zeros((), device=device) for k in present}
                for mb in micro:
                    for kind, batch in mb.items():
                        with autocast():
                            term = _term(net, kind, batch, max(denom[kind], 1), beta=beta, tau=tau)
                        (weights[kind] * term).backward()  # accumulate now: one graph alive at a time
                        term_sums[kind] += term.detach().float()
                        tokens += batch["tokens"]
                term_sums = {k: v.item() for k, v in term_sums.items()}  # one sync per kind per step
                if not all(math.isfinite(v) for v in term_sums.values()):
                    opt.zero_grad(set_to_none=True)
                    model.train(was_training)
                    raise TrainingError(
                        f"train: the loss is not finite at step {step + 1}/{total_steps} ("
                        + ", ".join(f"{k} {v}" for k, v in term_sums.items())
                        + "); this step was not applied. Usually the learning rate is too high for this model "
                        "(lower train.client_lr or train.server_lr; models.pretrain_lr in pretraining)"
                        + (" or bf16 overflowed (train.bf16 = false)" if bf16 else "")
                        + ("; the weights are already not finite (a float16 model trained without LoRA?)"
                           if not all(bool(torch.isfinite(p).all()) for p in params) else ""))
                if max_grad_norm is not None and max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()

                step += 1
                losses.append(sum(weights[k] * v for k, v in term_sums.items()))
                for name, kinds in (("sft", ("sft",)), ("da", ("pref", "list")), ("distill", ("distill",))):
                    if any(k in term_sums for k in kinds):
                        components[name].append(sum(term_sums.get(k, 0.0) for k in kinds))
                logger.debug("train step %d/%d loss %.4f", step, total_steps, losses[-1])
                if progress is not None:
                    progress(step, total_steps)
    model.train(was_training)

    stats = TrainStats(step, tokens, sum(losses) / len(losses),
                       {k: (sum(v) / len(v) if v else float("nan")) for k, v in components.items()},
                       time.perf_counter() - t0)
    logger.info("train: %d steps, %d tokens, loss %.4f, %.1fs (%.0f tok/s)", stats.steps, stats.tokens, stats.loss,
                stats.seconds, stats.tokens / max(stats.seconds, 1e-9))
    return stats
