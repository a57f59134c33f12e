"""Path tokenisation, batching, exact batched scoring (with and without prompt-cache reuse), sampling, embeddings."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedlada.errors import DataError
from fedlada.models import build_tiny_model, train_tokenizer
from fedlada.paths import (
    AnswerLineStop,
    collate,
    cut_after_answer_line,
    encode_pair,
    path_logprobs,
    question_embeddings,
    sample_paths,
    score_paths,
)


def _problem(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(1, 20), rng.randint(2, 9), rng.randint(0, 9)
    q = f"Lea has {a} bags of {b} marbles and gives away {c}. How many marbles are left?"
    y = f"{a} * {b} = {a * b}\n{a * b} - {c} = {a * b - c}\nAnswer: {a * b - c}"
    return q, y


def _prompt(q: str) -> str:
    return f"Question: {q}\nReasoning:\n"


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return train_tokenizer([_prompt(q) + y for q, y in (_problem(rng) for _ in range(300))], vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, hidden_size=48, num_layers=2, num_heads=4, seed=0)


@pytest.fixture(scope="module")
def pairs_and_reference(tok, model):
    """Mixed lengths: 10 questions with 1-4 paths each (some prompts repeat), paths cut at random lengths."""
    rng = random.Random(1)
    prompts, paths = [], []
    for i in range(10):
        q, _ = _problem(rng)
        q = q + " Be quick." * (i % 3)  # vary prompt lengths
        for _ in range(rng.randint(1, 4)):
            _, y = _problem(rng)
            prompts.append(_prompt(q))
            paths.append(y[: rng.randint(0, len(y))])
    ref = np.array([_reference_logprob(model, tok, p, y) for p, y in zip(prompts, paths)])
    return prompts, paths, ref


def _reference_logprob(model, tok, prompt: str, path: str, max_length: int = 512) -> float:
    """One pair alone, no padding: sum over path tokens of log_softmax(logits)[next token], in float64."""
    p, y = encode_pair(tok, prompt, path, max_length=max_length)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + y])).logits[0].double(), dim=-1)
    return sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(y))


def test_encode_pair_tokenises_separately_and_appends_eos(tok):
    prompt, path = "Question: Lea has 3 bags.\nReasoning:\n", "3 * 2 = 6\nAnswer: 6"
    p, y = encode_pair(tok, prompt, path, max_length=512)
    assert p == tok(prompt, add_special_tokens=False)["input_ids"]
    assert y == tok(path, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # the path is cut from the right to fit max_length; eos goes first
    p2, y2 = encode_pair(tok, prompt, path, max_length=len(p) + 3)
    assert p2 == p and y2 == y[:3]
    _, y3 = encode_pair(tok, prompt, "", max_length=512)
    assert y3 == [tok.eos_token_id]
    with pytest.raises(DataError, match=f"prompt is {len(p)} tokens"):
        encode_pair(tok, prompt, path, max_length=len(p))


def test_collate_pads_right_and_marks_path_predictions(tok):
    pad, eos = tok.pad_token_id, tok.eos_token_id
    batch = collate(tok, [([5, 6, 7], [8, 9, eos]), ([5], [10, eos])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, eos], [5, 10, eos, pad, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8, 9, eos, pad], [10, eos, pad, pad, pad, pad]]
    # position t is scored when labels[t] (the token after t) is a path token
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]


def test_path_logprobs_equals_manual_gather_and_is_differentiable(tok, model):
    pairs = [encode_pair(tok, _prompt("Lea has 2 bags"), "2 * 3 = 6\nAnswer: 6", max_length=128),
             encode_pair(tok, _prompt("Lea has 12 bags of 3 marbles"), "Answer: 36", max_length=128),
             encode_pair(tok, _prompt("Lea"), "", max_length=128)]
    batch = collate(tok, pairs)
    got = path_logprobs(model, batch)
    assert got.shape == (3,) and got.requires_grad
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    for b, (p, y) in enumerate(pairs):
        manual = sum(logp[b, len(p) - 1 + j, t] for j, t in enumerate(y))
        torch.testing.assert_close(got[b], manual, rtol=1e-6, atol=1e-5)
    got.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("reuse_prefix", [False, True])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_score_paths_equals_one_at_a_time(tok, model, pairs_and_reference, reuse_prefix, padding_side, monkeypatch):
    monkeypatch.setattr(tok, "padding_side", padding_side)
    prompts, paths, ref = pairs_and_reference
    perm = np.random.default_rng(7).permutation(len(paths))
    for batch_size in (1, 3, 8):
        s = score_paths(model, tok, prompts, paths, batch_size=batch_size, reuse_prefix=reuse_prefix)
        np.testing.assert_allclose(s.logprob, ref, rtol=0, atol=1e-5)
        shuffled = score_paths(model, tok, [prompts[i] for i in perm], [paths[i] for i in perm],
                               batch_size=batch_size, reuse_prefix=reuse_prefix)
        np.testing.assert_allclose(shuffled.logprob, ref[perm], rtol=0, atol=1e-5)
    assert s.logprob.dtype == np.float64 and np.all(s.logprob < 0)


def test_score_paths_prefix_reuse_with_many_paths_per_prompt(tok, model):
    """M = 6 paths for each of 3 prompts of different lengths; a prompt's paths spread over several batches."""
    rng = random.Random(3)
    prompts, paths = [], []
    for k in range(3):
        q, _ = _problem(rng)
        for m in range(6):
            prompts.append(_prompt(q + " Again." * k))
            paths.append(_problem(rng)[1][: 5 + 9 * m])
    ref = np.array([_reference_logprob(model, tok, p, y) for p, y in zip(prompts, paths)])
    for batch_size in (4, 32):
        s = score_paths(model, tok, prompts, paths, batch_size=batch_size, reuse_prefix=True)
        np.testing.assert_allclose(s.logprob, ref, rtol=0, atol=1e-5)


def test_score_paths_reuses_prefixes_by_default_only_where_it_pays(tok, model, monkeypatch):
    """``reuse_prefix=None`` asks ``reuse_prefix_pays`` for the model's device (yes on a CPU, no on a GPU); the
    scores are the same either way."""
    import fedlada.paths as fpaths

    rng = random.Random(5)
    q = _problem(rng)[0]
    prompts, paths = [_prompt(q)] * 3, [_problem(rng)[1] for _ in range(3)]
    calls = []
    real = fpaths._score_shared
    monkeypatch.setattr(fpaths, "_score_shared", lambda *a, **k: calls.append(1) or real(*a, **k))
    on = score_paths(model, tok, prompts, paths)
    assert calls, "a CPU model shares the prompt's pass by default"
    calls.clear()
    monkeypatch.setattr(fpaths, "reuse_prefix_pays", lambda device: False)
    off = score_paths(model, tok, prompts, paths)
    assert not calls
    np.testing.assert_allclose(on.logprob, off.logprob, rtol=0, atol=1e-5)


def test_score_paths_counts_tokens_truncates_and_keeps_mode(tok, model):
    prompt = _prompt("Lea has 4 bags of 5 marbles")
    paths = ["4 * 5 = 20\nAnswer: 20", "Answer: 20", ""]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    n_path = [len(tok(y, add_special_tokens=False)["input_ids"]) + 1 for y in paths]
    model.train()
    s = score_paths(model, tok, [prompt] * 3, paths)
    assert model.training  # restored
    model.eval()
    assert s.num_tokens.tolist() == n_path
    np.testing.assert_allclose(s.nll, -s.logprob / np.array(n_path))
    cut = score_paths(model, tok, [prompt] * 3, paths, max_length=n_prompt + 4)
    assert cut.num_tokens.tolist() == [min(4, n) for n in n_path]
    np.testing.assert_allclose(cut.logprob[0], _reference_logprob(model, tok, prompt, paths[0], n_prompt + 4),
                               atol=1e-5)
    assert len(score_paths(model, tok, [], [])) == 0
    with pytest.raises(DataError, match=f"prompt is {n_prompt} tokens"):
        score_paths(model, tok, [prompt], ["x"], max_length=n_prompt)


def test_cut_after_answer_line():
    assert cut_after_answer_line("1 + 2 = 3\nAnswer: 3\nQuestion: next") == ("1 + 2 = 3\nAnswer: 3", True)
    assert cut_after_answer_line("Answer: 7\n\nAnswer: 8\n") == ("Answer: 7", True)
    assert cut_after_answer_line("1 + 2 = 3\nAnswer: 3") == ("1 + 2 = 3\nAnswer: 3", False)  # not complete
    assert cut_after_answer_line("My Answer: 3\nmore") == ("My Answer: 3\nmore", False)  # not at a line start


def test_answer_line_stop_marks_rows_with_a_completed_answer_line(tok):
    prompt = tok("Question: q\nReasoning:\n", add_special_tokens=False)["input_ids"]
    texts = ["1 + 2 = 3\nAnswer: 3", "1 + 2 = 3\nAnswer: 3\n", "Answer: 5\nQuestion", "x\nMy Answer: 3\n"]
    rows = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    stop = AnswerLineStop(tok, len(prompt))
    # called on every prefix, as generate does; rows 1 and 2 finish, rows 0 and 3 never do
    for t in range(len(prompt) + 1, T + 1):
        done = stop(ids[:, :t], None)
    assert done.tolist() == [False, True, True, False]


def _generate_greedy_reference(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return cut_after_answer_line(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))[0]


def test_sample_paths_is_seeded_and_leaves_global_rng(tok, model):
    prompts = [_prompt("Lea has 3 bags"), _prompt("Lea has 17 bags of 4 marbles and gives away 2")]
    state = torch.random.get_rng_state()
    a = sample_paths(model, tok, prompts, num_paths=3, temperature=1.0, max_new_tokens=12, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    b = sample_paths(model, tok, prompts, num_paths=3, temperature=1.0, max_new_tokens=12, seed=5)
    c = sample_paths(model, tok, prompts, num_paths=3, temperature=1.0, max_new_tokens=12, seed=6)
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3]
    assert len({p for paths in a for p in paths}) > 1  # sampling, not copies


def test_a_checkpoints_generation_config_does_not_change_sampling(tok, model):
    """transformers fills unset generation settings from the model's generation_config (a checkpoint's
    generation_config.json): none of them may apply, greedy or sampled, and the model's config is left as it was."""
    prompts = [_prompt("Lea has 3 bags"), _prompt("Lea has 17 bags of 4 marbles and gives away 2")]
    plain = [sample_paths(model, tok, prompts, num_paths=2, temperature=t, max_new_tokens=12, seed=1)
             for t in (0.0, 1.0)]
    gc = model.generation_config
    saved = gc.to_dict()
    try:
        gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens, gc.top_k = 50.0, 1, 12, 1
        odd = [sample_paths(model, tok, prompts, num_paths=2, temperature=t, max_new_tokens=12, seed=1)
               for t in (0.0, 1.0)]
        assert odd == plain
        assert model.generation_config is gc and gc.repetition_penalty == 50.0
    finally:
        for k in ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "top_k"):
            setattr(gc, k, saved.get(k))


def test_greedy_is_temperature_zero_and_batch_invariant(tok, model):
    prompts = [_prompt("Lea has 3 bags"), _prompt("Lea has 17 bags of 4 marbles and gives away 2"), _prompt("Lea")]
    got = sample_paths(model, tok, prompts, num_paths=2, temperature=0.0, max_new_tokens=10, batch_size=8)
    for prompt, paths in zip(prompts, got):
        expected = _generate_greedy_reference(model, tok, prompt, 10)
        assert paths == [expected, expected]
    alone = [sample_paths(model, tok, [p], num_paths=1, temperature=0.0, max_new_tokens=10)[0][0] for p in prompts]
    assert alone == [g[0] for g in got]


def test_sample_paths_stops_after_the_answer_line(tok):
    """A model trained to run on past the answer line is stopped right after it."""
    model = build_tiny_model(tok, hidden_size=48, num_layers=2, num_heads=4, seed=1)
    prompt, path = _prompt("Lea has 2 bags of 3 marbles"), "2 * 3 = 6\nAnswer: 6"
    tail = "\nQuestion: Lea has 9 bags of 9 marbles and many more marbles than that"
    ids = torch.tensor([tok(prompt + path + tail, add_special_tokens=False)["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    # without the stop rule the model writes the tail too
    assert _generate_greedy_reference(model, tok, prompt, 40) == path
    full = model.generate(input_ids=ids[:, :len(tok(prompt, add_special_tokens=False)["input_ids"])],
                          do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id)
    assert "Question: Lea has 9" in tok.decode(full[0])

    calls = []
    original = model.generate

    def counting_generate(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = counting_generate
    got = sample_paths(model, tok, [prompt], num_paths=2, temperature=0.0, max_new_tokens=40)
    assert got == [[path, path]]
    n_answer = len(tok(path + "\n", add_special_tokens=False)["input_ids"])
    assert calls and calls[0] <= n_answer + 1  # stopped at the newline, not at max_new_tokens


def test_question_embeddings_shape_and_batch_invariance(tok, model):
    rng = random.Random(5)
    questions = [_problem(rng)[0][: rng.randint(5, 80)] for _ in range(7)] + [""]
    emb = question_embeddings(model, tok, questions, batch_size=3)
    assert emb.shape == (8, 48) and emb.dtype == np.float32
    assert np.all(emb[-1] == 0) and np.all(np.linalg.norm(emb[:-1], axis=1) > 0)
    one = np.stack([question_embeddings(model, tok, [q], batch_size=1)[0] for q in questions])
    np.testing.assert_allclose(emb, one, rtol=0, atol=1e-5)
    perm = np.random.default_rng(0).permutation(8)
    np.testing.assert_allclose(question_embeddings(model, tok, [questions[i] for i in perm], batch_size=8),
                               emb[perm], rtol=0, atol=1e-5)
    # mean of the final (normed) hidden state over the text's tokens
    ids = torch.tensor([tok(questions[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(emb[0], h.numpy(), rtol=0, atol=1e-5)


def test_score_paths_on_a_lora_model(tok, pairs_and_reference):
    from fedlada.models import apply_lora

    lora = apply_lora(build_tiny_model(tok, hidden_size=48, num_layers=2, num_heads=4, seed=0), r=4, alpha=8)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    prompts, paths, base_ref = pairs_and_reference
    ref = np.array([_reference_logprob(lora, tok, p, y) for p, y in zip(prompts, paths)])
    assert np.abs(ref - base_ref).max() > 1e-3  # the adapters change the scores
    for reuse_prefix in (False, True):
        s = score_paths(lora, tok, prompts, paths, batch_size=8, reuse_prefix=reuse_prefix)
        np.testing.assert_allclose(s.logprob, ref, rtol=0, atol=1e-5)


def test_sampling_speedups_keep_the_paths_and_leave_the_model(tok):
    """A LoRA model sampled through a merged copy with a static KV cache gives the paths it gives unmerged with a
    growing cache (these tiny shapes: no rounding flip), and the trained adapter model is left exactly as it was."""
    from fedlada.models import apply_lora

    lora = apply_lora(build_tiny_model(tok, hidden_size=48, num_layers=2, num_heads=4, seed=0), r=4, alpha=8)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    rng = random.Random(3)
    prompts = [_prompt(_problem(rng)[0]) for _ in range(5)]
    for temperature, m in ((0.0, 1), (1.0, 3)):
        kw = dict(num_paths=m, temperature=temperature, max_new_tokens=16, seed=2, batch_size=6)
        plain = sample_paths(lora, tok, prompts, merge_lora=False, static_cache=False, **kw)
        fast = sample_paths(lora, tok, prompts, merge_lora=True, static_cache=True, **kw)
        assert fast == plain
        assert sample_paths(lora, tok, prompts, merge_lora=False, static_cache=True, **kw) == plain  # a big model
        assert sample_paths(lora, tok, prompts, **kw) == fast  # on a CPU both are on by default
    after = dict(lora.named_parameters())
    assert before.keys() == after.keys() and any("lora_A" in n for n in after)
    assert all(torch.equal(before[n], after[n]) for n in before)
