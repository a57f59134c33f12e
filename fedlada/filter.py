"""Model learnability-aware data filter (LaDa, "Model learnability-aware data filter").

What this file implements, top to bottom:

- the two gaps: learnability gap g = l(y^L; pi_k) - l(y^L; pi_L) for LLM -> SLM, novelty gap
  n = l(y^k; pi_L) - l(y^k; pi_k) for SLM -> LLM (NaN where the client's path is wrong);
- ``build_features``: the filter's input phi(x) = [L2-normalised question embedding | z-scored scalars |
  is-missing indicators], with a constant layout;
- ``LearnabilityFilter``: an EE-Net style exploration-exploitation filter. ExploitNet f1 predicts the reward of
  a sample; ExploreNet f2 reads f1's hidden activations (detached) and predicts f1's residual r - f1(phi). Score
  s = f1 + alpha * f2; a sample is kept when sigmoid(s) > threshold, within a budget and above a minimum count.
  Before the first fit (no rewards yet) it cold-starts with k-means++ on phi;
- rewards: ``perplexity_reward`` (receiver perplexity drop on held-out data) and ``sample_rewards`` (per-sample
  labels), and ``summarize`` for reports and metrics.

Where we depart from, or fill in, the paper (whose exact equations are not available to us):

- Reward units and the 0.5 threshold. Rewards may be on any scale, so targets are divided by the replay pool's
  root-mean-square reward (a scale, never a shift) before training. Reward 0 therefore maps to s = 0, and
  sigmoid(s) > 0.5 reads "predicted to improve the receiver"; a threshold p means "predicted reward above
  logit(p) pool-RMS units" (0.73 -> one RMS). ``Selection.scores`` holds s in those units.
- ExploreNet input. EE-Net feeds f2 the gradient of f1; the LaDa paper says "hidden activations of f1", which is
  what we use (cheaper, and the same for every sample size).
- Training. Each ``fit`` trains f1 for ``epochs`` epochs on the whole pool, then f2 for ``epochs`` epochs on the
  residuals of the final f1 (so f2 explains the f1 that ``select`` uses). Nets are warm-started across rounds;
  each fit uses a fresh Adam (no optimiser state to resume) and a shuffle generator seeded by (seed, fit index).
- Budget vs minimum count. At most ceil(budget * N) items, at least min(min_count, eligible) items; when the two
  disagree the minimum count wins.
- Cold start. k = min(target, cold_start_clusters) clusters, where target is the budgeted count; samples are taken
  round-robin over clusters, nearest to each centroid first, until the target is filled. With k = target (the
  default for target <= 256) this is exactly "the sample nearest each centroid". Cold-start selections have no
  prediction: scores, exploit and explore are NaN.
- Per-call standardisation of scalar features (z-score within the candidate set): NLLs from different receivers
  use different tokenizers and drift as models train, so raw values are not comparable across rounds or receivers;
  z-scores are. The cost: the absolute level of a gap within one round is not visible to the filter.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedlada.errors import ConfigError

log = logging.getLogger(__name__)

FEATURE_VERSION = "1"  # bump when build_features' layout or normalisation changes; stored in filter state
_STATE_VERSION = 1


def _vector(name: str, x, n: int | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        want = f"({n},)" if n is not None else "(N,)"
        raise ValueError(f"{name}: expected shape {want}, got {a.shape}")
    return a


def selection_cap(n: int, n_eligible: int, *, budget: float, min_count: int) -> int:
    """How many of ``n`` candidates (``n_eligible`` of them usable) a selection may keep: ceil(budget * n), raised
    to min(min_count, n_eligible) when the minimum count asks for more. The filter's cold start fills exactly this
    many, and the ``random`` baseline draws exactly this many, so both transfer the same amount as LaDa's cap."""
    return max(math.ceil(budget * n), min(min_count, n_eligible))


def learnability_gap(nll_receiver, nll_teacher) -> np.ndarray:
    """g = l(y^L; pi_k) - l(y^L; pi_L): per-token NLL of the teacher's path under the receiver minus under the
    teacher. (N,), (N,) -> (N,) float64; NaN inputs give NaN."""
    r = _vector("nll_receiver", nll_receiver)
    return r - _vector("nll_teacher", nll_teacher, len(r))


def novelty_gap(nll_llm, nll_client, correct) -> np.ndarray:
    """n = l(y^k; pi_L) - l(y^k; pi_k), NaN where the client's path is not answer-correct. (N,) x3 -> (N,)."""
    a = _vector("nll_llm", nll_llm)
    b = _vector("nll_client", nll_client, len(a))
    ok = _vector("correct", correct, len(a)) > 0.5
    return np.where(ok, a - b, np.nan)


def build_features(embeddings, scalars: dict) -> np.ndarray:
    """phi = [embedding / ||embedding|| | z(scalar) for sorted names | is-missing(scalar) for sorted names].

    embeddings: (N, E) (E may be 0); scalars: name -> (N,) (bool allowed). Returns (N, E + 2 * len(scalars))
    float32. Each scalar is z-scored over its finite values within this call (see the module docstring for why);
    a constant scalar gives zeros; non-finite values become 0 (the mean) and set their is-missing column to 1.
    The is-missing column exists for every scalar, so F depends only on E and the scalar names.
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings: expected shape (N, E), got {emb.shape}")
    n = emb.shape[0]
    emb = np.where(np.isfinite(emb), emb, 0.0)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.divide(emb, norm, out=np.zeros_like(emb), where=norm > 0)
    zs, missing = [], []
    for name in sorted(scalars):
        v = _vector(f"scalars[{name!r}]", scalars[name], n)
        ok = np.isfinite(v)
        z = np.zeros(n)
        if ok.any():
            mu, sd = v[ok].mean(), v[ok].std()
            if sd > 1e-12:
                z[ok] = (v[ok] - mu) / sd
        zs.append(z)
        missing.append((~ok).astype(np.float64))
    cols = [emb] + [np.stack(c, axis=1) for c in (zs, missing) if c]
    return np.concatenate(cols, axis=1).astype(np.float32)


def feature_names(embedding_dim: int, scalar_names) -> list[str]:
    """Column names of ``build_features``' output, in order (for reports)."""
    names = sorted(scalar_names)
    return [f"emb{i}" for i in range(embedding_dim)] + [f"z:{s}" for s in names] + [f"missing:{s}" for s in names]


def kmeans(x: np.ndarray, k: int, *, seed: int, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means++ initialisation + Lloyd iterations. x (N, F), 1 <= k <= N -> (centroids (k, F), labels (N,)).

    An empty cluster keeps its previous centroid. Deterministic for a seed (ties go to the lower index)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= n):
        raise ValueError(f"kmeans: k must be an integer in 1..{n} (the number of points), got {k!r}")
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            idx = int(rng.choice(n, p=d2 / total))
        else:  # every point coincides with a centre: pick any point not chosen yet
            idx = int(rng.choice(np.setdiff1d(np.arange(n), chosen)))
        chosen.append(idx)
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    centroids = x[chosen].copy()
    labels = np.full(n, -1)
    def nearest(c: np.ndarray) -> np.ndarray:
        return ((x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]).argmin(1)

    for _ in range(iters):
        new = nearest(centroids)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = labels == c
            if members.any():
                centroids[c] = x[members].mean(0)
    else:  # out of iterations before converging: the labels of the centroids returned
        labels = nearest(centroids)
    return centroids, labels


def _json_float(v) -> float | None:
    return float(v) if math.isfinite(v) else None


def _ordinal(i: int) -> str:
    suffix = "th" if 10 <= i % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
    return f"{i}{suffix}"


@dataclass
class Selection:
    """One filter decision over N candidates. scores = f1 + alpha * f2 in pool-RMS reward units (NaN where no
    prediction was made: cold start, dropped rows); exploit = f1, explore = f2; reasons: one string per sample,
    "<kind>: <details>" with kind in cold-start, cold-start skip, kept, below threshold, over budget,
    min-count fill, dropped."""

    ids: list[str]
    selected: np.ndarray  # (N,) bool
    scores: np.ndarray  # (N,) float64
    exploit: np.ndarray  # (N,)
    explore: np.ndarray  # (N,)
    reasons: list[str]
    round: int = 0
    cold_start: bool = False

    @property
    def probs(self) -> np.ndarray:
        """sigmoid(scores), the quantity compared with the threshold. (N,)"""
        return 1.0 / (1.0 + np.exp(-self.scores))

    @property
    def selected_ids(self) -> list[str]:
        return [i for i, keep in zip(self.ids, self.selected) if keep]

    def to_rows(self) -> list[dict]:
        """One JSON-serialisable dict per candidate (NaN -> None), for the run directory."""
        f = _json_float
        return [
            {"id": i, "selected": bool(k), "score": f(s), "exploit": f(a), "explore": f(b), "reason": r}
            for i, k, s, a, b, r in zip(self.ids, self.selected, self.scores, self.exploit, self.explore, self.reasons)
        ]


class _ExploitNet(nn.Module):
    def __init__(self, feature_dim: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(feature_dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B,F) -> (B,), (B,H)
        h = torch.relu(self.hidden(x))
        return self.out(h).squeeze(-1), h


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class LearnabilityFilter:
    """Exploration-exploitation data filter for one directed pair (e.g. LLM -> client k). See the module docstring
    for how scores, threshold, budget, minimum count and the cold start are defined."""

    def __init__(self, feature_dim: int, *, hidden: int = 64, alpha: float = 0.1, threshold: float = 0.5,
                 budget: float = 0.4, min_count: int = 8, epochs: int = 10, lr: float = 1e-3, seed: int = 0,
                 batch_size: int = 32, nan_policy: str = "zero", cold_start_clusters: int = 256):
        checks = {
            "feature_dim": (feature_dim, _is_int(feature_dim) and feature_dim >= 1, "an integer >= 1"),
            "hidden": (hidden, _is_int(hidden) and hidden >= 1, "an integer >= 1"),
            "seed": (seed, _is_int(seed) and seed >= 0, "an integer >= 0"),
            "alpha": (alpha, _is_real(alpha) and math.isfinite(alpha), "a finite number"),
            "threshold": (threshold, _is_real(threshold) and 0.0 < threshold < 1.0, "in (0, 1)"),
            "budget": (budget, _is_real(budget) and 0.0 < budget <= 1.0, "a fraction in (0, 1]"),
            "min_count": (min_count, _is_int(min_count) and min_count >= 0, "an integer >= 0"),
            "epochs": (epochs, _is_int(epochs) and epochs >= 1, "an integer >= 1"),
            "lr": (lr, _is_real(lr) and math.isfinite(lr) and lr > 0, "a finite number > 0"),
            "batch_size": (batch_size, _is_int(batch_size) and batch_size >= 1, "an integer >= 1"),
            "nan_policy": (nan_policy, nan_policy in ("zero", "drop"), "'zero' or 'drop'"),
            "cold_start_clusters": (cold_start_clusters,
                                    _is_int(cold_start_clusters) and cold_start_clusters >= 1,
                                    "an integer >= 1"),
        }
        for key, (value, ok, want) in checks.items():
            if not ok:
                raise ConfigError(f"filter: {key} must be {want}, got {value!r}")
        self.feature_dim, self.hidden, self.alpha, self.threshold = feature_dim, hidden, float(alpha), threshold
        self.budget, self.min_count, self.epochs, self.lr, self.seed = budget, min_count, epochs, lr, seed
        self.batch_size, self.nan_policy, self.cold_start_clusters = batch_size, nan_policy, cold_start_clusters
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(seed, 0))
            self.exploit_net = _ExploitNet(feature_dim, hidden)
            self.explore_net = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.pool_features = torch.zeros(0, feature_dim)
        self.pool_rewards = torch.zeros(0, dtype=torch.float64)
        self.reward_scale = 1.0
        self.num_fits = 0

    @property
    def fitted(self) -> bool:
        return self.num_fits > 0

    def _matrix(self, features) -> np.ndarray:
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"features: expected shape (N, {self.feature_dim}), got {x.shape}")
        return x

    def _clean(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply nan_policy. Returns (features with non-finite -> 0, eligible (N,) bool)."""
        bad = ~np.isfinite(x).all(1)
        if bad.any():
            log.warning("filter: %d of %d rows have non-finite features (nan_policy=%s)", bad.sum(), len(x),
                        self.nan_policy)
        eligible = ~bad if self.nan_policy == "drop" else np.ones(len(x), dtype=bool)
        return np.where(np.isfinite(x), x, 0.0), eligible

    @torch.no_grad()
    def predict(self, features) -> tuple[np.ndarray, np.ndarray]:
        """f1 and f2 in pool-RMS reward units. (N, F) -> (N,), (N,); non-finite features count as 0."""
        x = np.nan_to_num(self._matrix(features), nan=0.0, posinf=0.0, neginf=0.0)
        f1, h = self.exploit_net(torch.as_tensor(x, dtype=torch.float32))
        f2 = self.explore_net(h).squeeze(-1)
        return f1.double().numpy(), f2.double().numpy()

    def select(self, ids, features, *, round: int) -> Selection:
        """Pick samples: k-means cold start until the first ``fit``, then sigmoid(f1 + alpha f2) > threshold within
        the budget and above the minimum count. Every candidate gets a reason."""
        ids = [str(i) for i in ids]
        x, eligible = self._clean(self._matrix(features))
        n = len(ids)
        if x.shape[0] != n:
            raise ValueError(f"ids and features disagree: {n} ids, {x.shape[0]} feature rows")
        if len(set(ids)) != n:
            raise ValueError("ids must be unique")
        n_ok = int(eligible.sum())
        cap = selection_cap(n, n_ok, budget=self.budget, min_count=self.min_count)
        floor = min(self.min_count, n_ok)
        nan = np.full(n, np.nan)
        reasons = ["dropped: non-finite features (nan_policy='drop')"] * n
        selected = np.zeros(n, dtype=bool)
        if not self.fitted:
            target = min(cap, n_ok)
            self._cold_start(x, eligible, target, round, selected, reasons)
            sel = Selection(ids, selected, nan.copy(), nan.copy(), nan.copy(), reasons, round=round, cold_start=True)
        else:
            f1, f2 = self.predict(x)
            s = np.where(eligible, f1 + self.alpha * f2, np.nan)
            p = 1.0 / (1.0 + np.exp(-s))
            order = [i for i in np.argsort(-np.where(eligible, s, -np.inf), kind="stable") if eligible[i]]
            thr = f"{self.threshold:g}"
            for rank, i in enumerate(order, start=1):
                if p[i] > self.threshold and rank <= cap:
                    selected[i], reasons[i] = True, f"kept: sigmoid(s)={p[i]:.2f} > {thr} (rank {rank})"
                elif p[i] > self.threshold:
                    reasons[i] = f"over budget: rank {rank} > {cap} (sigmoid(s)={p[i]:.2f})"
                elif rank <= floor:
                    selected[i] = True
                    reasons[i] = (f"min-count fill: rank {rank} <= min_count {floor} "
                                  f"(sigmoid(s)={p[i]:.2f} <= {thr})")
                else:
                    reasons[i] = f"below threshold: sigmoid(s)={p[i]:.2f} <= {thr}"
            sel = Selection(ids, selected, s, np.where(eligible, f1, np.nan), np.where(eligible, f2, np.nan),
                            reasons, round=round, cold_start=False)
            if n_ok and not selected.any():  # only with min_count = 0
                log.warning("filter round %d: nothing selected of %d (every sigmoid(s) <= threshold %s, min_count "
                            "0); an empty selection brings no reward back, so the filter cannot learn its way out "
                            "of it: raise lada.min_count or lower lada.threshold", round, n_ok, thr)
        log.info("filter round %d: selected %d of %d (%s)", round, int(selected.sum()), n,
                 "cold start" if sel.cold_start else "learned")
        return sel

    def _cold_start(self, x, eligible, target, round, selected, reasons) -> None:
        idx = np.flatnonzero(eligible)
        if target == 0:
            for i in idx:
                reasons[i] = "cold-start skip: budget is 0"
            return
        k = min(target, self.cold_start_clusters)
        centroids, labels = kmeans(x[idx], k, seed=_seed(self.seed, 1, round))
        dist = ((x[idx] - centroids[labels]) ** 2).sum(1)
        members = []
        for c in range(k):
            mine = np.flatnonzero(labels == c)
            members.append(idx[mine[np.argsort(dist[mine], kind="stable")]])
        taken = 0
        for depth in range(max(len(m) for m in members)):
            for c, m in enumerate(members):
                if depth >= len(m):
                    continue
                i = m[depth]
                what = "nearest" if depth == 0 else f"{_ordinal(depth + 1)} nearest"
                if taken < target:
                    selected[i], reasons[i] = True, f"cold-start: {what} to centroid {c}"
                    taken += 1
                else:
                    reasons[i] = f"cold-start skip: {what} to centroid {c}, budget of {target} filled"

    def observe(self, features, rewards) -> None:
        """Append (phi, r) pairs to the replay pool. (N, F), (N,). Rows with a non-finite reward are skipped;
        non-finite features follow nan_policy (zero -> set to 0, drop -> row skipped)."""
        x, eligible = self._clean(self._matrix(features))
        r = _vector("rewards", rewards, x.shape[0])
        keep = eligible & np.isfinite(r)
        if (~keep).any():
            log.warning("filter: skipped %d of %d observations (non-finite reward or features)", (~keep).sum(), len(r))
        self.pool_features = torch.cat([self.pool_features, torch.as_tensor(x[keep], dtype=torch.float32)])
        self.pool_rewards = torch.cat([self.pool_rewards, torch.as_tensor(r[keep], dtype=torch.float64)])

    def _train(self, net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, gen: torch.Generator) -> None:
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            perm = torch.randperm(len(targets), generator=gen)
            for start in range(0, len(targets), self.batch_size):
                b = perm[start:start + self.batch_size]
                out = net(inputs[b])
                pred = out[0] if isinstance(out, tuple) else out.squeeze(-1)
                loss = torch.nn.functional.mse_loss(pred, targets[b])
                opt.zero_grad()
                loss.backward()
                opt.step()

    def fit(self) -> dict:
        """Train ExploitNet, then ExploreNet on its residuals, on the whole replay pool (``epochs`` epochs each,
        Adam, mini-batches, MSE). Targets are rewards / pool RMS. Returns MSEs over the pool in those units:
        exploit_mse_initial (before this fit), exploit_mse, explore_mse (of the residual), pool_size, reward_scale.
        With an empty pool nothing is trained and the MSEs are None."""
        n = len(self.pool_rewards)
        if n == 0:
            log.warning("filter: fit() with an empty replay pool; still cold-starting")
            return {"exploit_mse_initial": None, "exploit_mse": None, "explore_mse": None, "pool_size": 0,
                    "reward_scale": self.reward_scale}
        peak = float(self.pool_rewards.abs().max())  # RMS through the peak: squares of huge rewards overflow
        rms = peak * float((self.pool_rewards / peak).pow(2).mean().sqrt()) if peak > 0 else 0.0
        self.reward_scale = rms if rms > 1e-12 else 1.0
        x, y = self.pool_features, (self.pool_rewards / self.reward_scale).float()
        gen = torch.Generator().manual_seed(_seed(self.seed, 2, self.num_fits))
        with torch.no_grad():
            before = float(torch.nn.functional.mse_loss(self.exploit_net(x)[0], y))
        self._train(self.exploit_net, x, y, gen)
        with torch.no_grad():
            f1, h = self.exploit_net(x)
            residual = y - f1
        self._train(self.explore_net, h, residual, gen)
        with torch.no_grad():
            exploit_mse = float(residual.pow(2).mean())
            explore_mse = float(torch.nn.functional.mse_loss(self.explore_net(h).squeeze(-1), residual))
        self.num_fits += 1
        result = {"exploit_mse_initial": before, "exploit_mse": exploit_mse, "explore_mse": explore_mse,
                  "pool_size": n, "reward_scale": self.reward_scale}
        if not all(math.isfinite(v) for v in (exploit_mse, explore_mse)):
            log.warning("filter: fit %d diverged (exploit MSE %s, explore MSE %s): its scores are not numbers, so "
                        "selection falls back to the minimum-count fill; lower lada.filter_lr", self.num_fits,
                        exploit_mse, explore_mse)
        log.info("filter fit %d: %s", self.num_fits, result)
        return result

    def state_dict(self) -> dict:
        """Everything needed to resume: net weights, replay pool, reward scale, fit counter, seed (tensors, numbers,
        strings only; loadable with ``torch.load(..., weights_only=True)``)."""
        return {
            "state_version": _STATE_VERSION, "feature_version": FEATURE_VERSION,
            "feature_dim": self.feature_dim, "hidden": self.hidden,
            "exploit": {k: v.detach().clone() for k, v in self.exploit_net.state_dict().items()},
            "explore": {k: v.detach().clone() for k, v in self.explore_net.state_dict().items()},
            "pool_features": self.pool_features.clone(), "pool_rewards": self.pool_rewards.clone(),
            "reward_scale": self.reward_scale, "num_fits": self.num_fits, "seed": self.seed,
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a ``state_dict``. The seed comes from the state (it drives the remaining shuffles and cold starts,
        so a resumed run continues the same trajectory); the other hyperparameters (alpha, threshold, budget, ...)
        stay those of this instance. feature_dim, hidden and the feature/state versions must match (ConfigError
        otherwise)."""
        for key, mine in (("state_version", _STATE_VERSION), ("feature_version", FEATURE_VERSION),
                          ("feature_dim", self.feature_dim), ("hidden", self.hidden)):
            if d.get(key) != mine:
                raise ConfigError(f"filter state: {key} is {d.get(key)!r}, this filter expects {mine!r}")
        feats = d["pool_features"]
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim or len(d["pool_rewards"]) != feats.shape[0]:
            raise ConfigError(f"filter state: pool_features {list(feats.shape)} and {len(d['pool_rewards'])} "
                              f"reward(s) do not fit feature_dim={self.feature_dim}")
        self.exploit_net.load_state_dict(d["exploit"])
        self.explore_net.load_state_dict(d["explore"])
        self.pool_features = d["pool_features"].clone().float()
        self.pool_rewards = d["pool_rewards"].clone().double()
        self.reward_scale, self.num_fits = float(d["reward_scale"]), int(d["num_fits"])
        if int(d["seed"]) != self.seed:
            log.info("filter: resuming with the saved seed %d instead of %d", int(d["seed"]), self.seed)
        self.seed = int(d["seed"])


def perplexity_reward(nll_before, nll_after) -> float:
    """R = mean_h exp(l_before[h]) - mean_h exp(l_after[h]): the drop in the receiver's mean per-sample perplexity
    on a held-out slice after its update. (H,), (H,) per-token NLLs in nats -> float; positive = improved."""
    b, a = _vector("nll_before", nll_before), _vector("nll_after", nll_after)
    if len(b) == 0 or len(a) == 0 or not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise ValueError("perplexity_reward: nll_before and nll_after must be non-empty and finite")
    if len(b) != len(a):
        raise ValueError(f"perplexity_reward: nll_before and nll_after must score the same held-out slice, got "
                         f"{len(b)} and {len(a)} values")
    return float(np.exp(b).mean() - np.exp(a).mean())


def perplexity_drops(nll_before, nll_after) -> np.ndarray:
    """exp(l_before[i]) - exp(l_after[i]) per sample: the per-sample counterpart of ``perplexity_reward``, in its
    units (a perplexity), so the two can be mixed in one label. (N,), (N,) per-token NLLs -> (N,); NaN stays NaN."""
    b, a = _vector("nll_before", nll_before), _vector("nll_after", nll_after)
    if len(b) != len(a):
        raise ValueError(f"perplexity_drops: {len(b)} values before but {len(a)} after")
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(b) - np.exp(a)


def sample_rewards(R: float, improvement, *, mix: float = 0.5) -> np.ndarray:
    """Per-sample reward labels r_i = mix * R + (1 - mix) * improvement_i. (N,) -> (N,) float64.

    improvement_i is the receiver's perplexity drop on sample i's chosen path (``perplexity_drops``), in R's units, so
    ``mix`` alone sets the two terms' weights (the filter then rescales all targets by one pool RMS). Where
    improvement_i is NaN (no path scored)
    the label falls back to R. Where R is NaN (unknown: the receiver had no held-out slice this round) the label is
    improvement_i alone, not a made-up R = 0; where both are NaN the label is NaN (``observe`` skips it)."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"sample_rewards: mix must be in [0, 1], got {mix!r}")
    imp = _vector("improvement", improvement)
    R = float(R)
    if not math.isfinite(R):
        return np.where(np.isfinite(imp), imp, np.nan)
    return np.where(np.isfinite(imp), mix * R + (1.0 - mix) * imp, R)


def _stats(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"count": 0, "mean": None, "q10": None, "q50": None, "q90": None}
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return {"count": int(len(v)), "mean": float(v.mean()), "q10": float(q[0]), "q50": float(q[1]),
            "q90": float(q[2])}


def summarize(selection: Selection, gaps: dict) -> dict:
    """JSON-ready summary of a selection: counts, selected fraction, reason kinds, and for the score and each gap
    (name -> (N,)) its finite count, mean and 10/50/90% quantiles over selected vs rejected samples (None if none)."""
    sel = np.asarray(selection.selected, dtype=bool)
    n = len(sel)
    kinds: dict[str, int] = {}
    for r in selection.reasons:
        kinds[r.split(":")[0]] = kinds.get(r.split(":")[0], 0) + 1
    out = {"round": int(selection.round), "cold_start": bool(selection.cold_start), "num_candidates": n,
           "num_selected": int(sel.sum()), "selected_fraction": float(sel.mean()) if n else None,
           "reasons": dict(sorted(kinds.items())), "gaps": {}}
    scores = np.asarray(selection.scores, dtype=np.float64)
    out["score"] = {"selected": _stats(scores[sel]), "rejected": _stats(scores[~sel])}
    for name in sorted(gaps):
        g = _vector(f"gaps[{name!r}]", gaps[name], n)
        out["gaps"][name] = {"selected": _stats(g[sel]), "rejected": _stats(g[~sel])}
    return out
