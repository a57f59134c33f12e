"""fedlada.losses: hand-computed values, masking, gradient signs and the accumulation invariance."""

import math

import pytest
import torch
from torch.testing import assert_close

from fedlada.losses import (
    contrastive_path_loss,
    listwise_path_loss,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---- sequence_logprobs / sft_loss ----------------------------------------------------------------------------------

def _two_class_logits():
    # every position predicts p(1) = 3/4, p(0) = 1/4
    logits = torch.zeros(1, 3, 2)
    logits[..., 1] = math.log(3.0)
    return logits


def test_sequence_logprobs_hand_value_and_no_shift():
    logits = _two_class_logits()
    labels = torch.tensor([[1, 0, 7]])  # 7 is out of range but masked out
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    expected = math.log(3 / 4) + math.log(1 / 4)
    assert_close(sequence_logprobs(logits, labels, mask), t(expected))


def test_sequence_logprobs_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    ref = (logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * mask).sum(-1)
    assert_close(sequence_logprobs(logits, labels, mask), ref)


def test_sft_loss_hand_value_and_global_count():
    logits = _two_class_logits()
    labels = torch.tensor([[1, 0, -100]])
    mask = torch.tensor([[1, 1, 0]])
    nll_sum = math.log(4 / 3) + math.log(4)
    assert_close(sft_loss(logits, labels, mask), torch.tensor(nll_sum / 2))
    assert_close(sft_loss(logits, labels, mask, num_tokens=4), torch.tensor(nll_sum / 4))


def test_sft_loss_ignores_masked_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    changed = logits.clone()
    changed[~mask] = 100 * torch.randn(int((~mask).sum()), 9, generator=g)
    changed_labels = labels.masked_fill(~mask, 3)
    assert_close(sft_loss(logits, labels, mask), sft_loss(changed, changed_labels, mask))


def test_sft_loss_empty_mask_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = sft_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_float_mask_weights_tokens_but_count_stays_unweighted():
    logits = _two_class_logits()
    labels = torch.tensor([[1, 0, 0]])
    weights = torch.tensor([[0.5, 2.0, 0.0]])
    expected = (0.5 * math.log(4 / 3) + 2.0 * math.log(4)) / 2
    assert_close(sft_loss(logits, labels, weights), torch.tensor(expected))


def test_accumulation_invariance_sft():
    """Gradient of one batch of 8 == sum of the gradients of 4 micro-batches of 2 using the global token count."""
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 8, 7, 5, 13
    x = torch.randn(B, T, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 1, 3, 6, 2, 5, 4, 7])  # ragged on purpose: a per-batch mean would differ
    mask = torch.arange(T)[None, :] < lengths[:, None]
    w0 = torch.randn(H, V, generator=g)

    w_full = w0.clone().requires_grad_(True)
    sft_loss(x @ w_full, labels, mask).backward()

    w_acc = w0.clone().requires_grad_(True)
    total = int(mask.sum())
    for i in range(0, B, 2):
        sft_loss(x[i:i + 2] @ w_acc, labels[i:i + 2], mask[i:i + 2], num_tokens=total).backward()
    assert_close(w_acc.grad, w_full.grad)

    # the per-micro-batch mean (no global count) is NOT invariant here, which is why the count exists
    w_bad = w0.clone().requires_grad_(True)
    for i in range(0, B, 2):
        (sft_loss(x[i:i + 2] @ w_bad, labels[i:i + 2], mask[i:i + 2]) / 4).backward()
    assert not torch.allclose(w_bad.grad, w_full.grad)


def test_accumulation_invariance_pairwise_with_sum_over_global_count():
    g = torch.Generator().manual_seed(3)
    pc0, pr0, rc, rr = (torch.randn(8, generator=g) for _ in range(4))
    full_c, full_r = pc0.clone().requires_grad_(True), pr0.clone().requires_grad_(True)
    contrastive_path_loss(full_c, full_r, rc, rr, beta=0.3).backward()
    acc_c, acc_r = pc0.clone().requires_grad_(True), pr0.clone().requires_grad_(True)
    for i in range(0, 8, 2):
        s = slice(i, i + 2)
        (contrastive_path_loss(acc_c[s], acc_r[s], rc[s], rr[s], beta=0.3, reduction="sum") / 8).backward()
    assert_close(acc_c.grad, full_c.grad)
    assert_close(acc_r.grad, full_r.grad)


# ---- contrastive_path_loss -------------------------------------------------------------------------------------------

def test_pairwise_policy_equals_reference_is_log2():
    pol_c, pol_r = t(-5.0, -12.0, -0.3), t(-7.0, -1.0, -9.9)
    loss = contrastive_path_loss(pol_c, pol_r, pol_c.clone(), pol_r.clone(), beta=0.1)
    assert_close(loss, torch.tensor(math.log(2)))


def test_pairwise_hand_values():
    # margin = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    assert_close(contrastive_path_loss(*args, beta=1.0), torch.tensor(math.log1p(math.exp(-2.0))))  # 0.126928
    assert_close(contrastive_path_loss(*args, beta=0.5), torch.tensor(math.log1p(math.exp(-1.0))))  # 0.313262
    # a negative margin costs more than log 2
    swapped = contrastive_path_loss(t(-3.0), t(-1.0), t(-2.0), t(-2.0), beta=1.0)
    assert_close(swapped, torch.tensor(math.log1p(math.exp(2.0))))  # 2.126928


def test_pairwise_reductions():
    pc, pr, rc, rr = t(-1.0, -3.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0)
    per = contrastive_path_loss(pc, pr, rc, rr, beta=1.0, reduction="none")
    assert_close(per, t(math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))))
    assert_close(contrastive_path_loss(pc, pr, rc, rr, beta=1.0, reduction="sum"), per.sum())
    assert_close(contrastive_path_loss(pc, pr, rc, rr, beta=1.0, reduction="mean"), per.mean())
    empty = torch.zeros(0)
    assert contrastive_path_loss(empty, empty, empty, empty, beta=0.1).item() == 0.0
    with pytest.raises(ValueError):
        contrastive_path_loss(pc, pr, rc, rr, beta=1.0, reduction="avg")
    with pytest.raises(ValueError):
        contrastive_path_loss(pc, pr, rc, rr, beta=0.0)


def test_pairwise_gradient_signs_and_values():
    pc = torch.zeros(1, requires_grad=True)
    pr = torch.zeros(1, requires_grad=True)
    rc = torch.zeros(1, requires_grad=True)
    contrastive_path_loss(pc, pr, rc, torch.zeros(1), beta=0.1).backward()
    # d/d pol_chosen = -beta * sigmoid(-beta * margin) = -0.1 * 0.5 at margin 0
    assert_close(pc.grad, t(-0.05))
    assert_close(pr.grad, t(0.05))
    assert rc.grad is None or torch.count_nonzero(rc.grad) == 0  # the reference is a constant
    # a gradient-descent step raises chosen and lowers rejected
    assert (pc - pc.grad).item() > 0 and (pr - pr.grad).item() < 0


def test_pairwise_beta_scaling():
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (torch.randn(5, generator=g) for _ in range(4))
    margin = (pc - rc) - (pr - rr)
    for beta in (0.05, 0.5, 3.0):
        got = contrastive_path_loss(pc, pr, rc, rr, beta=beta, reduction="none")
        same = contrastive_path_loss(beta * margin, torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=1.0,
                                     reduction="none")
        assert_close(got, same)


# ---- listwise_path_loss ----------------------------------------------------------------------------------------------

HAND_KL = 0.5 * (math.log(0.25) + 2.0 + 2.0 * math.log1p(math.exp(-2.0)))  # 0.433781


def test_listwise_hand_two_paths():
    # teacher / (tau * len) = [-2, -2] -> q = [.5, .5]; student / len = [-1, -3] -> p = softmax = [.8808, .1192]
    loss = listwise_path_loss(t(-1.0, -6.0)[None], t(-2.0, -4.0)[None], t(1.0, 2.0)[None],
                              torch.tensor([[True, True]]))
    assert_close(loss, torch.tensor(HAND_KL))
    assert abs(HAND_KL - 0.433781) < 1e-6


def test_listwise_tau_divides_before_softmax():
    # tau = 2 halves every normalised value: q stays uniform, p = softmax([-0.5, -1.5])
    loss = listwise_path_loss(t(-1.0, -6.0)[None], t(-2.0, -4.0)[None], t(1.0, 2.0)[None],
                              torch.tensor([[True, True]]), tau=2.0)
    expected = 0.5 * (math.log(0.25) + 1.0 + 2.0 * math.log1p(math.exp(-1.0)))
    assert_close(loss, torch.tensor(expected))


def test_listwise_invalid_path_values_do_not_matter():
    valid = torch.tensor([[True, False, True]])
    base = listwise_path_loss(t(-1.0, 0.0, -6.0)[None], t(-2.0, 0.0, -4.0)[None], t(1.0, 1.0, 2.0)[None], valid)
    assert_close(base, torch.tensor(HAND_KL))
    for junk in (-1e6, 50.0, -3.0):
        other = listwise_path_loss(t(-1.0, junk, -6.0)[None], t(-2.0, -junk, -4.0)[None], t(1.0, 9.0, 2.0)[None],
                                   valid)
        assert_close(other, base)


def test_listwise_rows_with_fewer_than_two_valid_paths_are_left_out():
    student = torch.tensor([[-1.0, -6.0], [-3.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-2.0, -4.0], [-1.0, -9.0], [-5.0, -1.0]])
    lengths = torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    loss = listwise_path_loss(student, teacher, lengths, valid)
    assert_close(loss, torch.tensor(HAND_KL))  # mean over the one eligible row
    per_row = listwise_path_loss(student, teacher, lengths, valid, reduction="none")
    assert_close(per_row, t(HAND_KL, 0.0, 0.0))
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.count_nonzero(student.grad[1:]) == 0
    none_eligible = listwise_path_loss(student[1:], teacher[1:], lengths[1:], valid[1:])
    assert none_eligible.item() == 0.0


def test_listwise_identical_is_zero_and_kl_nonnegative():
    g = torch.Generator().manual_seed(5)
    logp = -10 * torch.rand(6, 4, generator=g)
    lengths = torch.randint(1, 20, (6, 4), generator=g).float()
    valid = torch.rand(6, 4, generator=g) > 0.3
    valid[:, :2] = True
    assert_close(listwise_path_loss(logp, logp.clone(), lengths, valid), torch.tensor(0.0))
    for _ in range(5):
        student = -10 * torch.rand(6, 4, generator=g)
        per_row = listwise_path_loss(student, logp, lengths, valid, reduction="none")
        assert (per_row >= -1e-6).all()
        assert per_row.sum() > 0


def test_listwise_gradient_moves_student_toward_teacher():
    student = torch.tensor([[-1.0, -6.0]], requires_grad=True)
    listwise_path_loss(student, t(-2.0, -4.0)[None], t(1.0, 2.0)[None], torch.tensor([[True, True]])).backward()
    # the student over-weights path 0 relative to the uniform teacher: descent lowers path 0 and raises path 1
    assert student.grad[0, 0] > 0 and student.grad[0, 1] < 0


def test_token_logprobs_zero_at_masked_positions():
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([[0, 1, -100], [-100, 2, 3]])
    mask = labels != -100
    out = token_logprobs(logits, labels, mask)
    assert (out[~mask] == 0).all() and (out[mask] < 0).all()


def test_listwise_a_valid_path_the_teacher_rules_out_counts_zero_not_nan():
    student = torch.tensor([[-3.0, -4.0, -5.0]], requires_grad=True)
    teacher = torch.tensor([[-math.inf, -10.0, -20.0]])
    lengths, valid = torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)
    loss = listwise_path_loss(student, teacher, lengths, valid)
    # q = (0, q1, q2): the loss is the KL over the other two paths' terms, with p over all three
    log_p = torch.log_softmax(student.detach()[0], -1)
    log_q = torch.log_softmax(teacher[0, 1:], -1)
    assert_close(loss, (log_q.exp() * (log_q - log_p[1:])).sum())
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_path_losses_refuse_inputs_of_different_shapes():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=r"contrastive_path_loss: expected tensors of one shape \(B,\).*"
                                         r"pol_chosen \[3, 1\]"):
        contrastive_path_loss(torch.zeros(3, 1), z, z, z, beta=0.1, reduction="none")
    m = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"listwise_path_loss: expected tensors of one shape \(B,M\)"):
        listwise_path_loss(m, torch.zeros(2, 1), m, m.bool())


def test_a_nan_temperature_or_beta_is_refused_not_propagated():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be > 0, got nan"):
        contrastive_path_loss(x, x, x, x, beta=float("nan"))


def test_token_losses_refuse_shapes_that_would_broadcast_and_skip_negative_labels():
    """A (B,1), (1,T) or (T,) mask would broadcast and score every position; a -100 label (Hugging Face's ignore
    index) at a scored position is left out (it read as probability 1 and counted in the mean)."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    for bad in (torch.ones(2, 1), torch.ones(1, 5), torch.ones(5)):
        for fn in (token_logprobs, sequence_logprobs, sft_loss):
            with pytest.raises(ValueError, match=r"expected logits \(B,T,V\) with labels and mask \(B,T\)"):
                fn(logits, labels, bad)
    mask = torch.ones(2, 5)
    hf = labels.clone()
    hf[:, :2] = -100
    by_mask = mask.clone()
    by_mask[:, :2] = 0
    assert torch.allclose(sft_loss(logits, hf, mask), sft_loss(logits, labels, by_mask))
    assert torch.allclose(sequence_logprobs(logits, hf, mask), sequence_logprobs(logits, labels, by_mask))
    for n in (0, -3, float("nan")):
        with pytest.raises(ValueError, match="num_tokens must be > 0"):
            sft_loss(logits, labels, mask, num_tokens=n)


def test_listwise_keeps_nan_and_takes_zero_paths():
    """A NaN teacher log-probability or length of a valid path makes that row NaN (it read as 0 and counted in the
    mean); M = 0 paths is an empty distribution, not an IndexError."""
    student = torch.tensor([[-3.0, -4.0], [-2.0, -5.0]])
    lengths, valid = torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool)
    teacher = torch.tensor([[float("nan"), -1.0], [-1.0, -2.0]])
    rows = listwise_path_loss(student, teacher, lengths, valid, reduction="none")
    assert torch.isnan(rows[0]) and torch.isfinite(rows[1])
    assert torch.isnan(listwise_path_loss(student, student, torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]), valid,
                                          reduction="none")[0])
    empty = torch.zeros(3, 0)
    assert listwise_path_loss(empty, empty, empty, empty.bool(), reduction="none").tolist() == [0.0, 0.0, 0.0]
    assert listwise_path_loss(empty, empty, empty, empty.bool()).item() == 0.0
