"""Sampling reasoning paths and scoring their log joint probability, batched.

Implements the two model-side quantities LaDa's filter and losses need (LADA.md): a path y's log joint probability
log pi(y | x) = sum_j log pi(y_j | x, y_<j) under a model (``path_logprobs`` differentiable, ``score_paths`` for
inference, with the per-token NLL l(y; pi) = -log pi(y | x) / |y| as ``PathScores.nll``), and M sampled paths per
question (``sample_paths``). ``question_embeddings`` gives the filter its question features.

Tokenisation rule, used everywhere: the prompt and the path are tokenised separately (no special tokens added) and
concatenated; eos is appended to the path. The path's tokens, eos included, are scored; prompt tokens never are.
When prompt + path is longer than ``max_length`` the path is cut from the right (its eos goes first); a prompt that
leaves no room for a single path token is an error.

Departures from the paper / choices of ours:

* Sampling stops after the first completed ``Answer: ...`` line (or at eos) and drops whatever follows, so a path
  is always "rationale lines, then the answer line" without a trailing newline, as ``reasoning.format_path`` writes.
* ``score_paths`` is exact, not approximate: batching, padding, bucketing by length and reusing a shared prompt's
  key/value cache change nothing beyond float rounding (tested to 1e-5 against one-at-a-time scoring).
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from fedlada.errors import DataError

logger = logging.getLogger(__name__)

# A completed answer line: "Answer:" at the start of a line (leading blanks allowed), then the rest of the line and
# its newline. Sampling stops once the generated text contains one.
ANSWER_LINE_DONE_RE = re.compile(r"^[ \t]*Answer:[^\n]*\n", re.MULTILINE)


@dataclass(frozen=True)
class PathScores:
    """Scores of N (prompt, path) pairs: ``logprob`` = log pi(path | prompt) (N,) float64, ``num_tokens`` (N,) int64
    = scored tokens (path tokens incl. eos, after truncation)."""

    logprob: np.ndarray
    num_tokens: np.ndarray

    @property
    def nll(self) -> np.ndarray:
        """Per-token negative log-likelihood -logprob / num_tokens, (N,)."""
        return -self.logprob / self.num_tokens

    def __len__(self) -> int:
        return len(self.logprob)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenisation and batches


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _check_prompt(n_prompt: int, max_length: int) -> None:
    if n_prompt == 0:
        raise DataError("empty prompt: a path's first token must be predicted from at least one prompt token")
    if n_prompt >= max_length:
        raise DataError(f"prompt is {n_prompt} tokens long, which leaves no room for a path within "
                        f"max_length={max_length}; raise max_length or shorten the question")


def _join(prompt_ids: list[int], body_ids: list[int], eos: int, max_length: int) -> tuple[list[int], list[int]]:
    _check_prompt(len(prompt_ids), max_length)
    path_ids = (list(body_ids) + [eos])[: max_length - len(prompt_ids)]
    return list(prompt_ids), path_ids


def encode_pair(tokenizer, prompt: str, path: str, *, max_length: int) -> tuple[list[int], list[int]]:
    """``(prompt_ids, path_ids)``: tokenised separately without special tokens; ``path_ids`` ends with eos.

    If ``len(prompt_ids) + len(path_ids) > max_length`` the path is truncated from the right (eos is cut first).
    Raises DataError when the prompt is empty or has ``max_length`` tokens or more.
    """
    (p,), (y,) = _ids(tokenizer, [prompt]), _ids(tokenizer, [path])
    return _join(p, y, tokenizer.eos_token_id, max_length)


def _encode_many(tokenizer, prompts: list[str], paths: list[str], max_length: int):
    """encode_pair over lists; each distinct prompt is tokenised once."""
    uniq = list(dict.fromkeys(prompts))
    prompt_ids = dict(zip(uniq, _ids(tokenizer, uniq)))
    eos = tokenizer.eos_token_id
    return [_join(prompt_ids[p], y, eos, max_length) for p, y in zip(prompts, _ids(tokenizer, paths))]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(tokenizer, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``(prompt_ids, path_ids)`` pairs.

    Returns ``input_ids`` (B,T), ``attention_mask`` (B,T), ``labels`` (B,T) with ``labels[:, t] = input_ids[:, t+1]``
    (pad id past the end) and ``loss_mask`` (B,T) float, 1 where ``labels[:, t]`` is a path token: the positions whose
    next-token prediction is scored. ``logits[:, t]`` of a causal LM run on ``input_ids`` predicts ``labels[:, t]``.
    """
    pad = _pad_id(tokenizer)
    T = max(len(p) + len(y) for p, y in pairs)
    B = len(pairs)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), pad, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    for b, (p, y) in enumerate(pairs):
        seq = torch.tensor(list(p) + list(y), dtype=torch.long)
        n = len(seq)
        input_ids[b, :n] = seq
        attention_mask[b, :n] = 1
        labels[b, : n - 1] = seq[1:]
        loss_mask[b, len(p) - 1: n - 1] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "loss_mask": loss_mask}


def _left_pad(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    W = max(len(x) for x in ids)
    out = torch.full((len(ids), W), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), W), dtype=torch.long)
    for b, x in enumerate(ids):
        out[b, W - len(x):] = torch.tensor(x)
        mask[b, W - len(x):] = 1
    return out, mask


# ---------------------------------------------------------------------------------------------------------------------
# Model plumbing (transformers 5 renamed past_key_values -> cache; support both)


def _base(model):
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_params(model) -> set[str]:
    return set(inspect.signature(type(_base(model)).forward).parameters)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log pi(labels | prefix) (B,K) float32 and the loss mask (B,K), K = positions from the first
    scored one on (logits before it are never computed)."""
    dev = _device(model)
    input_ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    mask = batch["loss_mask"].to(dev)
    labels = batch.get("labels")
    if labels is None:
        labels = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    labels = labels.to(dev)
    T = input_ids.shape[1]
    scored = mask.any(dim=0).nonzero()
    start = int(scored[0]) if len(scored) else T - 1
    kwargs = {"logits_to_keep": T - start} if "logits_to_keep" in _forward_params(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attn, **kwargs).logits
    logits = logits[:, -(T - start):].float()
    labels, mask = labels[:, start:], mask[:, start:]
    tok = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(mask != 0, tok, torch.zeros_like(tok)), mask


def path_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(path | prompt) per row, (B,) float32, differentiable: sum over path tokens (incl. eos) of
    log pi(y_j | x, y_<j). ``batch`` as returned by :func:`collate` (``loss_mask`` may hold weights)."""
    tok, mask = _token_logprobs(model, batch)
    return (tok * mask).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def _score_plain(model, tokenizer, pairs) -> np.ndarray:
    tok, mask = _token_logprobs(model, collate(tokenizer, pairs))
    return (tok.double() * mask.double()).sum(dim=-1).cpu().numpy()


def _select_rows(cache, rows: torch.Tensor):
    """A cache holding ``cache``'s batch rows ``rows`` (repeats allowed); ``cache`` itself is left as it is."""
    if not hasattr(cache, "layers"):
        cache = copy.deepcopy(cache)
        cache.batch_select_indices(rows)
        return cache
    sub = copy.copy(cache)
    sub.layers = [copy.copy(layer) for layer in cache.layers]  # selection rebinds the copies' tensors only
    sub.batch_select_indices(rows)
    return sub


def _score_shared(model, tokenizer, prompt_ids: list[list[int]], paths: list[list[list[int]]],
                  batch_size: int) -> list[np.ndarray]:
    """Score ``paths[g]`` (each a list of path token lists) after ``prompt_ids[g]``, encoding each prompt once.

    One prefix pass runs the G prompts left-padded (explicit position ids, so padding changes nothing) and keeps
    their key/value cache. The paths are then sorted by length and run right-padded in batches of ``batch_size``
    rows, each on a copy of the cache rows of its prompts, so a path batch is padded only to its own longest path.
    """
    dev = _device(model)
    params = _forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    pad = _pad_id(tokenizer)
    ids, pmask = _left_pad(prompt_ids, pad)
    ids, pmask = ids.to(dev), pmask.to(dev)
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=pmask, position_ids=ppos, use_cache=True, **keep)
    first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (G,V): predicts each path's first token
    prefix_cache = _cache_of(out)
    prompt_len = pmask.sum(-1)

    counts = [len(ys) for ys in paths]
    rows = [(g, y) for g, ys in enumerate(paths) for y in ys]
    row_group = torch.tensor([g for g, _ in rows], device=dev)
    first_tok = torch.tensor([y[0] for _, y in rows], device=dev)
    total = first_logp[row_group, first_tok].double().cpu().numpy()
    order = sorted(range(len(rows)), key=lambda n: -len(rows[n][1]))
    for k in range(0, len(order), batch_size):
        sub = [n for n in order[k: k + batch_size] if len(rows[n][1]) > 1]
        if not sub:
            continue  # paths of one token (eos) were scored by the prefix pass alone
        group = torch.tensor([rows[n][0] for n in sub], device=dev)
        C = max(len(rows[n][1]) for n in sub) - 1  # the last path token is only predicted, never fed in
        cont = torch.full((len(sub), C), pad, dtype=torch.long)
        labels = torch.full((len(sub), C), pad, dtype=torch.long)
        cmask = torch.zeros((len(sub), C), dtype=torch.long)
        for b, n in enumerate(sub):
            y = rows[n][1]
            cont[b, : len(y) - 1] = torch.tensor(y[:-1])
            labels[b, : len(y) - 1] = torch.tensor(y[1:])
            cmask[b, : len(y) - 1] = 1
        cont, labels, cmask = cont.to(dev), labels.to(dev), cmask.to(dev)
        pos = prompt_len[group][:, None] + torch.arange(C, device=dev)[None, :]
        attn = torch.cat([pmask[group], cmask], dim=1)
        logits = model(input_ids=cont, attention_mask=attn, position_ids=pos, use_cache=True,
                       **{cache_kw: _select_rows(prefix_cache, group)}).logits.float()  # (b,C,V)
        tok = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        total[sub] += torch.where(cmask != 0, tok, torch.zeros_like(tok)).double().sum(-1).cpu().numpy()
    return np.split(total, np.cumsum(counts)[:-1])


def reuse_prefix_pays(device: torch.device) -> bool:
    """Whether encoding a shared prompt once for all of its paths is worth it on ``device`` (measured): yes on a CPU,
    no on a GPU, where the extra forward call and the cache gather cost more than the prompt positions saved."""
    return torch.device(device).type == "cpu"


def _plain_batches(order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    ranked = sorted(order, key=lambda i: -lengths[i])
    return [ranked[i: i + batch_size] for i in range(0, len(ranked), batch_size)]


def score_paths(model, tokenizer, prompts: list[str], paths: list[str], *, batch_size: int = 32,
                max_length: int = 512, reuse_prefix: bool | None = None) -> PathScores:
    """log pi(path | prompt) and the scored-token count of every pair, without gradients, in eval mode.

    Pairs are sorted by length into batches of at most ``batch_size`` rows and the results put back in input order.
    With ``reuse_prefix``, paths that share a prompt string are scored together: the prompt is encoded once and its
    key/value cache reused for each of its paths (a prompt with a single path is batched plainly). The result equals
    scoring each pair alone to float rounding (1e-5 in float32) whatever the batching, padding side or order.
    ``None`` (the default) reuses on a CPU only, where it pays (1.25-1.65x at M=4, ideal 1.71x); on a GPU the
    second forward call and the cache gather cost more than the saved prompt positions (0.83-0.91x on an H200,
    ``benchmarks/results/gpu/scoring.json``).
    Paths too long for ``max_length`` are truncated from the right (see :func:`encode_pair`).
    """
    if len(prompts) != len(paths):
        raise ValueError(f"score_paths: {len(prompts)} prompts but {len(paths)} paths")
    N = len(paths)
    logprob = np.zeros(N, dtype=np.float64)
    if N == 0:
        return PathScores(logprob, np.zeros(0, dtype=np.int64))
    pairs = _encode_many(tokenizer, prompts, paths, max_length)
    num_tokens = np.array([len(y) for _, y in pairs], dtype=np.int64)
    lengths = [len(p) + len(y) for p, y in pairs]
    if reuse_prefix is None:
        reuse_prefix = reuse_prefix_pays(_device(model))

    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    shared = [idx for idx in groups.values() if len(idx) > 1] if reuse_prefix else []
    singles = [i for idx in groups.values() if not (reuse_prefix and len(idx) > 1) for i in idx]
    logger.debug("scoring %d paths: %d in %d shared-prompt groups, %d plain", N, N - len(singles), len(shared),
                 len(singles))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _plain_batches(singles, lengths, batch_size):
                logprob[batch] = _score_plain(model, tokenizer, [pairs[i] for i in batch])
            # Shared-prompt groups, by prompt length, batch_size prompts per prefix pass.
            shared.sort(key=lambda idx: -len(pairs[idx[0]][0]))
            for k in range(0, len(shared), batch_size):
                chunk = shared[k: k + batch_size]
                scores = _score_shared(model, tokenizer, [pairs[idx[0]][0] for idx in chunk],
                                       [[pairs[i][1] for i in idx] for idx in chunk], batch_size)
                for idx, s in zip(chunk, scores):
                    logprob[idx] = s
    finally:
        model.train(was_training)
    return PathScores(logprob, num_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


def cut_after_answer_line(text: str) -> tuple[str, bool]:
    """``(text up to the end of its first answer line, without the newline; whether one was complete)``."""
    m = ANSWER_LINE_DONE_RE.search(text)
    return (text[: m.end() - 1], True) if m else (text, False)


class AnswerLineStop:
    """A batched ``StoppingCriteria``: a row is done once its generated text holds a complete ``Answer: ...`` line.

    Only rows whose newest token contains a newline are decoded again, so the check costs little per step.
    """

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.done: torch.Tensor | None = None
        self._has_newline: dict[int, bool] = {}

    def _newline(self, token: int) -> bool:
        if token not in self._has_newline:
            self._has_newline[token] = "\n" in self.tokenizer.decode([token])
        return self._has_newline[token]

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        B = input_ids.shape[0]
        if self.done is None or len(self.done) != B:
            self.done = torch.zeros(B, dtype=torch.bool)
        if input_ids.shape[1] > self.prompt_width:
            last = input_ids[:, -1].tolist()
            check = [b for b in range(B) if not self.done[b] and self._newline(last[b])]
            if check:
                texts = self.tokenizer.batch_decode(input_ids[check, self.prompt_width:], skip_special_tokens=True)
                for b, t in zip(check, texts):
                    if ANSWER_LINE_DONE_RE.search(t):
                        self.done[b] = True
        return self.done.to(input_ids.device)


def _stopping_criteria(tokenizer, prompt_width: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(AnswerLineStop, StoppingCriteria):
        pass

    return StoppingCriteriaList([_Stop(tokenizer, prompt_width)])


MERGE_COPY_BYTES = 256 * 2**20  # sample_paths merges a LoRA model (auto) only when its weights' copy is this small


def _generation_model(model, merge: bool):
    """The model ``generate`` runs on: with ``merge``, a LoRA model is folded into a merged copy (base weights plus
    adapter, one matmul per layer instead of three); the trained model itself is never touched."""
    if not (merge and hasattr(model, "merge_and_unload")):
        return model
    try:
        return copy.deepcopy(model).merge_and_unload()
    except Exception as e:  # an adapter type peft cannot merge: sample through the adapter
        logger.debug("sample_paths: not merging the adapter (%s)", e)
        return model


def sample_paths(model, tokenizer, prompts: list[str], *, num_paths: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 32,
                 merge_lora: bool | None = None, static_cache: bool | None = None) -> list[list[str]]:
    """``num_paths`` generated paths per prompt, ``[prompt][path]``.

    Each path is decoded without special tokens and cut after its first complete ``Answer: ...`` line (the newline
    dropped); generation of a row stops there, at eos, or after ``max_new_tokens``. ``temperature == 0`` is greedy
    decoding (the ``num_paths`` paths are then identical); otherwise plain sampling with ``temperature`` and nucleus
    ``top_p`` (no top-k). Nothing of the model's own ``generation_config`` applies but its eos token ids. Prompts are tokenised without special tokens, left-padded, and generated
    ``batch_size // num_paths`` prompts at a time (at least one). The same arguments give the same paths; the global
    torch RNG is left as it was.

    Two speed-ups, on by default on a CPU (``None``) and off elsewhere: ``merge_lora`` samples a LoRA model through a
    merged copy of it (auto: only if its weights take at most ``MERGE_COPY_BYTES``, as the copy is made per call),
    and ``static_cache`` preallocates the KV cache instead of growing it by concatenation each step. On the default
    tiny LLM (CPU, 96 prompts, greedy) they cut sampling time by about a quarter; the paths can differ from the
    unmerged/dynamic ones only where float rounding flips a sampled token.
    """
    from transformers import GenerationConfig

    if num_paths < 1:
        raise ValueError(f"sample_paths: num_paths must be >= 1, found {num_paths}")
    if isinstance(prompts, str):
        raise TypeError("sample_paths: prompts must be a list of strings, not one string (wrap it: [prompt])")
    if not prompts:
        return []
    greedy = temperature == 0
    copies = 1 if greedy else num_paths
    per_call = max(1, batch_size // copies)
    dev = _device(model)
    cpu = dev.type == "cpu"
    static = cpu if static_cache is None else static_cache
    pad = _pad_id(tokenizer)
    eos = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else ({gen_eos} if gen_eos is not None else set())
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, num_return_sequences=copies,
        temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None if greedy else 0,
        pad_token_id=pad, eos_token_id=sorted(eos), bos_token_id=tokenizer.bos_token_id,
        cache_implementation="static" if static else None,
    )
    prompt_ids = _ids(tokenizer, prompts)
    for p in prompt_ids:
        if not p:
            raise DataError("sample_paths: empty prompt")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
    results: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    if merge_lora is None:  # auto: on a CPU, when a copy of the weights is cheap
        merge_lora = cpu and sum(p.numel() * p.element_size() for p in model.parameters()) <= MERGE_COPY_BYTES
    gen = _generation_model(model, merge_lora)
    owner = gen.get_base_model() if hasattr(gen, "get_base_model") else gen  # the module generate() runs on
    cuda = [dev] if dev.type == "cuda" else []
    # generate() fills every setting left None from the model's own generation_config (a checkpoint's
    # generation_config.json: repetition_penalty, top_k, no_repeat_ngram_size, min_new_tokens, ...): only the
    # settings above may apply, so the model's is swapped for a neutral one while sampling
    model_gc, owner.generation_config = owner.generation_config, GenerationConfig()
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(seed)
            for k in range(0, len(order), per_call):
                chunk = order[k: k + per_call]
                ids, mask = _left_pad([prompt_ids[i] for i in chunk], pad)
                W = ids.shape[1]
                if static and "_previous_max_cache_length" in vars(owner):
                    del owner._previous_max_cache_length  # size each cache by its own call: no history in the numbers
                out = gen.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config,
                                     stopping_criteria=_stopping_criteria(tokenizer, W))
                texts = tokenizer.batch_decode(out[:, W:], skip_special_tokens=True)
                for j, i in enumerate(chunk):
                    got = [cut_after_answer_line(t)[0] for t in texts[j * copies: (j + 1) * copies]]
                    results[i] = got * num_paths if greedy else got
    finally:
        owner.generation_config = model_gc
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Question features


def question_embeddings(model, tokenizer, questions: list[str], *, batch_size: int = 64,
                        max_length: int = 512) -> np.ndarray:
    """Mean of the model's last hidden state (after the final norm) over each text's tokens, (N, hidden) float32.

    Texts are tokenised without special tokens and cut to ``max_length`` tokens; an empty text gives a zero row.
    Batched with right padding, so a row does not depend on the others in its batch.
    """
    ids = [x[:max_length] for x in _ids(tokenizer, questions)]
    base = _base(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    hidden = base.config.hidden_size
    out = np.zeros((len(ids), hidden), dtype=np.float32)
    dev = _device(model)
    pad = _pad_id(tokenizer)
    nonempty = [i for i in range(len(ids)) if ids[i]]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _plain_batches(nonempty, [len(x) for x in ids], batch_size):
                T = max(len(ids[i]) for i in batch)
                x = torch.full((len(batch), T), pad, dtype=torch.long)
                m = torch.zeros((len(batch), T), dtype=torch.long)
                for b, i in enumerate(batch):
                    x[b, : len(ids[i])] = torch.tensor(ids[i])
                    m[b, : len(ids[i])] = 1
                x, m = x.to(dev), m.to(dev)
                if decoder is not None:
                    h = decoder(input_ids=x, attention_mask=m).last_hidden_state
                else:
                    h = model(input_ids=x, attention_mask=m, output_hidden_states=True).hidden_states[-1]
                mf = m.unsqueeze(-1).float()
                out[batch] = ((h.float() * mf).sum(1) / mf.sum(1)).cpu().numpy()
    finally:
        model.train(was_training)
    return out
