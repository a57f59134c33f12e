"""Host round steps on tiny models: configurations refused up front, the KD step aligned with the logits it is given,
a FedMKT-like and a FedCoLLM-like round end to end with their payloads counted, and FedAvg applied as computed."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fedlada import host_rounds, reasoning
from fedlada.config import load_config
from fedlada.errors import ConfigError
from fedlada.hosts import decode_state, decode_topk, encode_topk, fedavg, tokenizer_fingerprint
from fedlada.messages import ReportMessage, TeachMessage
from fedlada.paths import encode_pair, score_paths

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IDENTICAL_SLMS = ['models.slms=[{"hidden_size": 24, "num_layers": 2, "num_heads": 4, "pretrain_tokens": 2000, '
                  '"lora": true, "lora_r": 4}]']


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and much faster than on two when the CPU is shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("scenario, supported", [
    ("scenario-a-identical", {"none", "fedmkt", "fedcollm"}),
    ("scenario-b-sizes", {"none", "fedmkt"}),
    ("scenario-c-depths", {"none", "fedmkt"}),
    ("scenario-d-tokenizer", {"none"}),
])
def test_scenarios_support_the_hosts_their_files_document(scenario, supported):
    path = CONFIGS / f"{scenario}.toml"
    text = path.read_text()
    for host in ("none", "fedmkt", "fedcollm"):
        cfg = load_config(path, [f"host.name={host}"])
        assert cfg.rounds == 3 and cfg.data.num_clients == 3
        if host in supported:
            host_rounds.check_host_config(cfg)
        else:
            with pytest.raises(ConfigError):
                host_rounds.check_host_config(cfg)
    assert "Hosts that support it" in text


def test_a_mismatched_tokenizer_is_refused_naming_both_models():
    cfg = load_config(CONFIGS / "scenario-d-tokenizer.toml", ["host.name=fedmkt"])
    with pytest.raises(ConfigError) as e:
        host_rounds.check_host_config(cfg)
    msg = str(e.value)
    assert "client 2's SLM (tiny Llama hidden=96 layers=3 heads=4, own tokenizer" in msg
    assert "the LLM (tiny Llama hidden=256 layers=4 heads=8, shared tokenizer" in msg
    assert "No host here supports mixed tokenizers" in msg and "exchanges text only" in msg
    # 'local' exchanges nothing, so the host is never involved
    host_rounds.check_host_config(replace(cfg, lada=replace(cfg.lada, method="local")))


def test_other_refusals_name_the_key_and_the_difference():
    with pytest.raises(ConfigError, match="'host' runs a host framework without LaDa"):
        host_rounds.check_host_config(load_config(overrides=["lada.method=host"]))
    cfg = load_config(CONFIGS / "scenario-b-sizes.toml", ["host.name=fedcollm"])
    with pytest.raises(ConfigError, match=r"client 1's SLM differs from client 0's in hidden_size \(96 vs 64\)"):
        host_rounds.check_host_config(cfg)
    with pytest.raises(ConfigError, match="host.kd_student"):
        load_config(overrides=["host.kd_student=vocab"])


def test_host_only_methods_run_lada_without_its_losses():
    cfg = host_rounds.lada_config(load_config(overrides=["lada.method=host-random", "host.name=fedmkt"]))
    assert (cfg.lada.method, cfg.lada.lambda_da, cfg.lada.mu) == ("random", 0.0, 0.0)
    lada = load_config(overrides=["host.name=fedmkt"])
    assert host_rounds.lada_config(lada) is lada


# ------------------------------------------------------------------------------------------------ KD step


@pytest.fixture(scope="module")
def tiny_pair():
    from fedlada.models import apply_lora, build_tiny_model, train_tokenizer
    from fedlada.reasoning import format_path, format_prompt

    texts = [format_prompt(f"{a} boxes hold {b} pens each. How many pens?") + format_path(f"{a} * {b} = {a * b}",
                                                                                          str(a * b))
             for a in range(2, 9) for b in range(2, 9)]
    tok = train_tokenizer(texts, vocab_size=300)
    with torch.random.fork_rng(devices=[]):  # LoRA's initialisation draws from the global RNG
        torch.manual_seed(0)
        student = apply_lora(build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=1), r=4)
    teacher = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=2)
    prompts = [format_prompt(f"{a} boxes hold 3 pens each. How many pens?") for a in range(2, 8)]
    paths = [format_path(f"{a} * 3 = {3 * a}", str(3 * a)) for a in range(2, 8)]
    return tok, student, teacher, prompts, paths


def test_topk_targets_align_with_path_tokens_and_carry_the_path_nll(tiny_pair):
    tok, student, teacher, prompts, paths = tiny_pair
    got = host_rounds.topk_targets(teacher, tok, prompts, paths, k=8, max_length=64, batch_size=4)
    ref = score_paths(teacher, tok, prompts, paths, max_length=64)
    for i, t in enumerate(got):
        n = len(encode_pair(tok, prompts[i], paths[i], max_length=64)[1])
        assert t.path_index == i and t.values.shape == t.indices.shape == (n, 8)
        assert np.all(np.diff(t.values.astype(np.float32), axis=1) <= 0)  # sorted, largest first
    # the CE that travels with the logits is the path's per-token NLL, LaDa's l(x, y; pi)
    assert_close(torch.tensor([t.ce for t in got]), torch.from_numpy(ref.nll).float(), atol=1e-4, rtol=0)


def test_a_teacher_with_a_padded_vocabulary_names_only_real_token_ids(tiny_pair):
    from fedlada.errors import ModelError
    from fedlada.models import build_tiny_model

    tok, student, teacher, prompts, paths = tiny_pair
    padded = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=2)
    padded.resize_token_embeddings(len(tok) + 60)  # as released models pad their tables to a multiple of 64
    with torch.no_grad():
        padded.get_output_embeddings().weight[len(tok):] = 5.0  # padding rows that would win every top-k
    got = host_rounds.topk_targets(padded, tok, prompts, paths, k=8, max_length=64)
    assert all(t.indices.max() < len(tok) for t in got)
    ex = [host_rounds.KDExample(p, y, t.values, t.indices) for p, y, t in zip(prompts, paths, got)]
    assert host_rounds.kd_train(student, tok, ex, lr=1e-12, batch_size=len(ex), max_length=64).steps == 1
    bad = [host_rounds.KDExample(prompts[0], paths[0], got[0].values, got[0].indices + len(tok))]
    with pytest.raises(ModelError, match=r"top-k logits name token id \d+, but the student's output layer has"):
        host_rounds.kd_train(student, tok, bad, lr=1e-12, max_length=64)


def test_a_padded_table_with_top_k_above_the_tokenizers_size_sends_every_real_token(tiny_pair):
    """host.topk larger than the tokenizer (a character-level tokenizer under the default 128, or a large topk) on a
    model whose table is padded past it: the payload holds the tokenizer's ids only, and says so in its k (it was
    declared with the table's size and refused by its own encoder)."""
    from fedlada.data import Record
    from fedlada.messages import PathItem
    from fedlada.models import PromptFormatter, build_tiny_model
    from fedlada.rounds import Side

    tok, student, teacher, prompts, paths = tiny_pair
    padded = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=2)
    padded.resize_token_embeddings(len(tok) + 60)
    side = Side(padded, tok, PromptFormatter(tok, use_chat_template="off"))
    public = {f"q{i}": Record(f"q{i}", f"{a} boxes hold 3 pens each. How many pens?", str(3 * a), None, None)
              for i, a in enumerate(range(2, 5))}
    items = [PathItem(f"q{i}", format_path_text, -3.0, 5) for i, format_path_text in enumerate(paths[:3])]
    cfg = load_config(None, ["host.name=fedmkt", f"host.topk={len(tok) + 30}"])
    entries, meta = decode_topk(host_rounds._topk_payload(side, items, public, cfg, model_desc="padded"))
    assert meta["k"] == len(tok) and all(e.indices.shape[1] == len(tok) and e.indices.max() < len(tok)
                                         for e in entries)


def test_kd_step_toward_own_targets_costs_nothing_and_toward_a_teacher_trains_adapters_only(tiny_pair):
    tok, student, teacher, prompts, paths = tiny_pair
    V = student.get_output_embeddings().weight.shape[0]
    own = host_rounds.topk_targets(student, tok, prompts, paths, k=V, max_length=64)
    ex = [host_rounds.KDExample(p, y, t.values, t.indices) for p, y, t in zip(prompts, paths, own)]
    stats = host_rounds.kd_train(student, tok, ex, lr=1e-3, batch_size=len(ex), max_length=64)
    assert stats.steps == 1 and stats.components["kd"] < 1e-5  # KL of identical distributions (fp16 logits)

    theirs = host_rounds.topk_targets(teacher, tok, prompts, paths, k=16, max_length=64)
    ex = [host_rounds.KDExample(p, y, t.values, t.indices) for p, y, t in zip(prompts, paths, theirs)]

    def kd_now() -> float:  # the KD loss of the whole set, measured with a step too small to move anything
        return host_rounds.kd_train(student, tok, ex, lr=1e-12, batch_size=len(ex), max_length=64).components["kd"]

    kd_before = kd_now()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    stats = host_rounds.kd_train(student, tok, ex, lr=1e-2, epochs=3, batch_size=4, max_length=64, lm_weight=0.5)
    assert stats.steps == 6 and stats.components["kd"] > 1e-3 and stats.components["lm"] > 0
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert kd_now() < 0.9 * kd_before  # distillation moved the student toward the teacher


def test_weights_that_do_not_fit_and_foreign_tokenizers_are_refused(tiny_pair):
    tok, student, teacher, prompts, paths = tiny_pair
    state = host_rounds.trainable_state(student)
    name = next(iter(state))
    with pytest.raises(ConfigError, match="needs identical SLMs"):
        host_rounds.load_trainable(student, {**state, name: torch.zeros(3)}, where="teach")
    with pytest.raises(ConfigError, match="unexpected"):
        host_rounds.load_trainable(student, {**state, "extra.weight": torch.zeros(1)}, where="teach")
    from fedlada.models import train_tokenizer

    other = train_tokenizer(["entirely different text, no digits"] * 10, vocab_size=280)
    payload = encode_topk([], k=4, meta={"tokenizer": tokenizer_fingerprint(other), "model": "an SLM"})
    with pytest.raises(ConfigError, match="LaDa alone"):
        host_rounds._topk_by_question(payload, [], tok, where="teach", sender="x", receiver="the LLM")


# ------------------------------------------------------------------------------------------------ rounds


def _states(overrides):
    from fedlada.prepare import load_data
    from fedlada.runner import Events, build_states

    cfg = load_config(overrides=overrides)
    data = load_data(cfg)
    server, clients, _ = build_states(cfg, data, Events())
    return cfg, data, server, clients


def _host_bytes(msg) -> int:
    """What the host payload adds to a message on the wire."""
    return len(msg.to_bytes()) - len(replace(msg, host=None).to_bytes())


def test_server_learn_without_a_reward_slice_records_no_reward_and_learns_from_the_improvements(tiny_overrides):
    from fedlada import rounds
    from fedlada.messages import PathItem

    cfg, data, server, clients = _states(tiny_overrides)
    cand = rounds.candidate_ids(server.public, n=cfg.lada.candidates_per_round, seed=cfg.seed, round=1)
    recs = [server.public[q] for q in cand[:3]]  # fewer than 5 received questions: no reward slice this round
    paths = tuple(PathItem(r.id, reasoning.format_path(r.rationale, r.answer), -4.0, 8) for r in recs)
    rep = ReportMessage(round=1, client=0, paths=paths)
    log = rounds.server_learn(server, [rep], cfg=cfg, round=1)
    assert log.metrics["server_selected"] >= 1 and log.metrics["server_reward"] is None  # unknown, not 0
    pool = server.filters[0].pool_rewards
    assert len(pool) == log.metrics["server_selected"] and torch.isfinite(pool).all() and (pool != 0).all()  # the per-sample improvements
    with pytest.raises(ValueError, match=r"more than one report from client\(s\) \[0\]"):
        rounds.server_learn(server, [rep, rep], cfg=cfg, round=2)


def test_the_server_reward_slice_is_trained_on_through_no_client(tiny_overrides, monkeypatch):
    """Two clients send paths for the same questions: a question held out for the reward is in neither client's
    training data this round."""
    from fedlada import rounds
    from fedlada.messages import PathItem

    cfg, data, server, clients = _states(tiny_overrides)
    cand = rounds.candidate_ids(server.public, n=cfg.lada.candidates_per_round, seed=cfg.seed, round=1)
    recs = [server.public[q] for q in cand[:10]]
    reps = [ReportMessage(round=1, client=k, paths=tuple(
        PathItem(r.id, reasoning.format_path(r.rationale, r.answer), -4.0 - k, 8) for r in recs)) for k in (0, 1)]
    trained, scored = [], []
    real_train, real_score = rounds.train, rounds.score_paths
    monkeypatch.setattr(rounds, "train", lambda *a, **kw: trained.extend(e.prompt for e in kw["distill_sft"])
                        or real_train(*a, **kw))
    monkeypatch.setattr(rounds, "score_paths", lambda m, t, prompts, paths, **kw: scored.append(list(prompts))
                        or real_score(m, t, prompts, paths, **kw))
    log = rounds.server_learn(server, reps, cfg=cfg, round=1)
    held = scored[2]  # per client: the received paths (2 calls); then the reward slice before training
    assert len(held) == 2 * 2 and log.metrics["server_reward"] is not None  # 20% of 10 questions, from each client
    assert trained and not set(held) & set(trained)


def test_the_server_trains_only_on_right_answers_to_this_rounds_candidates(tiny_overrides):
    """The server holds the public answers: a report's wrong-answer paths and paths on questions outside the round
    are refused; the no-filter baseline keeps no reward slice (it learns from no reward)."""
    from fedlada import rounds
    from fedlada.messages import PathItem

    for method, held_out in (("lada", 2), ("all", 0)):
        cfg, data, server, clients = _states(tiny_overrides + [f"lada.method={method}"])
        cand = rounds.candidate_ids(server.public, n=cfg.lada.candidates_per_round, seed=cfg.seed, round=1)
        outside = [q for q in server.public if q not in cand][:3]
        good = [PathItem(q, reasoning.format_path(server.public[q].rationale, server.public[q].answer), -4.0, 8)
                for q in cand[:10]]
        wrong = [PathItem(q, "x\nAnswer: 123456", -1.0, 3) for q in cand[10:16]]
        off = [PathItem(q, reasoning.format_path(None, server.public[q].answer), -1.0, 3) for q in outside]
        log = rounds.server_learn(server, [ReportMessage(round=1, client=0, paths=tuple(good + wrong + off))],
                                  cfg=cfg, round=1)
        assert log.metrics["server_refused_paths"] == len(wrong) + len(off)
        decided = [r["id"] for r in log.selections]
        assert set(decided) <= {p.question_id for p in good} and len(decided) == len(good) - held_out
        with pytest.raises(ValueError, match="client 0's report is of round 1"):
            rounds.server_learn(server, [ReportMessage(round=1, client=0)], cfg=cfg, round=2)


def test_the_lada_round_functions_refuse_a_host_method_up_front_and_seed_by_value(tiny_overrides):
    import numpy as np

    from fedlada import rounds
    from fedlada.messages import TeachMessage

    cfg, data, server, clients = _states(tiny_overrides)
    host_cfg = load_config(overrides=tiny_overrides + ["lada.method=host", "host.name=fedmkt"])
    for call in (lambda: rounds.server_teach(server, cfg=host_cfg, round=1),
                 lambda: rounds.client_step(clients[0], TeachMessage(1, ()), public=server.public, cfg=host_cfg,
                                            round=1),
                 lambda: rounds.server_learn(server, [], cfg=host_cfg, round=1)):
        with pytest.raises(ValueError, match="'host' runs a host framework alone: use fedlada.host_rounds"):
            call()
    assert rounds.derive_seed(0, "x", np.int64(1), 2) == rounds.derive_seed(0, "x", 1, 2)
    assert rounds.candidate_ids(server.public, n=5, seed=0, round=np.int64(1)) == \
        rounds.candidate_ids(server.public, n=5, seed=0, round=1)


def test_round_functions_report_their_progress(tiny_overrides, gold_sampler):
    from fedlada import rounds

    cfg, data, server, clients = _states(tiny_overrides)
    gold_sampler(data.public)
    calls = {"teach": [], "client": [], "learn": []}
    teach, _ = rounds.server_teach(server, cfg=cfg, round=1, progress=lambda d, n: calls["teach"].append((d, n)))
    rep, clog = rounds.client_step(clients[0], teach, public=server.public, cfg=cfg, round=1,
                                   progress=lambda d, n: calls["client"].append((d, n)))
    log = rounds.server_learn(server, [rep], cfg=cfg, round=1, progress=lambda d, n: calls["learn"].append((d, n)))
    assert calls["teach"] == [(1, 2), (2, 2)]
    # one call per optimizer step of the training loop, counting up to its total
    assert [d for d, _ in calls["client"]] == list(range(1, clog.metrics["train_steps"] + 1))
    assert {n for _, n in calls["client"]} == {clog.metrics["train_steps"]}
    assert log.metrics["server_train_steps"] >= 1
    steps = log.metrics["server_train_steps"]
    assert calls["learn"] == [(d, steps) for d in range(1, steps + 1)]


def test_fedmkt_round_exchanges_counted_top_k_logits_and_distils_on_the_selection(tiny_overrides, gold_sampler):
    cfg, data, server, clients = _states(tiny_overrides + ["host.name=fedmkt", "host.topk=16"])
    gold_sampler(data.public)
    teach, slog = host_rounds.server_teach(server, cfg=cfg, round=1)
    entries, meta = decode_topk(teach.host)
    assert meta["tokenizer"] == tokenizer_fingerprint(server.side.tokenizer)
    assert len(entries) == len({p.question_id for p in teach.paths}) > 0  # one path per question with a correct one
    for e in entries:
        p = teach.paths[e.path_index]
        prompt = server.side.prompts([server.public[p.question_id].question])[0]
        n = len(encode_pair(server.side.tokenizer, prompt, p.text, max_length=cfg.train.max_length)[1])
        assert e.values.shape == (n, 16)
        assert abs(e.ce - p.nll) < 1e-4  # the most confident path's CE is its LLM per-token NLL
    assert _host_bytes(teach) == len(b',"host":""') + len(base64.b64encode(teach.host))
    assert slog.metrics["host_payload_bytes"] == len(teach.host) > 16 * 2 * sum(len(e.values) for e in entries)

    rep, clog = host_rounds.client_step(clients[0], TeachMessage.from_bytes(teach.to_bytes()), public=server.public,
                                        cfg=cfg, round=1)
    selected = [r["id"] for r in clog.selections if r["selected"]]
    with_logits = {teach.paths[e.path_index].question_id for e in entries}
    assert clog.metrics["host_kd_examples"] == len([q for q in selected if q in with_logits]) > 0
    assert clog.metrics["host_kd_steps"] >= 1 and 0 <= clog.metrics["host_kd_other_target"] <= len(selected)
    assert clog.metrics["train_tokens"] > clog.metrics["host_kd_tokens"] > 0  # the KD step counts as training
    rep_entries, _ = decode_topk(rep.host)
    assert len(rep_entries) == len({p.question_id for p in rep.paths})
    assert rep.audit()["host_payload_bytes"] == clog.metrics["host_payload_bytes"] == len(rep.host)

    rep = ReportMessage.from_bytes(rep.to_bytes())
    broken = replace(rep, client=1, host=b"not a payload")
    llm_before = host_rounds.trainable_state(server.side.model)
    llog = host_rounds.server_learn(server, [rep, broken], cfg=cfg, round=1)
    assert "does not fit" in llog.metrics["host_rejected_client1"]
    sel0 = [r["id"] for r in llog.selections if r["pair"] == "client0->llm" and r["selected"]]
    by_q = {rep.paths[e.path_index].question_id for e in rep_entries}
    assert llog.metrics["host_llm_kd_examples"] == len([q for q in sel0 if q in by_q])
    llm_after = host_rounds.trainable_state(server.side.model)
    assert any(not torch.equal(llm_before[n], llm_after[n]) for n in llm_before)


def test_fedcollm_round_averages_adapters_by_train_size_and_distils_mutually(tiny_overrides, gold_sampler, tmp_path):
    cfg, data, server, clients = _states(tiny_overrides + IDENTICAL_SLMS + ["host.name=fedcollm",
                                                                           "host.kd_epochs=0"])
    gold_sampler(data.public)
    teach, slog = host_rounds.server_teach(server, cfg=cfg, round=1)
    sent, _ = decode_state(teach.host)
    assert set(sent) == set(host_rounds.trainable_state(clients[0].side.model))
    assert all("lora_" in n for n in sent) and slog.metrics["host_payload_bytes"] == len(teach.host)
    assert len(teach.host) > 4 * sum(v.numel() for v in sent.values())  # float32 adapters on the wire
    reports = []
    for c in clients:
        rep, clog = host_rounds.client_step(c, TeachMessage.from_bytes(teach.to_bytes()), public=server.public,
                                            cfg=cfg, round=1)
        reports.append(ReportMessage.from_bytes(rep.to_bytes()))
        assert _host_bytes(rep) == len(b',"host":""') + len(base64.b64encode(rep.host))
    states = [decode_state(r.host) for r in reports]
    assert [m["train_size"] for _, m in states] == [len(c.train) for c in clients]

    host_rounds.server_learn(server, reports, cfg=cfg, round=1)
    expected = {n: sum(m["train_size"] * w[n] for w, m in states) / sum(m["train_size"] for _, m in states)
                for n in sent}
    slm = host_rounds.trainable_state(server.host.slm.model)
    for n in expected:
        assert_close(slm[n], expected[n], atol=1e-6, rtol=1e-5)
    assert_close(slm[n], fedavg([w for w, _ in states], [m["train_size"] for _, m in states])[n])

    # with the KD step on: the aggregated SLM learns from the LLM, then the LLM from the SLM
    cfg_kd = load_config(overrides=tiny_overrides + IDENTICAL_SLMS + ["host.name=fedcollm"])
    llog = host_rounds.server_learn(server, reports, cfg=cfg_kd, round=1)
    assert llog.metrics["host_aggregated_clients"] == 2
    assert llog.metrics["host_slm_kd_steps"] >= 1 and llog.metrics["host_llm_kd_steps"] >= 1
    assert llog.metrics["server_train_tokens"] >= llog.metrics["host_slm_kd_tokens"] + llog.metrics["host_llm_kd_tokens"]
    slm = host_rounds.trainable_state(server.host.slm.model)
    assert any(not torch.allclose(slm[n], expected[n], atol=1e-6) for n in expected)
    # ...and that SLM is what the next round sends every client
    teach2, _ = host_rounds.server_teach(server, cfg=cfg_kd, round=2)
    got, _ = decode_state(teach2.host)
    for n in slm:
        assert_close(got[n], slm[n], atol=0, rtol=0)
    # the server's SLM survives a checkpoint (resume)
    from fedlada.rounds import ServerState

    host_rounds.save_host_state(server, tmp_path)
    fresh = ServerState(server.side, server.public)
    host_rounds.load_host_state(fresh, tmp_path, cfg_kd)
    restored = host_rounds.trainable_state(fresh.host.slm.model)
    assert all(torch.equal(restored[n], slm[n]) for n in slm)


def test_bytes_benchmark_counts_what_each_host_adds(model_cache, tmp_path):
    import importlib.util
    import json

    path = CONFIGS.parent / "benchmarks" / "bench_host_bytes.py"
    spec = importlib.util.spec_from_file_location("bench_host_bytes", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bytes.json"
    res = bench.main(["--candidates", "4", "--topk", "8,32", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    rows = {r["method"]: r for r in res["rows"]}
    lada = rows["LaDa (paths + scalars)"]
    assert lada["payload_down"] == lada["payload_up"] == 0 and lada["x_lada"] == 1.0
    tokens = res["path_tokens_per_direction"]
    for k in (8, 32):
        r = rows[f"FedMKT-like, top-{k} logits"]
        # fp16 value + uint16 id per kept logit per path token, plus a small header and per-path scalars
        assert tokens * k * 4 < r["payload_down"] < tokens * k * 4 + 1500
        assert r["server_to_client"] - lada["server_to_client"] > r["payload_down"]  # base64 in the JSON
    assert rows["FedMKT-like, top-32 logits"]["total"] > rows["FedMKT-like, top-8 logits"]["total"] > lada["total"]
    adapters = rows["FedCoLLM-like, float32 adapters"]
    assert adapters["payload_up"] > 4 * res["slm_trainable_params"]


def test_fedcollm_compares_loaded_slms_by_source_not_by_tiny_shape_fields():
    same = ["host.name=fedcollm", "models.llm.source=/models/llm", "models.slms.0.source=/models/slm",
            "models.slms.1.source=/models/slm", "models.slms.2.source=/models/slm"]
    host_rounds.check_host_config(load_config(None, same))  # the default tiny shapes differ but do not apply
    with pytest.raises(ConfigError, match=r"differs from client 0's in source"):
        host_rounds.check_host_config(load_config(None, same + ["models.slms.2.source=/models/other"]))
    # LoRA keys say nothing about fully fine-tuned SLMs; with adapters they must agree
    host_rounds.check_host_config(load_config(None, same + ["models.slms.1.lora_r=4"]))
    with pytest.raises(ConfigError, match=r"differs from client 0's in lora_r \(4 vs 8\)"):
        host_rounds.check_host_config(load_config(None, same + [f"models.slms.{k}.lora=true" for k in range(3)]
                                                  + ["models.slms.1.lora_r=4"]))
    # tiny SLMs beside a loaded LLM: settled once both are loaded (an exported SLM carries the tiny tokenizer)
    host_rounds.check_host_config(load_config(None, ["host.name=fedmkt", "models.llm.source=/models/llm"]))


def test_loaded_tokenizers_are_compared_before_any_round(tiny_pair, tmp_path, caplog):
    """A tiny model beside a loaded one: the same tokenizer (an exported SLM) runs; another is refused naming what
    differs; one vocabulary with two eos tokens (an instruct LLM, a base SLM) is warned about under FedMKT."""
    import copy
    import logging

    from fedlada.models import train_tokenizer

    tok = tiny_pair[0]
    cfg = load_config(None, ["host.name=fedmkt", "models.llm.source=/models/llm"])
    looked_up = []
    real = host_rounds._tokenizer_fingerprint_of
    host_rounds._tokenizer_fingerprint_of = lambda src, gguf: looked_up.append(src) or real(src, gguf)
    try:  # a tiny spec has no folder to read ("tiny" was looked up on the hub: 30-50 s of retries offline)
        host_rounds.check_host_config(cfg)
    finally:
        host_rounds._tokenizer_fingerprint_of = real
    assert "tiny" not in looked_up
    host_rounds.check_loaded_tokenizers(cfg, 0, tok, copy.deepcopy(tok))
    other = train_tokenizer([f"{i} plus {i} is {2 * i}" for i in range(100)], vocab_size=120)
    with pytest.raises(ConfigError, match=r"client 1's SLM .* use different tokenizers \(\d+ vs \d+ tokens; only "):
        host_rounds.check_loaded_tokenizers(cfg, 1, tok, other)
    host_rounds.check_loaded_tokenizers(load_config(None, ["host.name=none"]), 1, tok, other)  # LaDa alone: text
    base = copy.deepcopy(tok)
    base.eos_token = base.pad_token  # a token both vocabularies hold: the same fingerprint, another eos
    with caplog.at_level(logging.WARNING, logger="fedlada.host_rounds"):
        host_rounds.check_loaded_tokenizers(cfg, 2, tok, base)
    assert "two eos tokens" in caplog.text and "client 2's SLM" in caplog.text


def test_loaded_models_with_different_tokenizers_are_refused_before_any_work(tmp_path):
    import shutil

    from fedlada.models import train_tokenizer

    texts = [f"Question: {i} apples and {i + 3} pears. Answer: {2 * i + 3}" for i in range(200)]
    for name, vocab in (("a", 300), ("b", 280)):
        train_tokenizer(texts, vocab_size=vocab).save_pretrained(tmp_path / name)
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")  # another folder, the same tokenizer
    base = ["host.name=fedmkt", f"models.llm.source={tmp_path / 'a'}"]
    slms = [f"models.slms.{k}.source={tmp_path / 'a-copy'}" for k in range(3)]
    host_rounds.check_host_config(load_config(None, base + slms))
    with pytest.raises(ConfigError, match=r"client 1's SLM \(.*b\) and the LLM \(.*a\) use different tokenizers"):
        host_rounds.check_host_config(load_config(None, base + slms + [f"models.slms.1.source={tmp_path / 'b'}"]))
    # unreadable here (no such folder): left to the model load, which names the missing path
    host_rounds.check_host_config(load_config(None, base + slms + [f"models.slms.1.source={tmp_path / 'nope'}"]))


def test_a_host_payload_that_does_not_fit_the_receiver_is_refused_as_a_message_error():
    """Recorded as host_rejected_client{k} by server_learn (that client's host part is skipped), not a crash."""
    import numpy as np

    from fedlada.hosts import TopK, encode_topk
    from fedlada.messages import MessageError, PathItem

    class Tok:  # a 10-token vocabulary
        def __len__(self):
            return 10

        def get_vocab(self):
            return {str(i): i for i in range(10)}

    tok = Tok()
    meta = {"tokenizer": tokenizer_fingerprint(tok)}
    entry = TopK(0, 1.0, np.zeros((2, 3), np.float16), np.array([[1, 2, 12], [0, 1, 2]]))
    paths = [PathItem("q", "x", -1.0, 2)]
    with pytest.raises(MessageError, match="top-k token ids outside the LLM's vocabulary of 10"):
        host_rounds._topk_by_question(encode_topk([entry], k=3, meta=meta), paths, tok, where="w", sender="c",
                                      receiver="the LLM")
    mine = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
    for theirs, fragment in (({"w": torch.zeros(3, 3)}, "missing 'b'"),
                             ({**mine, "x": torch.zeros(1)}, "unknown 'x'"),
                             ({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, "'w' of shape (2, 3), expected (3, 3)")):
        with pytest.raises(MessageError, match=re.escape(f"do not fit the server's copy ({fragment}")):
            host_rounds._check_fits(theirs, mine, "w")
    host_rounds._check_fits(mine, mine, "w")
