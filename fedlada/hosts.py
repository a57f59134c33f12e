"""The host frameworks LaDa plugs into: their math as pure functions, and what they put on the wire.

LADA.md ("Host frameworks LaDa plugs into") names FedMKT-style collaboration; we provide two hosts, each after its
FATE-LLM implementation (``fate_llm/algo/fedmkt``, ``fate_llm/algo/fedcollm``):

* **FedMKT-like** (Fan et al., arXiv 2406.02224). Each side runs its model on public texts, keeps the top-k logits
  of every token position (values + vocabulary indices) and the text's per-token cross-entropy, and sends them.
  The receiver distils token by token from a per-sample target chosen by FedMKT's "greater" rule, which picks the
  distribution with the largest reward 1/exp(CE), i.e. the **lowest cross-entropy**: :func:`choose_targets`.
  Here "CE" of a side on a sample is that side's per-token NLL of the sample's path tokens (eos included) under its
  *full* next-token distribution, computed without gradient before the KD step -- exactly FATE-LLM's
  ``Metric.cal_ce`` -- so "the other side wins" means ``ce_other < ce_receiver``. The losing target is the
  receiver's own top-k distribution, detached (FATE-LLM's ``SELF_TARGET_DIST``). Ties and non-finite values keep
  the receiver's own target.
* **FedCoLLM-like** (Fan et al., arXiv 2411.11707). Clients send their trainable weights (the SLMs' LoRA adapters;
  every weight when an SLM is fully fine-tuned); the server averages them weighted by the clients' train sizes
  (:func:`fedavg`, FATE-LLM's ``weighted_mean`` with ``sample_num = len(train_set)``), distils mutually between the
  LLM and the aggregated SLM on public texts, and sends the aggregated weights back.

Both distil with :func:`topk_kd_loss`. Shape legend: N scored token positions (rows of all paths of a batch
concatenated), V vocabulary, k kept logits per position.

Departures [ours]:

* KD loss: KL(q || p) of the temperature-softened, top-k-renormalised teacher distribution q against the student's
  log-softmax over the same k indices (``student_support="topk"``, the default), times T^2 (Hinton) so the
  temperature does not change the gradient scale. FATE-LLM's FedMKT uses the soft cross-entropy against the
  student's full-vocabulary log-softmax and softens the teacher only; ``student_support="full"`` takes the full
  log-softmax (its gradient also pushes mass off tokens outside the teacher's top k). KL and soft cross-entropy
  differ by the teacher's entropy, a constant, so their gradients agree.
* Wire format: a safetensors blob (no pickle; a malformed one raises :class:`~fedlada.messages.MessageError`) with
  fp16 logit values and uint16 indices when the vocabulary allows (int32 otherwise). FATE-LLM ships Python lists.
* Token alignment across different tokenizers (FedMKT's minimum-edit-distance alignment) is not implemented: both
  hosts need the LLM and the SLMs to share one tokenizer (:func:`tokenizer_fingerprint` detects a mismatch at run
  time; ``fedlada.host_rounds.check_host_config`` refuses it up front). LaDa alone exchanges text and works with
  any tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedlada.messages import MessageError

PAYLOAD_FORMAT = "fedlada-host"
PAYLOAD_VERSION = "1"
_MAX_HEADER = 1 << 24  # a safetensors JSON header longer than this is not ours


# ----------------------------------------------------------------------------------------------------- the math


def topk_kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor, *,
                 temperature: float = 1.0, student_support: str = "topk", weights: torch.Tensor | None = None,
                 num_tokens: float | None = None) -> torch.Tensor:
    """Token-level KD from top-k teacher logits -> () float32.

    student_logits (N,V) differentiable; teacher_values (N,k) logits (any float dtype; constant); teacher_indices
    (N,k) vocabulary ids; weights (N,) per-position multipliers (0 drops a position). Per position,
    q = softmax(teacher_values / T) and log p = log_softmax(student_logits[indices] / T) ("topk") or
    log_softmax(student_logits / T)[indices] ("full"); the term is T^2 * sum_j q_j (log q_j - log p_j).
    Returns the weighted sum divided by ``num_tokens`` (default: the number of positions with a non-zero weight,
    at least 1), so micro-batches normalised by a step-global count add up to the whole-batch loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_support not in ("topk", "full"):
        raise ValueError(f"student_support must be 'topk' or 'full', got {student_support!r}")
    if teacher_values.shape != teacher_indices.shape or teacher_values.shape[0] != student_logits.shape[0]:
        raise ValueError(f"shapes: student {tuple(student_logits.shape)}, teacher values "
                         f"{tuple(teacher_values.shape)}, indices {tuple(teacher_indices.shape)}")
    idx = teacher_indices.long()
    s = student_logits.float() / temperature
    if student_support == "topk":
        log_p = F.log_softmax(s.gather(-1, idx), dim=-1)
    else:
        log_p = F.log_softmax(s, dim=-1).gather(-1, idx)
    log_q = F.log_softmax(teacher_values.detach().float() / temperature, dim=-1)
    per_pos = (log_q.exp() * (log_q - log_p)).sum(-1) * temperature ** 2  # (N,)
    w = torch.ones_like(per_pos) if weights is None else weights.float()
    if num_tokens is None:
        num_tokens = max(int((w != 0).sum()), 1)
    return (per_pos * w).sum() / num_tokens


def choose_targets(other_ce: np.ndarray, own_ce: np.ndarray) -> np.ndarray:
    """FedMKT's min-CE rule per sample: True where the other side's target wins (its CE is strictly lower).

    other_ce, own_ce (B,) per-token cross-entropies of the same path tokens -> (B,) bool. NaN or inf on either
    side keeps the receiver's own target (the rule must not follow a value it cannot compare).
    """
    other, own = np.asarray(other_ce, float), np.asarray(own_ce, float)
    if other.shape != own.shape:
        raise ValueError(f"choose_targets: shapes {other.shape} and {own.shape} differ")
    ok = np.isfinite(other) & np.isfinite(own)
    return ok & (np.where(ok, other, 0.0) < np.where(ok, own, 0.0))


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts: sum_i w_i * s_i / sum_i w_i, key by key.

    Every state must have the same keys and shapes (ValueError naming the first difference otherwise); weights
    must be finite, >= 0 and not all 0. Computed in float64, returned in each tensor's dtype from ``states[0]``.
    """
    if not states:
        raise ValueError("fedavg: no states to average")
    if len(weights) != len(states):
        raise ValueError(f"fedavg: {len(states)} states but {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"fedavg: weights must be finite, >= 0 and not all 0, found {w}")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            diff = sorted(set(s) ^ keys)
            raise ValueError(f"fedavg: state {i} has different keys than state 0 (e.g. {diff[:3]})")
        for k in keys:
            if tuple(s[k].shape) != tuple(states[0][k].shape):
                raise ValueError(f"fedavg: '{k}' has shape {tuple(s[k].shape)} in state {i} but "
                                 f"{tuple(states[0][k].shape)} in state 0")
    total = sum(w)
    return {k: (sum(wi * s[k].detach().double() for wi, s in zip(w, states)) / total).to(states[0][k].dtype)
            for k in states[0]}


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id): equal fingerprints mean token ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the wire


@dataclass(frozen=True)
class TopK:
    """One path's per-token top-k logits: ``values`` (T,k) float16, ``indices`` (T,k) ids, T = scored tokens of the
    path (eos included); ``ce`` the sender's per-token cross-entropy of the path; ``path_index`` the path's index
    in the message's ``paths``."""

    path_index: int
    ce: float
    values: np.ndarray
    indices: np.ndarray


def _pack(tensors: dict[str, np.ndarray], kind: str, meta: dict) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata={"format": PAYLOAD_FORMAT, "version": PAYLOAD_VERSION, "kind": kind,
                                   "meta": json.dumps(meta, sort_keys=True)})


def _unpack(data: bytes, kind: str, where: str) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load

    if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
        raise MessageError(f"{where}: host payload is not a safetensors blob ({len(data or b'')} bytes)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > min(_MAX_HEADER, len(data) - 8):
        raise MessageError(f"{where}: host payload header length {n} does not fit its {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
        md = header.get("__metadata__") or {}
        meta = json.loads(md.get("meta", "{}"))
        tensors = load(bytes(data))
    except Exception as e:  # noqa: BLE001 - any parse failure of foreign bytes is a malformed message
        raise MessageError(f"{where}: host payload is not a valid safetensors blob ({type(e).__name__}: {e})") \
            from None
    if md.get("format") != PAYLOAD_FORMAT or md.get("version") != PAYLOAD_VERSION:
        raise MessageError(f"{where}: host payload format {md.get('format')!r} version {md.get('version')!r}, "
                           f"expected {PAYLOAD_FORMAT!r} version {PAYLOAD_VERSION}")
    if md.get("kind") != kind:
        raise MessageError(f"{where}: expected a '{kind}' host payload, found {md.get('kind')!r}")
    if not isinstance(meta, dict):
        raise MessageError(f"{where}: host payload metadata must be a JSON object")
    return tensors, meta


def encode_topk(entries: Sequence[TopK], *, k: int, meta: dict | None = None) -> bytes:
    """Pack top-k entries (each (T_i,k)) into one payload; indices as uint16 when they fit, else int32."""
    entries = list(entries)
    for e in entries:
        if e.values.shape != e.indices.shape or e.values.ndim != 2 or e.values.shape[1] != k or e.values.shape[0] < 1:
            raise ValueError(f"encode_topk: entry {e.path_index} has values {e.values.shape} and indices "
                             f"{e.indices.shape}, expected (T>=1, {k})")
    values = np.concatenate([e.values for e in entries]).astype(np.float16) if entries else \
        np.zeros((0, k), np.float16)
    indices = np.concatenate([e.indices for e in entries]) if entries else np.zeros((0, k), np.int64)
    idx_dtype = np.uint16 if indices.size == 0 or int(indices.max()) < 2 ** 16 else np.int32
    tensors = {"values": values, "indices": indices.astype(idx_dtype),
               "lengths": np.array([e.values.shape[0] for e in entries], np.int32),
               "path_index": np.array([e.path_index for e in entries], np.int32),
               "ce": np.array([e.ce for e in entries], np.float32)}
    return _pack(tensors, "topk", {**(meta or {}), "k": k})


def decode_topk(data: bytes, *, where: str = "message") -> tuple[list[TopK], dict]:
    """Unpack and validate a top-k payload -> (entries, metadata). Anything inconsistent raises MessageError."""
    t, meta = _unpack(data, "topk", where)
    need = {"values", "indices", "lengths", "path_index", "ce"}
    if set(t) != need:
        raise MessageError(f"{where}: top-k payload holds {sorted(t)}, expected {sorted(need)}")
    k = meta.get("k")
    v, ix, lens, pidx, ce = (t[n] for n in ("values", "indices", "lengths", "path_index", "ce"))
    if not isinstance(k, int) or k < 1 or v.ndim != 2 or v.shape != ix.shape or v.shape[1] != k:
        raise MessageError(f"{where}: top-k payload values {v.shape} / indices {ix.shape} do not match k={k!r}")
    if v.dtype != np.float16 or ix.dtype not in (np.uint16, np.int32):
        raise MessageError(f"{where}: top-k payload dtypes {v.dtype}/{ix.dtype}, expected float16/uint16|int32")
    n = len(lens)
    if lens.ndim != 1 or pidx.shape != (n,) or ce.shape != (n,) or (n and lens.min() < 1) or int(lens.sum()) != len(v):
        raise MessageError(f"{where}: top-k payload lengths (sum {int(lens.sum())}) do not add up to its "
                           f"{len(v)} token rows, or per-entry arrays differ in length")
    if not np.all(np.isfinite(v)) or not np.all(np.isfinite(ce)) or (n and (ce.min() < 0 or pidx.min() < 0)) \
            or (ix.size and int(ix.min()) < 0):
        raise MessageError(f"{where}: top-k payload has non-finite values, negative cross-entropies or indices")
    bounds = np.concatenate([[0], np.cumsum(lens)])
    entries = [TopK(int(pidx[i]), float(ce[i]), v[bounds[i]:bounds[i + 1]],
                    ix[bounds[i]:bounds[i + 1]].astype(np.int64)) for i in range(n)]
    return entries, meta


def encode_state(state: dict[str, torch.Tensor], *, dtype: str = "float32", meta: dict | None = None) -> bytes:
    """Pack a state dict of floating tensors (e.g. LoRA adapters) as ``dtype`` (float32 | float16)."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"encode_state: dtype must be 'float32' or 'float16', got {dtype!r}")
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    tensors = {k: v.detach().cpu().float().numpy().astype(np_dtype) for k, v in state.items()}
    return _pack(tensors, "state", {**(meta or {}), "dtype": dtype})


def decode_state(data: bytes, *, where: str = "message") -> tuple[dict[str, torch.Tensor], dict]:
    """Unpack a state payload -> (float32 tensors by name, metadata); non-finite weights raise MessageError."""
    t, meta = _unpack(data, "state", where)
    out = {}
    for k, a in t.items():
        if a.dtype not in (np.float32, np.float16) or not np.all(np.isfinite(a)):
            raise MessageError(f"{where}: weight '{k}' is {a.dtype} or holds non-finite values")
        out[k] = torch.from_numpy(a.astype(np.float32))
    return out, meta
