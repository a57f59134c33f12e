"""Tests for fedlada.filter: gaps, features, the exploration-exploitation filter, cold start, rewards, summaries."""

import io
import json
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fedlada.errors import ConfigError
from fedlada.filter import (
    FEATURE_VERSION,
    LearnabilityFilter,
    build_features,
    feature_names,
    kmeans,
    learnability_gap,
    novelty_gap,
    perplexity_reward,
    sample_rewards,
    summarize,
)


def _sign_task(n=200, f=6, seed=0):
    """Features ~ N(0,1); reward +1 where feature 0 > 0, else -1."""
    x = np.random.default_rng(seed).normal(size=(n, f)).astype(np.float32)
    return x, np.where(x[:, 0] > 0, 1.0, -1.0)


def _trained(seed=0, alpha=0.1, **kw):
    x, r = _sign_task()
    filt = LearnabilityFilter(x.shape[1], hidden=32, alpha=alpha, lr=1e-2, seed=seed, **kw)
    filt.observe(x, r)
    return filt, filt.fit()


def test_learnability_gap_is_receiver_minus_teacher():
    g = learnability_gap([2.0, 1.5, np.nan], [0.5, 1.5, 1.0])
    assert_close(g[:2], np.array([1.5, 0.0]))
    assert np.isnan(g[2])


def test_novelty_gap_masks_wrong_paths_with_nan():
    n = novelty_gap(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.5, 0.2]), np.array([True, True, False]))
    assert_close(n[:2], np.array([2.0, -0.5]))
    assert np.isnan(n[2])


def test_gap_shape_mismatch_raises():
    with pytest.raises(ValueError, match="nll_teacher"):
        learnability_gap([1.0, 2.0], [1.0])


def test_build_features_hand_computed():
    emb = np.array([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]])
    phi = build_features(emb, {"b": np.array([1.0, 2.0, 3.0]), "a": np.array([1.0, np.nan, 3.0])})
    # layout: emb0 emb1 | z:a z:b | missing:a missing:b  (scalars sorted by name)
    assert phi.shape == (3, 6) and phi.dtype == np.float32
    assert feature_names(2, ["b", "a"]) == ["emb0", "emb1", "z:a", "z:b", "missing:a", "missing:b"]
    assert_close(phi[:, :2], np.array([[0.6, 0.8], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32))
    assert_close(phi[:, 2], np.array([-1.0, 0.0, 1.0], dtype=np.float32))  # a: z over {1, 3}; NaN -> 0
    s = math.sqrt(2 / 3)
    assert_close(phi[:, 3], np.array([-1 / s, 0.0, 1 / s], dtype=np.float32))
    assert_close(phi[:, 4], np.array([0.0, 1.0, 0.0], dtype=np.float32))
    assert_close(phi[:, 5], np.zeros(3, dtype=np.float32))


def test_feature_width_constant_with_and_without_nans():
    rng = np.random.default_rng(0)
    clean = build_features(rng.normal(size=(5, 4)), {"g": rng.normal(size=5), "ok": np.ones(5, bool)})
    gappy = build_features(rng.normal(size=(7, 4)), {"g": np.full(7, np.nan), "ok": np.zeros(7, bool)})
    assert clean.shape == (5, 8) and gappy.shape == (7, 8)
    assert np.isfinite(gappy).all() and (gappy[:, 6] == 1).all() and (clean[:, 6:] == 0).all()
    assert (clean[:, 5] == 0).all()  # constant scalar -> zeros, not NaN
    assert isinstance(FEATURE_VERSION, str)


def test_budget_and_threshold_exact_counts():
    filt, _ = _trained(min_count=0, budget=0.1)
    x, _ = _sign_task(n=100, seed=1)
    sel = filt.select([f"q{i}" for i in range(100)], x, round=2)
    passed = sel.probs > 0.5
    assert passed.sum() > 10  # enough pass that the budget binds
    assert sel.selected.sum() == 10
    assert (sel.probs[sel.selected] > 0.5).all()
    # the selected are the top-10 scores
    assert set(np.argsort(-sel.scores, kind="stable")[:10]) == set(np.flatnonzero(sel.selected))
    assert sum(r.startswith("over budget") for r in sel.reasons) == passed.sum() - 10
    assert all(r.startswith("below threshold") for r, p in zip(sel.reasons, passed) if not p)


def test_threshold_respected_when_budget_is_loose():
    filt, _ = _trained(min_count=0, budget=1.0, threshold=0.7)
    x, _ = _sign_task(n=100, seed=1)
    sel = filt.select([str(i) for i in range(100)], x, round=2)
    assert_close(sel.selected, sel.probs > 0.7)
    assert 0 < sel.selected.sum() < 100


def test_an_empty_learned_selection_is_warned_about(caplog):
    filt, _ = _trained(min_count=0, budget=1.0, threshold=0.999999)
    x, _ = _sign_task(n=20, seed=1)
    with caplog.at_level("WARNING", logger="fedlada.filter"):
        sel = filt.select([str(i) for i in range(20)], x, round=2)
    assert not sel.selected.any()
    assert "nothing selected of 20" in caplog.text and "raise lada.min_count" in caplog.text


def test_min_count_fills_with_top_scores():
    filt, _ = _trained(min_count=30, budget=0.5, threshold=0.99)
    x, _ = _sign_task(n=40, seed=1)
    sel = filt.select([str(i) for i in range(40)], x, round=2)
    assert (sel.probs <= 0.99).all()  # nothing passes: everything selected is a fill
    assert sel.selected.sum() == 30
    assert set(np.argsort(-sel.scores, kind="stable")[:30]) == set(np.flatnonzero(sel.selected))
    assert sum(r.startswith("min-count fill") for r in sel.reasons) == 30
    # min_count larger than N selects everything
    small = filt.select(["a", "b", "c"], x[:3], round=2)
    assert small.selected.all()


def test_learned_filter_prefers_positive_items_and_mse_drops():
    filt, stats = _trained()
    assert stats["pool_size"] == 200 and stats["reward_scale"] == pytest.approx(1.0)
    assert stats["exploit_mse"] < 0.5 * stats["exploit_mse_initial"]
    x, _ = _sign_task(n=200, seed=3)
    sel = filt.select([str(i) for i in range(200)], x, round=2)
    assert sel.selected.sum() == 80  # budget 0.4 binds: about 100 items are positive
    assert (x[sel.selected, 0] > 0).mean() >= 0.9
    # a second fit on the same pool lowers the error further
    assert filt.fit()["exploit_mse"] < stats["exploit_mse"]


def test_a_diverged_fit_is_warned_about(caplog):
    x, r = _sign_task()
    filt = LearnabilityFilter(x.shape[1], hidden=32, lr=1e12, seed=0)
    filt.observe(x, r * 1e3)
    with caplog.at_level("WARNING"):
        stats = filt.fit()
    assert not math.isfinite(stats["exploit_mse"]) or not math.isfinite(stats["explore_mse"])
    assert "diverged" in caplog.text and "lower lada.filter_lr" in caplog.text


def test_reward_scale_does_not_change_decisions():
    """Rewards x100 -> targets identical after RMS scaling -> identical scores."""
    x, r = _sign_task()
    a = LearnabilityFilter(6, hidden=16, seed=4)
    b = LearnabilityFilter(6, hidden=16, seed=4)
    a.observe(x, r)
    b.observe(x, 100 * r)
    a.fit()
    assert b.fit()["reward_scale"] == pytest.approx(100.0)
    ids = [str(i) for i in range(200)]
    assert_close(a.select(ids, x, round=2).scores, b.select(ids, x, round=2).scores)


def test_explore_term_enters_only_as_alpha_times_f2():
    filt, _ = _trained(alpha=0.5)
    x, _ = _sign_task(n=50, seed=5)
    ids = [str(i) for i in range(50)]
    sel = filt.select(ids, x, round=2)
    assert np.abs(sel.explore).max() > 0
    assert_close(sel.scores, sel.exploit + 0.5 * sel.explore)
    greedy = LearnabilityFilter(6, hidden=32, alpha=0.0, seed=99)
    greedy.load_state_dict(filt.state_dict())
    sel0 = greedy.select(ids, x, round=2)
    assert_close(sel0.exploit, sel.exploit)
    assert_close(sel0.scores, sel0.exploit)


def test_nan_policy_zero_vs_drop():
    filt, _ = _trained(min_count=0, budget=1.0)
    x, _ = _sign_task(n=20, seed=6)
    x[3, 1] = np.nan
    ids = [str(i) for i in range(20)]
    zero = filt.select(ids, x, round=2)
    assert np.isfinite(zero.scores).all()
    drop = LearnabilityFilter(6, hidden=32, seed=0, min_count=0, budget=1.0, nan_policy="drop")
    drop.load_state_dict(filt.state_dict())
    dropped = drop.select(ids, x, round=2)
    assert not dropped.selected[3] and np.isnan(dropped.scores[3]) and dropped.reasons[3].startswith("dropped")
    others = np.arange(20) != 3
    assert_close(dropped.scores[others], zero.scores[others])


def test_cold_start_picks_budgeted_count_deterministically():
    x = np.random.default_rng(7).normal(size=(100, 5))
    ids = [f"q{i}" for i in range(100)]
    a = LearnabilityFilter(5, budget=0.3, seed=1).select(ids, x, round=1)
    b = LearnabilityFilter(5, budget=0.3, seed=1).select(ids, x, round=1)
    assert a.cold_start and a.selected.sum() == 30
    assert len(set(a.selected_ids)) == 30
    assert_close(a.selected, b.selected)
    assert a.reasons == b.reasons
    assert np.isnan(a.scores).all()
    assert all(r.startswith("cold-start") for r in a.reasons)
    # with k = 30 clusters, every selected sample is the one nearest its centroid
    assert all("cold-start: nearest to centroid" in r for r, s in zip(a.reasons, a.selected) if s)


def test_cold_start_with_few_clusters_fills_round_robin():
    x = np.random.default_rng(8).normal(size=(60, 3))
    sel = LearnabilityFilter(3, budget=0.5, min_count=0, cold_start_clusters=4, seed=0).select(
        [str(i) for i in range(60)], x, round=1)
    assert sel.selected.sum() == 30
    nearest = [r for r, s in zip(sel.reasons, sel.selected) if s and "cold-start: nearest" in r]
    assert len(nearest) == 4


def test_cold_start_covers_separated_clusters():
    """Four tight, far-apart blobs and a budget of 4 -> one sample from each blob."""
    rng = np.random.default_rng(9)
    centres = np.array([[10, 0], [-10, 0], [0, 10], [0, -10]], dtype=float)
    x = np.concatenate([c + 0.1 * rng.normal(size=(25, 2)) for c in centres])
    sel = LearnabilityFilter(2, budget=0.04, min_count=0, seed=0).select([str(i) for i in range(100)], x, round=1)
    assert sorted(np.flatnonzero(sel.selected) // 25) == [0, 1, 2, 3]


def test_kmeans_recovers_blobs():
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.normal(size=(30, 2)) * 0.1, rng.normal(size=(30, 2)) * 0.1 + 5])
    centroids, labels = kmeans(x, 2, seed=0)
    assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1 and labels[0] != labels[30]
    assert_close(np.sort(centroids[:, 0]), np.array([x[:30, 0].mean(), x[30:, 0].mean()]))
    # stopped before converging: the labels returned are those of the centroids returned
    spread = np.random.default_rng(1).normal(size=(200, 2))
    centroids, labels = kmeans(spread, 7, seed=0, iters=1)
    nearest = ((spread[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(labels, nearest)


def test_same_seed_same_selection():
    (a, ra), (b, rb) = _trained(seed=3), _trained(seed=3)
    assert ra == rb
    x, _ = _sign_task(n=60, seed=11)
    ids = [str(i) for i in range(60)]
    sa, sb = a.select(ids, x, round=2), b.select(ids, x, round=2)
    assert_close(sa.scores, sb.scores, rtol=0, atol=0)
    assert sa.reasons == sb.reasons


def test_state_dict_round_trip_gives_identical_future():
    a, _ = _trained(seed=2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LearnabilityFilter(6, hidden=32, lr=1e-2, seed=123)  # another seed: the state must carry everything
    b.load_state_dict(torch.load(buf, weights_only=True))
    x, r = _sign_task(n=80, seed=12)
    ids = [str(i) for i in range(80)]
    assert_close(a.select(ids, x, round=2).scores, b.select(ids, x, round=2).scores, rtol=0, atol=0)
    a.observe(x, r)
    b.observe(x, r)
    assert a.fit() == b.fit()
    sa, sb = a.select(ids, x, round=3), b.select(ids, x, round=3)
    assert_close(sa.scores, sb.scores, rtol=0, atol=0)
    assert sa.reasons == sb.reasons


def test_load_state_rejects_other_feature_dim():
    a, _ = _trained()
    with pytest.raises(ConfigError, match="feature_dim"):
        LearnabilityFilter(7, hidden=32).load_state_dict(a.state_dict())


def test_bad_hyperparameters_raise_config_error():
    with pytest.raises(ConfigError, match="budget"):
        LearnabilityFilter(4, budget=0.0)
    with pytest.raises(ConfigError, match="nan_policy"):
        LearnabilityFilter(4, nan_policy="ignore")


def test_reasons_for_every_sample_and_summary_is_json():
    filt, _ = _trained(min_count=0, budget=0.2)
    x, _ = _sign_task(n=50, seed=13)
    ids = [str(i) for i in range(50)]
    sel = filt.select(ids, x, round=2)
    assert len(sel.reasons) == 50 and all(isinstance(r, str) and r for r in sel.reasons)
    gap = np.where(np.arange(50) % 5 == 0, np.nan, x[:, 0])
    summary = summarize(sel, {"learnability": gap})
    json.dumps(summary, allow_nan=False)
    assert summary["num_candidates"] == 50 and summary["num_selected"] == 10
    assert summary["selected_fraction"] == pytest.approx(0.2)
    assert sum(summary["reasons"].values()) == 50
    g = summary["gaps"]["learnability"]["selected"]
    assert g["count"] == int(np.isfinite(gap[sel.selected]).sum())
    assert g["mean"] == pytest.approx(float(np.nanmean(gap[sel.selected])))
    assert g["mean"] > summary["gaps"]["learnability"]["rejected"]["mean"]  # the filter learned feature 0 > 0
    cold = LearnabilityFilter(6, seed=0).select(ids, x, round=1)
    cold_summary = summarize(cold, {"all_nan": np.full(50, np.nan)})
    json.dumps(cold_summary, allow_nan=False)
    assert cold_summary["score"]["selected"]["mean"] is None
    assert cold_summary["gaps"]["all_nan"]["rejected"] == {"count": 0, "mean": None, "q10": None, "q50": None,
                                                           "q90": None}
    rows = sel.to_rows()
    json.dumps(rows, allow_nan=False)
    assert [r["id"] for r in rows if r["selected"]] == sel.selected_ids


def test_perplexity_reward_hand_computed():
    before = np.log(np.array([4.0, 6.0]))  # perplexities 4, 6 -> mean 5
    after = np.log(np.array([2.0, 4.0]))  # -> mean 3
    assert perplexity_reward(before, after) == pytest.approx(2.0)
    assert perplexity_reward(after, before) == pytest.approx(-2.0)
    with pytest.raises(ValueError):
        perplexity_reward([np.nan], [1.0])
    with pytest.raises(ValueError, match="the same held-out slice, got 2 and 1 values"):
        perplexity_reward(before, after[:1])


def test_odd_filter_arguments_states_and_rewards_fail_clearly_or_scale():
    for kw, fragment in ((dict(seed=-1), "seed must be an integer >= 0"),
                         (dict(feature_dim=True), "feature_dim must be an integer >= 1"),
                         (dict(min_count=True), "min_count must be an integer >= 0")):
        with pytest.raises(ConfigError, match=fragment):
            LearnabilityFilter(**{"feature_dim": 4, **kw})
    f = LearnabilityFilter(4, seed=0)
    f.observe(np.random.default_rng(0).random((10, 4)), np.full(10, 1e200))  # squares overflow a float64
    assert f.fit()["reward_scale"] == pytest.approx(1e200)
    state = f.state_dict()
    state["pool_features"] = torch.zeros(10, 5)
    with pytest.raises(ConfigError, match=r"pool_features \[10, 5\] and 10 reward\(s\) do not fit feature_dim=4"):
        LearnabilityFilter(4).load_state_dict(state)


def test_sample_rewards_hand_computed():
    r = sample_rewards(2.0, np.array([1.0, -1.0, np.nan]), mix=0.25)
    assert_close(r, np.array([0.25 * 2 + 0.75 * 1, 0.25 * 2 - 0.75, 2.0]))
    assert_close(sample_rewards(3.0, np.array([5.0]), mix=1.0), np.array([3.0]))
    # R unknown (no held-out slice): the improvements alone, not R = 0; both unknown: NaN, which observe() skips
    r = sample_rewards(float("nan"), np.array([1.5, np.nan]), mix=0.25)
    assert r[0] == 1.5 and np.isnan(r[1])
    with pytest.raises(ValueError):
        sample_rewards(1.0, np.zeros(2), mix=1.5)


def test_filter_leaves_global_rngs_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(0)
    np.random.seed(0)
    filt, _ = _trained()
    filt.select(["a", "b", "c"], np.zeros((3, 6)), round=2)
    LearnabilityFilter(6).select(["a", "b", "c"], np.eye(3, 6), round=1)
    assert_close(torch.rand(3), expected[0])
    assert_close(np.random.rand(3), expected[1])


def test_selection_cap_and_random_baseline_move_as_much_as_the_filter():
    from fedlada.filter import selection_cap
    from fedlada.rounds import _select

    assert selection_cap(10, 10, budget=0.25, min_count=0) == 3  # ceil(2.5)
    assert selection_cap(10, 10, budget=0.25, min_count=5) == 5  # the minimum count wins
    assert selection_cap(10, 2, budget=0.1, min_count=5) == 2  # but never more than the usable rows
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 4))
    ids = [f"q{i}" for i in range(20)]
    flt = LearnabilityFilter(4, budget=0.1, min_count=6, seed=0)
    cold = _select("lada", flt, ids, feats, round=1, budget=0.1, seed=1)
    rand = _select("random", flt, ids, feats, round=1, budget=0.1, seed=1)
    assert cold.selected.sum() == rand.selected.sum() == 6


def test_filter_settings_of_the_wrong_type_are_config_errors():
    from fedlada.errors import ConfigError

    for key in ("alpha", "threshold", "budget", "lr"):
        with pytest.raises(ConfigError, match=f"filter: {key} must be"):
            LearnabilityFilter(4, **{key: "0.5"})


def test_library_misuse_gets_a_clear_error():
    from fedlada.hosts import encode_state
    from fedlada.paths import sample_paths

    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float16', got 'int8'"):
        encode_state({"w": torch.zeros(2)}, dtype="int8")
    with pytest.raises(TypeError, match="not one string"):
        sample_paths(None, None, "one prompt", num_paths=1)


def test_misused_helpers_name_their_argument():
    from fedlada.filter import kmeans
    from fedlada.messages import MessageError, ReportMessage
    from fedlada.models import build_tiny_model
    from fedlada.prepare import split_holdout

    with pytest.raises(ValueError, match=r"kmeans: k must be an integer in 1..3"):
        kmeans(np.zeros((3, 2)), 4, seed=0)
    with pytest.raises(ValueError, match="split_holdout: size must be >= 1"):
        split_holdout([], size=-1, seed=0)
    with pytest.raises(ConfigError, match="num_heads must divide hidden_size"):
        build_tiny_model(None, hidden_size=0, num_layers=1, num_heads=1)
    with pytest.raises(MessageError, match="metric 'note' must be a number or None"):
        ReportMessage(1, 0, metrics={"note": "text"})
