"""Loss functions of LaDa's domain-adaptive reasoning distillation, as pure functions over tensors.

Implements (LADA.md, "Domain-adaptive reasoning distillation"):

* ``sequence_logprobs`` -- a path's log joint probability log pi(y|x) = sum_j log pi(y_j | x, y_<j).
* ``sft_loss`` -- token-level negative log-likelihood, summed over valid tokens and divided by a *global* token count
  (STYLE.md point 7), so that micro-batching x gradient accumulation does not change the gradient.
* ``contrastive_path_loss`` -- the DPO-like pairwise loss over paths' log joint probabilities,
  L_DA = -log sigmoid(beta * [(log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))]).
* ``listwise_path_loss`` -- the listwise variant KL(q || p) between length-normalised softmaxes over M paths.

Shape legend: B batch (rows), T tokens, V vocabulary, M paths per question.

Alignment convention (the same as ``fedlada.paths.collate``): the functions never shift. ``logits[b, t]`` is the
distribution that predicts ``labels[b, t]``, and ``mask[b, t]`` says whether that prediction is scored. With a causal LM
run on ``input_ids`` this means ``labels[:, t] = input_ids[:, t + 1]`` (the last column is unused) and ``mask`` is the
``loss_mask`` of ``collate``, which marks the positions whose *next* token is a path token. ``labels`` may hold any
value (e.g. a pad id) where ``mask`` is 0; a negative label (-100, Hugging Face's ignore index) is never scored.

Departures from the paper / choices of ours:

* ``mask`` may be a float tensor of per-token weights (``train`` uses it for per-example weights); a 0 excludes the
  position. The default token count of ``sft_loss`` is the number of non-zero mask entries, not the sum of weights,
  so a weight acts as a plain multiplier on an example's loss.
* ``listwise_path_loss`` normalises teacher and student log joint probabilities by the same ``lengths`` (the
  student's path token counts; the teacher's own tokenisation is not known to the student). Rows with fewer than
  two valid paths carry no ranking information: they contribute 0 and are left out of the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")
# Fill for masked-out entries of the listwise softmax: finite, so no NaN reaches the backward pass, and far below
# any real length-normalised log-probability.
_MASKED = -1e9


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_shapes(fn: str, ndim: int, **tensors: torch.Tensor) -> None:
    """The inputs of a path loss must have one shape: broadcasting (B,1) against (B,) would silently give (B,B)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != ndim or any(s != first for s in shapes.values()):
        dims = "(B,)" if ndim == 1 else "(B,M)"
        raise ValueError(f"{fn}: expected tensors of one shape {dims}, got "
                         + ", ".join(f"{name} {list(s)}" for name, s in shapes.items()))


def _check_tokens(fn: str, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
    """logits (B,T,V), labels and mask (B,T): a (B,1) or (T,) mask would broadcast and score every position."""
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]) or tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(f"{fn}: expected logits (B,T,V) with labels and mask (B,T), got logits {list(logits.shape)}, "
                         f"labels {list(labels.shape)}, mask {list(mask.shape)}")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position log pi(labels[b, t]) under ``logits[b, t]`` (computed in float32), 0 where ``mask`` is 0.

    logits (B,T,V), labels (B,T) int, mask (B,T) bool or float -> (B,T) float32 (other shapes: ValueError). The mask
    is *not* multiplied in as a weight here; it only zeroes excluded positions (whose labels may be out of range).
    A negative label (-100, the Hugging Face ignore index) is excluded like a 0 in the mask.
    """
    _check_tokens("token_logprobs", logits, labels, mask)
    keep = (mask != 0) & (labels >= 0)
    safe_labels = labels.masked_fill(~keep, 0)
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * T, V), safe_labels.reshape(B * T), reduction="none")
    return (-nll.view(B, T)).masked_fill(~keep, 0.0)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log joint probability of each row's scored tokens: sum_t mask[b,t] * log pi(labels[b,t]).

    logits (B,T,V), labels (B,T), mask (B,T) -> (B,) float32. No shift is applied (see the module docstring).
    A float mask weights the positions; a bool/int mask selects them; negative labels are excluded.
    """
    return (token_logprobs(logits, labels, mask) * mask.float()).sum(dim=-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *,
             num_tokens: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Token NLL summed over valid positions and divided by ``num_tokens`` -> () float32.

    ``num_tokens`` is the *global* count of valid tokens over every micro-batch that makes one optimizer step; pass it
    when accumulating gradients so that the sum of the micro-batch gradients equals the one-big-batch gradient (a
    number must be > 0). By default it is this batch's count of valid positions (a non-zero mask and a label >= 0;
    at least 1, so an empty mask gives 0, not NaN).
    """
    if isinstance(num_tokens, (int, float)) and not num_tokens > 0:  # NaN too; a tensor is not synced to check
        raise ValueError(f"sft_loss: num_tokens must be > 0, got {num_tokens!r}")
    nll_sum = -(token_logprobs(logits, labels, mask) * mask.float()).sum()
    if num_tokens is None:
        num_tokens = ((mask != 0) & (labels >= 0)).sum().clamp(min=1)
    return nll_sum / num_tokens


def contrastive_path_loss(pol_chosen: torch.Tensor, pol_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                          ref_rejected: torch.Tensor, *, beta: float, reduction: str = "mean") -> torch.Tensor:
    """DPO-like loss over paths' log joint probabilities, all inputs (B,).

    loss_b = -log sigmoid(beta * [(pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)]).
    reduction: "mean" -> () (0 for B = 0), "sum" -> (), "none" -> (B,). The reference values are treated as
    constants (detached). When policy == reference every pair costs log 2.
    """
    _check_reduction(reduction)
    if not beta > 0:  # NaN too
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_shapes("contrastive_path_loss", 1, pol_chosen=pol_chosen, pol_rejected=pol_rejected,
                  ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    margin = (pol_chosen - ref_chosen.detach()) - (pol_rejected - ref_rejected.detach())
    losses = -F.logsigmoid(beta * margin.float())
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / max(losses.numel(), 1)


def listwise_path_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, lengths: torch.Tensor,
                       valid: torch.Tensor, *, tau: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """KL(q || p) between the teacher's and the student's distribution over each row's valid paths.

    All inputs (B,M): log joint probabilities of the student (differentiable) and the teacher (constant), path lengths
    in tokens (clamped to >= 1) and a bool mask of valid paths (e.g. answer-correct ones). Per row,
    q = softmax_valid(teacher_logp / (tau * lengths)), p = softmax_valid(student_logp / (tau * lengths)).
    Invalid paths are removed from both distributions, so their values never matter. Rows with fewer than 2 valid
    paths contribute 0. reduction: "mean" averages over the rows with >= 2 valid paths (0 if there are none),
    "sum" sums over rows, "none" returns (B,).
    """
    _check_reduction(reduction)
    if not tau > 0:  # NaN too
        raise ValueError(f"tau must be > 0, got {tau}")
    _check_shapes("listwise_path_loss", 2, student_logp=student_logp, teacher_logp=teacher_logp, lengths=lengths,
                  valid=valid)
    valid = valid.bool()
    scale = tau * lengths.float().clamp(min=1.0)
    s = (student_logp.float() / scale).masked_fill(~valid, _MASKED)
    t = (teacher_logp.detach().float() / scale).masked_fill(~valid, _MASKED)
    log_p = F.log_softmax(s, dim=-1)
    log_q = F.log_softmax(t, dim=-1)
    q = log_q.exp()
    # q = 0 (a valid path the teacher gives log-probability -inf) contributes 0, not 0 * inf; a NaN stays NaN
    kl_terms = torch.where(valid & (q != 0), q * (log_q - log_p), torch.zeros_like(log_p))
    eligible = valid.sum(dim=-1) >= 2
    per_row = torch.where(eligible, kl_terms.sum(dim=-1), kl_terms.new_zeros(kl_terms.shape[0]))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / eligible.sum().clamp(min=1)
