"""fedlada.train: what gets updated, determinism, that each term moves the model the right way, and normalisation."""

import math

import pytest
import torch
from torch.testing import assert_close

from fedlada.errors import ConfigError
from fedlada.losses import listwise_path_loss
from fedlada.models import apply_lora, build_tiny_model, train_tokenizer
from fedlada.paths import collate, encode_pair, path_logprobs
from fedlada.train import ListwiseExample, PreferenceExample, SFTExample, TrainStats, train

PROMPT = "Question: what is {a} + {b}?\nReasoning:\n"


def _path(a, b, c):
    return f"{a} + {b} = {c}\nAnswer: {c}"


PROBLEMS = [(a, b) for a in range(1, 5) for b in range(2, 6)]  # 16 questions
SFT = [SFTExample(PROMPT.format(a=a, b=b), _path(a, b, a + b)) for a, b in PROBLEMS]
PREF = [PreferenceExample(PROMPT.format(a=a, b=b), _path(a, b, a + b), _path(a, b, a + b + 1 + a % 3))
        for a, b in PROBLEMS[:8]]


@pytest.fixture(scope="module")
def tok():
    texts = [e.prompt + e.path for e in SFT] + [e.rejected for e in PREF] + ["0123456789 twelve dozen boxes"]
    return train_tokenizer(texts, vocab_size=300)


def _model(tok, seed=0):
    return build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=seed)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logp(model, tok, prompts, paths):
    model.eval()
    with torch.no_grad():
        batch = collate(tok, [encode_pair(tok, p, y, max_length=256) for p, y in zip(prompts, paths)])
        return path_logprobs(model, batch)


def _margins(model, tok, pref):
    prompts = [e.prompt for e in pref]
    return (_logp(model, tok, prompts, [e.chosen for e in pref])
            - _logp(model, tok, prompts, [e.rejected for e in pref]))


def _mean_nll(model, tok, examples):
    lp = _logp(model, tok, [e.prompt for e in examples], [e.path for e in examples])
    n = sum(len(encode_pair(tok, e.prompt, e.path, max_length=256)[1]) for e in examples)
    return float(-lp.sum() / n)


def test_trainable_params_change_frozen_do_not(tok):
    model = _model(tok)
    frozen = {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"}  # embeddings tied to lm_head
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = _params(model)
    stats = train(model, tok, sft=SFT, preference=PREF, lr=1e-2, batch_size=8)
    assert stats.steps == 2
    after = _params(model)
    for n in before:
        if n in frozen:
            assert torch.equal(before[n], after[n]), n
        else:
            assert not torch.equal(before[n], after[n]), n


def test_lora_trains_adapters_only(tok):
    model = apply_lora(_model(tok), r=4, alpha=8)
    before = _params(model)
    train(model, tok, sft=SFT[:8], preference=PREF[:4], lr=1e-2, batch_size=4)
    after = _params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapters really learned something
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


def test_same_seed_same_weights_and_global_rng_untouched(tok):
    def run(seed):
        model = _model(tok)
        for layer in model.model.layers:  # dropout on, so the dropout RNG matters
            layer.self_attn.attention_dropout = 0.2
        train(model, tok, sft=SFT, preference=PREF, distill_sft=SFT[:3], lr=1e-2, batch_size=4, seed=seed)
        return _params(model)

    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    a = run(7)
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.rand(5)  # a different global RNG state must not matter: dropout draws from the seeded, forked RNG
    b, c = run(7), run(8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_contrastive_training_raises_chosen_over_rejected(tok):
    model = _model(tok)
    before = _margins(model, tok, PREF)
    stats = train(model, tok, preference=PREF, lr=1e-2, epochs=3, batch_size=4, beta=0.1, mu=0.0)
    after = _margins(model, tok, PREF)
    assert stats.steps == 6
    assert float((after - before).mean()) > 1.0
    assert int((after > before).sum()) >= 7
    assert stats.components["da"] < math.log(2)  # mean over steps, the first one being log 2


def test_first_step_pairwise_loss_is_log2_reference_is_the_model_as_passed(tok):
    """One step over all pairs: the loss is computed before the update, when policy == reference."""
    model = _model(tok)
    stats = train(model, tok, preference=PREF, lr=1e-2, batch_size=len(PREF))
    assert stats.steps == 1
    assert abs(stats.components["da"] - math.log(2)) < 1e-4
    assert math.isnan(stats.components["sft"]) and math.isnan(stats.components["distill"])


def test_sft_term_matches_path_logprobs_convention(tok):
    """The loop's SFT loss of the first step == -sum log pi(path) / path tokens from fedlada.paths."""
    model = _model(tok)
    expected = _mean_nll(model, tok, SFT)
    stats = train(model, tok, sft=SFT, lr=1e-3, batch_size=len(SFT))
    assert abs(stats.components["sft"] - expected) < 1e-4
    assert abs(stats.loss - expected) < 1e-4


def test_small_distill_set_is_spread_and_its_component_averages_present_steps_only(tok):
    """2 distillation examples among 4 SFT micro-batches: they land in 2 different steps, and the reported
    component is the mean over those steps only (lr ~ 0, so each step's term is the untrained per-token NLL)."""
    model = _model(tok)
    distill = SFT[14:16]
    per_example = [_mean_nll(model, tok, [e]) for e in distill]
    stats = train(model, tok, sft=SFT[:16], distill_sft=distill, lr=1e-12, batch_size=4)
    assert stats.steps == 4
    assert abs(stats.components["distill"] - sum(per_example) / 2) < 1e-4


def test_sft_training_lowers_the_loss(tok):
    model = _model(tok)
    before = _mean_nll(model, tok, SFT)
    train(model, tok, sft=SFT, lr=1e-2, epochs=4, batch_size=4)
    assert _mean_nll(model, tok, SFT) < before - 0.5


def test_listwise_training_moves_student_toward_teacher(tok):
    lw = []
    for a, b in PROBLEMS[:6]:
        paths = [_path(a, b, a + b), f"{a} plus {b} is {a + b}\nAnswer: {a + b}", _path(a, b, a + b + 2)]
        lw.append(ListwiseExample(PROMPT.format(a=a, b=b), paths, [-2.0, -40.0, -1.0], [True, True, False]))
    lw.append(ListwiseExample(PROMPT.format(a=9, b=9), [_path(9, 9, 18)], [-1.0], [True]))  # < 2 valid: dropped

    def kl(model):
        rows = [[encode_pair(tok, e.prompt, e.paths[j], max_length=256) for j in range(2)] for e in lw[:-1]]
        student = _logp(model, tok, [e.prompt for e in lw[:-1] for _ in range(2)],
                        [e.paths[j] for e in lw[:-1] for j in range(2)]).view(-1, 2)
        lengths = torch.tensor([[len(y) for _, y in r] for r in rows], dtype=torch.float32)
        teacher = torch.tensor([e.teacher_logp[:2] for e in lw[:-1]])
        return float(listwise_path_loss(student, teacher, lengths, torch.ones(len(rows), 2, dtype=torch.bool)))

    model = _model(tok)
    before = kl(model)
    stats = train(model, tok, listwise=lw, lr=1e-2, epochs=4, batch_size=3)
    assert stats.steps == 8  # 6 usable questions / 3 per batch x 4 epochs
    assert kl(model) < 0.5 * before


def test_lambda_da_zero_equals_sft_only_bitwise(tok):
    a, b = _model(tok), _model(tok)
    sa = train(a, tok, sft=SFT, lr=1e-2, batch_size=4, seed=3)
    sb = train(b, tok, sft=SFT, preference=PREF, lr=1e-2, batch_size=4, seed=3, lambda_da=0.0)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert (sa.steps, sa.tokens, sa.loss) == (sb.steps, sb.tokens, sb.loss)


def test_accumulation_matches_one_big_batch(tok, monkeypatch):
    """batch 4 x accumulation 2 gives the same update as batch 8 (plain SGD, so the update is -lr * gradient)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    ragged = [SFTExample(e.prompt, e.path + " and so on" * (i % 4)) for i, e in enumerate(SFT[:8])]
    common = dict(sft=ragged, preference=PREF[:8], distill_sft=SFT[8:16], lr=1.0, max_grad_norm=None, seed=1)
    start = _params(_model(tok))
    deltas = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model = _model(tok)
        stats = train(model, tok, batch_size=batch_size, grad_accum=accum, **common)
        assert stats.steps == 1
        deltas.append({n: p.detach() - start[n] for n, p in model.named_parameters()})
    for n in start:
        assert_close(deltas[1][n], deltas[0][n], rtol=1e-4, atol=1e-6)
    assert max(float(d.abs().max()) for d in deltas[0].values()) > 1e-3


@pytest.mark.parametrize("kind", ["preference", "listwise"])
def test_prefix_reuse_gives_the_same_gradient(tok, monkeypatch, kind):
    """Running a prompt once for all its paths (reuse_prefix) == running every (prompt, path) row in full."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    if kind == "preference":
        data = dict(preference=PREF)
    else:
        data = dict(listwise=[ListwiseExample(e.prompt, [e.chosen, e.rejected, e.chosen + " ok"], [-3.0, -9.0, -1.0],
                                              [True, True, i % 2 == 0]) for i, e in enumerate(PREF)])
    start = _params(_model(tok))
    deltas, tokens = [], []
    for reuse in (False, True):
        model = _model(tok)
        stats = train(model, tok, lr=1.0, batch_size=len(PREF), max_grad_norm=None, reuse_prefix=reuse, **data)
        deltas.append({n: p.detach() - start[n] for n, p in model.named_parameters()})
        tokens.append(stats.tokens)
    for n in start:
        assert_close(deltas[1][n], deltas[0][n], rtol=1e-4, atol=1e-6)
    assert max(float(d.abs().max()) for d in deltas[0].values()) > 1e-3
    if kind == "preference":  # each prompt runs once instead of twice; a path's last token is never fed in
        enc = [(encode_pair(tok, e.prompt, e.chosen, max_length=256), encode_pair(tok, e.prompt, e.rejected,
                                                                                 max_length=256)) for e in PREF]
        assert tokens[0] == sum(2 * len(p) + len(yc) + len(yr) for (p, yc), (_, yr) in enc)
        assert tokens[1] == sum(len(p) + len(yc) - 1 + len(yr) - 1 for (p, yc), (_, yr) in enc)


def test_prefix_reuse_default_follows_the_device(tok, monkeypatch):
    """``reuse_prefix=None`` (the default) asks ``reuse_prefix_pays`` for the model's device: on (CPU) it trains as
    ``True`` does, each prompt once; off (what it answers for a GPU) as ``False`` does, full rows."""
    import fedlada.train as ftrain

    def tokens(**kw):
        return train(_model(tok), tok, lr=1e-3, batch_size=len(PREF), preference=PREF, **kw).tokens

    shared, full = tokens(reuse_prefix=True), tokens(reuse_prefix=False)
    assert shared < full
    assert ftrain.reuse_prefix_pays(torch.device("cpu")) and not ftrain.reuse_prefix_pays(torch.device("cuda"))
    assert tokens() == shared
    monkeypatch.setattr(ftrain, "reuse_prefix_pays", lambda device: False)
    assert tokens() == full


@pytest.mark.slow
def test_compile_trains_like_eager(tok):
    """``compile=True`` (torch.compile, dynamic shapes) runs the same computation: every kind of example, the
    reference pass and the shared-prefix passes give the same weights as eager training up to float rounding."""
    lists = [ListwiseExample(e.prompt, [e.chosen, e.rejected], [-3.0, -9.0], [True, True]) for e in PREF]
    weights, losses = [], []
    for compile in (False, True):
        model = _model(tok)
        start = _params(model)
        stats = train(model, tok, sft=SFT, preference=PREF, listwise=lists, distill_sft=SFT[:4], lr=1e-2, epochs=2,
                      batch_size=4, compile=compile, reuse_prefix=True)
        weights.append(_params(model))
        losses.append(stats.loss)
    assert math.isfinite(losses[0]) and losses[1] == pytest.approx(losses[0], rel=1e-4)
    for n, w in weights[0].items():
        assert_close(weights[1][n], w, rtol=1e-3, atol=1e-5)
    assert max(float((w - start[n]).abs().max()) for n, w in weights[0].items()) > 1e-3  # training moved weights


def test_a_compiled_peft_model_is_seen_through(tok):
    """The loop asks the model's forward which arguments it takes (``logits_to_keep``, the cache's name); through a
    torch.compile wrapper of a peft model it must still find the base model's forward (no compilation happens here:
    torch.compile compiles on the first call)."""
    from fedlada.paths import _forward_params
    from fedlada.train import _forward_parameters

    peft_model = apply_lora(_model(tok), r=4, alpha=8)
    wrapped = torch.compile(peft_model, dynamic=True)
    assert "logits_to_keep" in _forward_parameters(wrapped) and "logits_to_keep" in _forward_params(wrapped)
    assert _forward_parameters(wrapped) == _forward_parameters(peft_model.get_base_model())


def test_activation_checkpointing_falls_back_to_full_rows(tok):
    """Checkpointing drops the key/value cache that prefix reuse needs; training must still work (full rows)."""
    model = _model(tok)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    before = _margins(model, tok, PREF)
    stats = train(model, tok, preference=PREF, lr=1e-2, epochs=2, batch_size=len(PREF))
    assert stats.steps == 2
    assert float((_margins(model, tok, PREF) - before).mean()) > 0


def test_shared_prefix_logprobs_match_path_logprobs(tok):
    from fedlada.train import _collate_kind, _shared_logprobs

    model = _model(tok)
    with torch.no_grad():  # larger weights: sharp attention, so that a wrong position or mask shows in the values
        for p in model.parameters():
            p.mul_(8)
    items = [dict(pairs=[encode_pair(tok, e.prompt + "x" * i, y, max_length=256) for y in (e.chosen, "", e.rejected)])
             for i, e in enumerate(PREF[:4])]  # prompts of different lengths; "" is a path of one token (eos)
    pairs = [p for it in items for p in it["pairs"]]
    want = path_logprobs(model, collate(tok, pairs))
    got = _shared_logprobs(model, _collate_kind(tok, "list", [dict(it, teacher=[0.0] * 3) for it in items], "cpu",
                                                reuse_prefix=True))
    assert_close(got, want, rtol=1e-6, atol=2e-4)  # log-probs of order -300
    only_eos = [dict(pairs=[encode_pair(tok, e.prompt, "", max_length=256)] * 2, teacher=[0.0, 0.0]) for e in PREF[:3]]
    got = _shared_logprobs(model, _collate_kind(tok, "list", only_eos, "cpu", reuse_prefix=True))
    want = path_logprobs(model, collate(tok, [p for it in only_eos for p in it["pairs"]]))
    assert_close(got, want, rtol=1e-6, atol=2e-4)


def test_empty_inputs_do_nothing(tok):
    model = _model(tok)
    before = _params(model)
    for kwargs in (dict(), dict(sft=SFT, epochs=0), dict(distill_sft=SFT, mu=0.0),
                   dict(listwise=[ListwiseExample("Question: 1?\n", ["a", "b"], [-1.0, -2.0], [True, False])])):
        stats = train(model, tok, lr=1e-2, **kwargs)
        assert isinstance(stats, TrainStats)
        assert (stats.steps, stats.tokens) == (0, 0)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_stats_tokens_progress_mode_and_bf16(tok):
    model = _model(tok)
    model.eval()
    seen = []
    stats = train(model, tok, sft=SFT[:6], distill_sft=SFT[6:9], lr=1e-2, epochs=2, batch_size=2, grad_accum=2,
                  bf16=True, progress=lambda s, n: seen.append((s, n)))
    n_tokens = sum(len(p) + len(y) for e in SFT[:9] for p, y in [encode_pair(tok, e.prompt, e.path, max_length=256)])
    assert stats.steps == 4  # ceil(3 micro-batches / 2) per epoch
    assert stats.tokens == 2 * n_tokens
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert not model.training
    assert math.isfinite(stats.loss) and stats.seconds > 0
    assert_close(stats.loss, stats.components["sft"] + 0.5 * stats.components["distill"], rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_config_error(tok):
    model = _model(tok)
    with pytest.raises(ConfigError, match="lr"):
        train(model, tok, sft=SFT, lr=0.0)
    with pytest.raises(ConfigError, match="grad_accum"):
        train(model, tok, sft=SFT, lr=1e-3, grad_accum=0)
    with pytest.raises(ValueError):
        ListwiseExample("q", ["a", "b"], [-1.0], [True, True])
    for key, value in (("batch_size", 2.5), ("epochs", 1.5), ("max_length", "x"), ("lr", float("nan"))):
        with pytest.raises(ConfigError, match=f"train: {key}: expected"):
            train(model, tok, sft=SFT, **{"lr": 1e-3, key: value})
    for weight in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="SFTExample: weight must be a finite number >= 0"):
            SFTExample("q", "a", weight=weight)
    with pytest.raises(ValueError, match="teacher_logp must be a log-probability"):
        ListwiseExample("q", ["a", "b"], [float("nan"), -2.0], [True, True])
    ListwiseExample("q", ["a", "b"], [float("nan"), -2.0], [False, True])  # an invalid path's value never matters


def test_a_step_with_a_non_finite_loss_is_not_applied(tok, monkeypatch):
    from fedlada import train as train_mod

    model = _model(tok)
    before = _params(model)
    real = train_mod.sft_loss
    calls = []

    def blow_up_on_the_second_step(*a, **k):  # an overflow, as a too-high learning rate gives
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(train_mod, "sft_loss", blow_up_on_the_second_step)
    with pytest.raises(train_mod.TrainingError, match=r"not finite at step 2/\d+ \(sft nan\); this step was not"):
        train(model, tok, sft=SFT, lr=1e-3, batch_size=4)
    after = _params(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # step 1 was applied, step 2 was not


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    from fedlada.train import _cosine

    mult = [_cosine(s, total=100, warmup=0.1) for s in range(100)]
    assert mult[0] == pytest.approx(0.1) and mult[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert mult[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(mult[10:], mult[11:]))
    assert mult[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert _cosine(0, total=10, warmup=0.0) == pytest.approx(1.0)


def test_cosine_schedule_trains_and_is_validated(tok):
    a, b = _model(tok), _model(tok)
    const = train(a, tok, sft=SFT, lr=3e-3, epochs=2, batch_size=4, seed=1)
    cos = train(b, tok, sft=SFT, lr=3e-3, epochs=2, batch_size=4, seed=1, lr_schedule="cosine", warmup=0.25)
    assert const.steps == cos.steps == 8 and math.isfinite(cos.loss)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # the schedule was applied
    with pytest.raises(ConfigError, match="lr_schedule"):
        train(_model(tok), tok, sft=SFT, lr=1e-3, lr_schedule="linear")
    with pytest.raises(ConfigError, match="warmup"):
        train(_model(tok), tok, sft=SFT, lr=1e-3, lr_schedule="cosine", warmup=1.0)
