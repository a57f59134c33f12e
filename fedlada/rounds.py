"""One LaDa round as plain functions: server teach step, client step, server learn step, evaluation.

Per-round algorithm (LADA.md, "Per-round algorithm"), as split between the two sides here:

1. ``server_teach``: the LLM samples M paths for each candidate public question, scores them, keeps the
   answer-correct ones (rejection sampling) and broadcasts them with their LLM log-probabilities.
2. ``client_step``: the SLM samples its own paths on the candidates and scores the LLM's and its own paths;
   the client's filter picks S^{L->k} from the learnability gap and features only the client sees; the SLM trains on
   ``L_SFT(D_k) + lambda * L_DA(S^{L->k}) + mu * L_SFT(y+)`` (local SFT and distillation in one objective, so the
   transfer stays anchored in the client's domain); the reward is the drop of its perplexity on a held-out slice of
   its own data; the client replies with its answer-correct paths and their SLM scores.
3. ``server_learn``: the LLM scores the clients' paths, its filter per client picks S^{k->L} from the novelty gap,
   and the LLM (LoRA by default) trains on the union with the same contrastive loss, roles swapped; its reward is
   the perplexity drop on a held-out slice of the received paths.

Departures and choices [ours] (the knobs are in ``fedlada.config``; the fixed rules below are not configurable):
- The candidate set is a seeded subset of the public pool each round (``lada.candidates_per_round``), so cost per
  round does not grow with the pool.
- Chosen path for the client: among the LLM's correct paths, the one with the lowest SLM per-token NLL (the most
  learnable one); rejected: the SLM's own wrong path with the highest SLM per-token log-probability (its most
  confident mistake, length-normalised). No wrong own path -> the sample only enters the mu-weighted SFT term. The
  server's choice mirrors it: the client's most confident correct path (lowest SLM per-token NLL) against the LLM's
  wrong path with the highest LLM per-token log-probability. (Fixed rules.)
- The server's reward slice (LaDa's methods only) is a seeded 20% of the questions the clients sent this round,
  drawn over all clients at once, so no client's path on a held-out question is trained on (none when they sent
  fewer than 5: the reward R is then unknown, recorded as null, and the filter learns from the per-sample
  improvements alone). Per-sample improvements are perplexity drops, in R's units. The server keeps only reported
  paths on this round's candidates whose answer is correct (it holds the public answers).
- The reward is measured after the receiver's whole update, so on a client it also carries that round's local SFT:
  it ranks rounds and samples by what followed them, not by a controlled ablation of each selection.
- Baselines run on the same loop: ``local`` (no exchange: the server's teach message and the clients' reports are
  sent empty, about 150 bytes a client a round), ``all`` (no filter), ``random`` (random selection at LaDa's
  budget), ``lada-sft`` (LaDa's filter, SFT at weight 1 on the other side's paths instead of the contrastive term:
  ``lada.lambda_da`` and ``lada.mu`` are fixed and may not be set).

Seeds are derived from (run seed, round, client, purpose) by :func:`derive_seed`, so a resumed run replays the
same random choices as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fedlada import reasoning, selection
from fedlada.config import METHODS, RunConfig
from fedlada.data import Record
from fedlada.errors import DataError
from fedlada.filter import (LearnabilityFilter, Selection, build_features, learnability_gap, novelty_gap,
                            perplexity_drops, perplexity_reward, sample_rewards, selection_cap, summarize)
from fedlada.generation import GenerationBackend
from fedlada.messages import PathItem, ReportMessage, TeachMessage
from fedlada.paths import question_embeddings, sample_paths, score_paths
from fedlada.prepare import SAID_PER_CLIENT
from fedlada.train import ListwiseExample, PreferenceExample, SFTExample, train

log = logging.getLogger(__name__)


def _secs(t0: float) -> float:
    # (a helper because ``round`` is a parameter name throughout this module)
    return float(f"{time.perf_counter() - t0:.2f}")


def _r2(x: float) -> float:
    return float(f"{x:.2f}")

# ``progress(done, total)``: called by a round function as its longest part advances (the training loop's
# optimizer steps; server_teach: after sampling and after scoring), e.g. to drive a progress bar
Progress = Callable[[int, int], None]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from the run seed and any labels (round, client, purpose); stable across processes. Integral
    numbers count by value, so ``np.int64(1)`` gives the seed of ``1``."""
    plain = tuple(int(p) if isinstance(p, numbers.Integral) and not isinstance(p, bool) else p for p in (seed, *parts))
    h = hashlib.sha256(repr(plain).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass
class Side:
    """A model with its tokenizer and prompt formatter (one per client, one for the server)."""

    model: Any
    tokenizer: Any
    formatter: Any  # fedlada.models.PromptFormatter: question -> prompt text

    def prompts(self, questions: list[str]) -> list[str]:
        return [self.formatter(q) for q in questions]


_lengths_memo: dict | None = None  # set inside ``same_records``
_cut_lines: list[str] | None = None  # the files whose paths are cut, within ``same_records``


@contextlib.contextmanager
def same_records():
    """Within this block, ``prompt_lengths`` of one records list under an equal tokenizer and prompt format is
    computed once (a run's set-up checks the public pool under every client's SLM: clients sharing a model would
    tokenise it again each). The lists must not change meanwhile; the memo holds them, so their ids stay theirs."""
    global _lengths_memo, _cut_lines
    outer = _lengths_memo
    _lengths_memo = {} if outer is None else outer
    if outer is None:
        _cut_lines = []
    try:
        yield
    finally:
        _lengths_memo = outer
        if outer is None:
            rest, _cut_lines = _cut_lines[SAID_PER_CLIENT:], None
            if rest:  # a federation of many clients: the first few said, the rest in one line
                log.warning("... and %d more file(s) with paths cut by train.max_length: %s", len(rest),
                            ", ".join(rest))


def prompt_lengths(side: Side, records: list[Record]) -> list[int]:
    """Tokens of each record's prompt under ``side`` (its formatter and tokenizer)."""
    if not records:
        return []
    key = None
    if _lengths_memo is not None:
        from fedlada.hosts import tokenizer_fingerprint

        tok = _lengths_memo.get(("tokenizer", id(side.tokenizer)))  # fingerprinted once per tokenizer object
        if tok is None or tok[0] is not side.tokenizer:
            tok = _lengths_memo[("tokenizer", id(side.tokenizer))] = (side.tokenizer,
                                                                      tokenizer_fingerprint(side.tokenizer))
        key = (id(records), tok[1], side.formatter("\x00"))
        hit = _lengths_memo.get(key)
        if hit is not None and hit[0] is records:
            return hit[1]
    lengths = [len(x) for x in side.tokenizer(side.prompts([r.question for r in records]),
                                              add_special_tokens=False)["input_ids"]]
    if key is not None:
        _lengths_memo[key] = (records, lengths)
    return lengths


def check_prompts_fit(side: Side, sources: dict[str, list[Record]], *, max_length: int, who: str,
                      max_new_tokens: int | None = None, trained: str | None = None,
                      evaluated: Sequence[Record] = (), eval_max_new_tokens: int | None = None) -> None:
    """DataError if a question's prompt under ``side``'s tokenizer leaves no room for a path within ``max_length``
    tokens (training and scoring would stop on it mid-round). ``sources`` maps where records come from (a config
    key and its file) to the records ``side`` will encode; the error names the source, the record ids (up to 5 per
    source) and their prompt lengths. With ``max_new_tokens``, the model must also take ``max_length`` positions
    and the longest prompt plus ``max_new_tokens`` (sampling): a ModelError where its position table is learned
    (a longer sequence would index past it), a warning otherwise. ``trained`` names the source whose records are
    trained on with their rationale (a client's train split): a warning counts those whose prompt + path is longer
    than ``max_length`` (the path is cut from the right, so its answer line is not trained on). ``evaluated``: records
    only answered (the evaluation's greedy paths, ``eval_max_new_tokens`` long, default ``max_new_tokens``; never
    trained on or scored): they count for the positions check alone."""
    bad, longest, trained_lengths = [], 0, []
    answering = 0, ""
    if evaluated and max_new_tokens is not None:
        n_eval = eval_max_new_tokens or max_new_tokens
        eval_lengths = prompt_lengths(side, list(evaluated))
        at = max(range(len(eval_lengths)), key=eval_lengths.__getitem__)
        answering = (eval_lengths[at] + n_eval,
                     f"longest test prompt, record {evaluated[at].id!r} ({eval_lengths[at]} tokens), + evaluation "
                     "answer tokens = {}")
    for where, records in sources.items():
        if not records:
            continue
        lengths = prompt_lengths(side, records)
        if where == trained:
            trained_lengths = lengths
        longest = max(longest, *lengths)
        long = [(r.id, n) for r, n in zip(records, lengths) if n >= max_length]
        if long:
            shown = ", ".join(f"{rid!r} ({n} tokens)" for rid, n in long[:5])
            more = f" and {len(long) - 5} more" if len(long) > 5 else ""
            bad.append(f"{where}: {len(long)} question(s) whose prompt for {who} leaves no room for a path within "
                       f"train.max_length={max_length}: {shown}{more}")
    if bad:
        raise DataError("; ".join(bad) + "; raise train.max_length or shorten or drop these questions")
    if trained is not None and sources.get(trained):
        _warn_cut_paths(side, trained, sources[trained], trained_lengths, max_length=max_length, who=who)
    if max_new_tokens is not None:
        need = max((longest + max_new_tokens, "longest prompt + lada.max_new_tokens = {}"), answering)
        _check_positions(side.model, max_length=max_length, sampling=need[0], who=who, what=need[1],
                         test_question=need is answering)


def _warn_cut_paths(side: Side, where: str, records: list[Record], prompt_tokens: list[int], *, max_length: int,
                    who: str) -> None:
    paths = [reasoning.format_path(r.rationale, r.answer) for r in records]
    lengths = [n + len(y) + 1 for n, y in zip(prompt_tokens,  # + eos
                                              side.tokenizer(paths, add_special_tokens=False)["input_ids"])]
    cut = [(r.id, n) for r, n in zip(records, lengths) if n > max_length]
    if cut and _cut_lines is not None:
        _cut_lines.append(where)
        if len(_cut_lines) > SAID_PER_CLIENT:
            return
    if cut:
        log.warning("%s: %d of %d record(s) are longer than train.max_length=%d under %s's tokenizer (e.g. %r, %d "
                    "tokens): their path is cut from the right, so its answer line is not trained on; raise "
                    "train.max_length or shorten their rationales", where, len(cut), len(records), max_length, who,
                    cut[0][0], cut[0][1])


def _check_positions(model, *, max_length: int, sampling: int, who: str,
                     what: str = "longest prompt + lada.max_new_tokens = {}", test_question: bool = False) -> None:
    from fedlada.errors import ModelError
    from fedlada.models import position_limit

    limit, hard = position_limit(model)
    needed = max(max_length, sampling)
    if limit is None or needed <= limit:
        return
    msg = (f"{who} takes at most {limit} positions (its config's position limit) but this run needs {needed} "
           f"(train.max_length={max_length}; {what.format(sampling)})")
    if hard:
        if max_length > limit and sampling <= limit:  # train.max_length alone is beyond the model
            fix = f"lower train.max_length to at most {limit}"
        elif test_question:
            fix = "shorten or drop that test question, lower data.eval_max_new_tokens" + \
                (f", and train.max_length to at most {limit}" if max_length > limit else "")
        else:
            fix = "lower train.max_length, lada.max_new_tokens or data.eval_max_new_tokens"
        raise ModelError(f"{msg}: {fix}, or use a model with a longer context")
    log.warning("%s; its positions past %d were not trained, expect worse paths", msg, limit)


@dataclass
class ClientState:
    client_id: int
    side: Side
    train: list[Record]
    holdout: list[Record]
    test: list[Record]
    filter: LearnabilityFilter | None = None


@dataclass
class ServerState:
    side: Side
    public: dict[str, Record]
    filters: dict[int, LearnabilityFilter] = field(default_factory=dict)
    # the LLM's own paths of the current round: question id -> [(text, logprob, num_tokens, correct)]
    own_paths: dict[str, list[tuple[str, float, int, bool]]] = field(default_factory=dict)
    # who samples the LLM's paths: None = transformers on ``side.model`` (``fedlada.generation.llm_backend``)
    backend: GenerationBackend | None = None


@dataclass
class StepLog:
    """What one side did in a round: metrics (JSON-able scalars) and the filter's selection records."""

    metrics: dict[str, Any] = field(default_factory=dict)
    selections: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- helpers


def candidate_ids(public: dict[str, Record], *, n: int, seed: int, round: int) -> list[str]:
    ids = sorted(public)
    rng = random.Random(derive_seed(seed, "candidates", round))
    return ids if n >= len(ids) else sorted(rng.sample(ids, n))


def sft_examples(side: Side, records: list[Record]) -> list[SFTExample]:
    return [SFTExample(p, reasoning.format_path(r.rationale, r.answer))
            for p, r in zip(side.prompts([r.question for r in records]), records)]


def _holdout_nll(side: Side, records: list[Record], cfg: RunConfig) -> np.ndarray:
    ex = sft_examples(side, records)
    if not ex:
        return np.zeros(0)
    s = score_paths(side.model, side.tokenizer, [e.prompt for e in ex], [e.path for e in ex],
                    batch_size=64, max_length=cfg.train.max_length)
    return s.nll


def _filter_for(existing: LearnabilityFilter | None, dim: int, cfg: RunConfig, seed: int) -> LearnabilityFilter:
    if existing is not None:
        return existing
    lc = cfg.lada
    return LearnabilityFilter(dim, hidden=lc.filter_hidden, alpha=lc.alpha, threshold=lc.threshold,
                              budget=lc.budget, min_count=lc.min_count, epochs=lc.filter_epochs, lr=lc.filter_lr,
                              seed=seed)


def _select(method: str, flt: LearnabilityFilter, ids: list[str], feats: np.ndarray, *, round: int,
            budget: float, seed: int, scalars: dict[str, np.ndarray] | None = None, pair: str = "") -> Selection:
    """LaDa's filter, or a baseline's rule recorded in the same Selection shape. ``random`` draws as many as the
    filter's cap (:func:`~fedlada.filter.selection_cap`, minimum count included), so it moves as much as LaDa; a
    plug-in rule (:mod:`fedlada.selection`) gets the same cap, the features and the ``scalars``."""
    n = len(ids)
    if method in ("lada", "lada-sft"):
        return flt.select(ids, feats, round=round)
    if selection.is_custom(method):
        cap = min(n, selection_cap(n, n, budget=budget, min_count=flt.min_count))
        # copies: a rule that edits its inputs in place must not change what is recorded or trained
        return selection.apply_rule(selection.Candidates(
            list(ids), np.array(feats, copy=True), {k: np.array(v, copy=True) for k, v in (scalars or {}).items()},
            round=round, pair=pair, cap=cap, seed=seed, rule=method))
    none = np.full(n, np.nan)  # no prediction is made: NaN, as the filter's cold start records it
    if method == "all":
        return Selection(ids, np.ones(n, bool), none, none.copy(), none.copy(), ["all: no filter"] * n, round=round)
    if method == "random":
        k = min(n, selection_cap(n, n, budget=budget, min_count=flt.min_count))
        pick = set(random.Random(seed).sample(range(n), k))
        sel = np.array([i in pick for i in range(n)], bool)
        return Selection(ids, sel, none, none.copy(), none.copy(),
                         ["random at budget" if s else "random: not drawn" for s in sel], round=round)
    raise ValueError(f"method {method!r} does not select")


def _selection_records(sel: Selection, *, round: int, pair: str, scalars: dict[str, np.ndarray]) -> list[dict]:
    out = []
    for i, qid in enumerate(sel.ids):
        rec = {"round": round, "pair": pair, "id": qid, "selected": bool(sel.selected[i]),
               "score": _f(sel.scores[i]), "exploit": _f(sel.exploit[i]), "explore": _f(sel.explore[i]),
               "reason": sel.reasons[i]}
        rec.update({k: _f(v[i]) if k != "path_tokens" else int(v[i]) for k, v in scalars.items()})  # a count
        out.append(rec)
    return out


def _f(x) -> float | None:
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.6g}")


def _da_loss(cfg: RunConfig) -> str:
    """The L_DA term that trains: ``lada.loss``, or "sft" (none) for lada-sft and lambda_da = 0."""
    lc = cfg.lada
    return "sft" if lc.method == "lada-sft" or lc.lambda_da == 0 else lc.loss


def _sft_weight(cfg: RunConfig) -> float:
    """mu, the weight of SFT on the other side's selected paths: 1 for lada-sft (distilling step-by-step)."""
    return 1.0 if cfg.lada.method == "lada-sft" else cfg.lada.mu


def _trained_sft(dist: list, cfg: RunConfig) -> int:
    """How many of the other side's selected paths SFT trains on: all of them, or none at weight mu = 0."""
    return len(dist) if _sft_weight(cfg) > 0 else 0


def _train_kwargs(cfg: RunConfig, *, lr: float, epochs: int, seed: int) -> dict:
    lc, tc = cfg.lada, cfg.train
    kw = dict(lr=lr, epochs=epochs, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
              max_grad_norm=tc.max_grad_norm, bf16=tc.bf16, compile=tc.compile, beta=lc.beta, tau=lc.tau,
              lambda_da=0.0 if lc.method == "lada-sft" else lc.lambda_da,  # lada-sft: plain SFT on the other
              mu=_sft_weight(cfg), max_length=tc.max_length, seed=seed)   # side's paths (distilling step-by-step)
    return kw


# --------------------------------------------------------------------------------------------- server teach


def server_teach(state: ServerState, *, cfg: RunConfig, round: int, progress: Progress | None = None
                 ) -> tuple[TeachMessage, StepLog]:
    """Step 2: LLM paths on this round's candidates, answer-correct ones kept (rejection sampling)."""
    lc = cfg.lada
    _check_method(cfg)
    qids = candidate_ids(state.public, n=lc.candidates_per_round, seed=cfg.seed, round=round)
    state.own_paths = {}
    if lc.method == "local":  # no exchange: an empty message (the clients only train locally)
        return TeachMessage(round=round, question_ids=()), StepLog(
            {"llm_paths_sampled": 0, "llm_paths_correct_sampled": 0, "llm_paths_correct": 0,
             "llm_questions_with_correct_path": 0,
             "llm_pass_rate": None, "teach_seconds": 0.0})  # the other methods' keys: one schema per event
    t0 = time.perf_counter()
    side = state.side
    prompts = side.prompts([state.public[q].question for q in qids])
    sample_kw = dict(num_paths=lc.paths_per_question, temperature=lc.temperature, top_p=lc.top_p,
                     max_new_tokens=lc.max_new_tokens, seed=derive_seed(cfg.seed, "llm-sample", round))
    if state.backend is not None:  # e.g. vLLM: follow the LLM's current weights (its adapter), then sample
        state.backend.sync(side.model)
        sampled = state.backend.sample(prompts, **sample_kw)
    else:
        sampled = sample_paths(side.model, side.tokenizer, prompts, batch_size=64, **sample_kw)
    if progress:
        progress(1, 2)
    flat_p = [p for p, paths in zip(prompts, sampled) for _ in paths]
    flat_y = [y for paths in sampled for y in paths]
    sc = score_paths(side.model, side.tokenizer, flat_p, flat_y, batch_size=64, max_length=cfg.train.max_length)
    if progress:
        progress(2, 2)
    items, i, n_correct_q, n_correct = [], 0, 0, 0
    for qid, paths in zip(qids, sampled):
        gold = state.public[qid].answer
        seen: set[str] = set()
        rows = []
        for y in paths:
            ok = reasoning.is_correct(reasoning.extract_answer(y, mode="strict"), gold)
            rows.append((y, float(sc.logprob[i]), int(sc.num_tokens[i]), ok))
            n_correct += ok
            if ok and y not in seen:
                seen.add(y)
                items.append(PathItem(qid, y, float(sc.logprob[i]), int(sc.num_tokens[i])))
            i += 1
        state.own_paths[qid] = rows
        n_correct_q += bool(seen)
    msg = TeachMessage(round=round, question_ids=tuple(qids), paths=tuple(items))
    # llm_paths_correct counts the distinct correct paths (what is sent), llm_paths_correct_sampled every correct
    # sample; llm_pass_rate is the share of candidates with at least one correct path
    m = {"llm_paths_sampled": len(flat_y), "llm_paths_correct_sampled": n_correct, "llm_paths_correct": len(items),
         "llm_questions_with_correct_path": n_correct_q, "llm_pass_rate": n_correct_q / max(len(qids), 1),
         "teach_seconds": _secs(t0)}
    return msg, StepLog(m)


# ---------------------------------------------------------------------------------------------- client step


HOST_ALONE = ("host", "host-random")  # a host framework without LaDa: fedlada.host_rounds runs them
ROUND_METHODS = tuple(m for m in METHODS if m not in HOST_ALONE)


def _check_method(cfg: RunConfig) -> None:
    if cfg.lada.method in HOST_ALONE:
        raise ValueError(f"fedlada.rounds runs lada.method in {ROUND_METHODS}; {cfg.lada.method!r} runs a host "
                         f"framework alone: use fedlada.host_rounds (the runner picks it from host.name)")
    selection.check_method(cfg.lada.method, cfg.lada.plugins)  # a plug-in rule: imported once per process


def check_known_questions(qids: list[str], public: dict[str, Record], *, who: str, round: int) -> None:
    """A teach message's candidates must be questions of the receiver's public pool (on Flower each node reads its
    own copy of the file): a DataError naming the ids otherwise, not a KeyError deep in a round."""
    unknown = [q for q in qids if q not in public]
    if unknown:
        raise DataError(f"{who}: round {round}: the server's candidates include {len(unknown)} question id(s) that "
                        f"are not in this public pool of {len(public)} records (e.g. {unknown[0]!r}): the server and "
                        f"every client must read the same data.public file")


def client_step(state: ClientState, teach: TeachMessage, *, public: dict[str, Record], cfg: RunConfig,
                round: int, progress: Progress | None = None) -> tuple[ReportMessage, StepLog]:
    """Steps 1, 3, 4, 5 and 7 on client k. Only ``ReportMessage`` leaves this function's side."""
    lc, k = cfg.lada, state.client_id
    _check_method(cfg)
    side = state.side
    t0 = time.perf_counter()
    logd = StepLog()
    sft = sft_examples(side, state.train)
    train_kw = _train_kwargs(cfg, lr=cfg.train.client_lr, epochs=cfg.train.client_epochs,
                             seed=derive_seed(cfg.seed, "client-train", round, k))
    train_kw["progress"] = progress

    if lc.method == "local":
        stats = train(side.model, side.tokenizer, sft=sft, **train_kw)
        logd.metrics.update(_stats(stats, "train"))
        logd.metrics["client_seconds"] = _secs(t0)
        return ReportMessage(round=round, client=k, metrics={"selected": 0}), logd

    if teach.round != round:
        raise ValueError(f"client_step: round {round}, but the teach message is of round {teach.round}")
    qids = list(teach.question_ids)
    check_known_questions(qids, public, who=f"client {k}", round=round)
    questions = [public[q].question for q in qids]
    prompts = dict(zip(qids, side.prompts(questions)))

    # 3. own paths on the candidates, scored by the SLM
    own = sample_paths(side.model, side.tokenizer, [prompts[q] for q in qids],
                       num_paths=lc.client_paths_per_question, temperature=lc.temperature, top_p=lc.top_p,
                       max_new_tokens=lc.max_new_tokens, seed=derive_seed(cfg.seed, "client-sample", round, k),
                       batch_size=64)
    own_flat = [(q, y) for q, ys in zip(qids, own) for y in ys]
    teach_by_q: dict[str, list[PathItem]] = {}
    for it in teach.paths:
        if it.question_id in prompts:
            teach_by_q.setdefault(it.question_id, []).append(it)
    teach_flat = [it for q in qids for it in teach_by_q.get(q, [])]
    all_p = [prompts[q] for q, _ in own_flat] + [prompts[it.question_id] for it in teach_flat]
    all_y = [y for _, y in own_flat] + [it.text for it in teach_flat]
    sc = score_paths(side.model, side.tokenizer, all_p, all_y, batch_size=64, max_length=cfg.train.max_length)
    n_own = len(own_flat)
    own_rows: dict[str, list[tuple[str, float, int, bool]]] = {}
    for j, (q, y) in enumerate(own_flat):
        ok = reasoning.is_correct(reasoning.extract_answer(y, mode="strict"), public[q].answer)
        own_rows.setdefault(q, []).append((y, float(sc.logprob[j]), int(sc.num_tokens[j]), ok))
    slm_nll_teacher = {id(it): float(sc.nll[n_own + j]) for j, it in enumerate(teach_flat)}

    # 4. filter L->k over questions that have a correct LLM path
    cand = [q for q in qids if teach_by_q.get(q)]
    chosen: dict[str, PathItem] = {}
    for q in cand:  # the most learnable correct LLM path: lowest SLM per-token NLL
        chosen[q] = min(teach_by_q[q], key=lambda it: slm_nll_teacher[id(it)])
    selected_q: list[str] = []
    if cand:
        g_slm = np.array([slm_nll_teacher[id(chosen[q])] for q in cand])
        g_llm = np.array([chosen[q].nll for q in cand])
        gap = learnability_gap(g_slm, g_llm)
        own_acc = np.array([np.mean([r[3] for r in own_rows[q]]) for q in cand])
        scalars = {"learnability_gap": gap, "slm_nll": g_slm, "llm_nll": g_llm,
                   "path_tokens": np.array([chosen[q].num_tokens for q in cand], float), "slm_pass": own_acc}
        emb = question_embeddings(side.model, side.tokenizer, [prompts[q] for q in cand], batch_size=64)
        feats = build_features(emb, scalars)
        state.filter = _filter_for(state.filter, feats.shape[1], cfg, derive_seed(cfg.seed, "filter", k))
        sel = _select(lc.method, state.filter, cand, feats, round=round, budget=lc.budget,
                      seed=derive_seed(cfg.seed, "random-select", round, k), scalars=scalars, pair=f"llm->client{k}")
        logd.selections = _selection_records(sel, round=round, pair=f"llm->client{k}", scalars=scalars)
        logd.metrics["filter"] = summarize(sel, {"learnability_gap": gap})
        selected_q = [q for q, s in zip(cand, sel.selected) if s]
        sel_feats = feats[sel.selected]
    # 5. distillation examples (pairs or lists only where an L_DA term trains, so the counts are what trains)
    da_loss = _da_loss(cfg)
    pref, listwise, dist = [], [], []
    for q in selected_q:
        y_pos = chosen[q]
        dist.append(SFTExample(prompts[q], y_pos.text))
        if da_loss == "listwise":
            ps = teach_by_q[q]
            if len(ps) >= 2:
                listwise.append(ListwiseExample(prompts[q], [p.text for p in ps], [p.logprob for p in ps],
                                                [True] * len(ps)))
        else:
            wrong = [r for r in own_rows[q] if not r[3]]
            if wrong and da_loss == "pairwise":
                y_neg = max(wrong, key=lambda r: r[1] / max(r[2], 1))[0]
                pref.append(PreferenceExample(prompts[q], y_pos.text, y_neg))
    if da_loss == "listwise" and selected_q and not listwise:
        log.warning("round %d, client %d: listwise loss, but no selected question has 2 or more distinct correct "
                    "teacher paths; %s (raise lada.paths_per_question or lada.temperature)", round, k,
                    "only the SFT term on teacher paths trains" if _trained_sft(dist, cfg) else
                    "nothing of the teacher's paths trains (lada.mu = 0)")
    nll_before = _holdout_nll(side, state.holdout, cfg)
    sel_before = (score_paths(side.model, side.tokenizer, [e.prompt for e in dist], [e.path for e in dist],
                              batch_size=64, max_length=cfg.train.max_length).nll if dist else np.zeros(0))
    stats = train(side.model, side.tokenizer, sft=sft, preference=pref, listwise=listwise, distill_sft=dist,
                  **train_kw)
    logd.metrics.update(_stats(stats, "train"))
    # 7. reward -> the filter's replay pool
    if dist and lc.method in ("lada", "lada-sft"):
        nll_after = _holdout_nll(side, state.holdout, cfg)
        sel_after = score_paths(side.model, side.tokenizer, [e.prompt for e in dist], [e.path for e in dist],
                                batch_size=64, max_length=cfg.train.max_length).nll
        # no held-out slice (a one-record split): R is unknown, and the labels are the per-sample improvements
        R = perplexity_reward(nll_before, nll_after) if len(nll_before) else float("nan")
        rewards = sample_rewards(R, perplexity_drops(sel_before, sel_after), mix=lc.reward_mix)
        state.filter.observe(sel_feats, rewards)
        fit = state.filter.fit()
        logd.metrics.update({"reward": _f(R), "filter_fit": fit})
    logd.metrics.update({"candidates": len(qids), "with_teacher_path": len(cand), "selected": len(selected_q),
                         "preference_pairs": len(pref), "listwise_groups": len(listwise),
                         "distill_sft": _trained_sft(dist, cfg), "client_seconds": _secs(t0)})

    # the reply: the SLM's answer-correct paths (deduplicated), scored by the SLM before its update
    out = []
    for q in qids:
        seen = set()
        for y, lp, nt, ok in own_rows.get(q, []):
            if ok and y not in seen:
                seen.add(y)
                out.append(PathItem(q, y, lp, nt))
    report = ReportMessage(round=round, client=k, paths=tuple(out),
                           metrics={"selected": len(selected_q), "correct_paths": len(out)})
    return report, logd


def _stats(stats, prefix: str) -> dict:
    return {f"{prefix}_steps": stats.steps, f"{prefix}_tokens": stats.tokens, f"{prefix}_loss": _f(stats.loss),
            f"{prefix}_seconds": _r2(stats.seconds),
            **{f"{prefix}_{k}": _f(v) for k, v in stats.components.items()}}


# --------------------------------------------------------------------------------------------- server learn


def server_learn(state: ServerState, reports: list[ReportMessage], *, cfg: RunConfig, round: int,
                 progress: Progress | None = None) -> StepLog:
    """Steps 3-5 and 7 on the server: novelty gap, filter per client, LLM update on the union of selections."""
    lc = cfg.lada
    _check_method(cfg)
    logd = StepLog()
    clients = [r.client for r in reports]
    if len(set(clients)) < len(clients):
        raise ValueError(f"server_learn: round {round}: more than one report from client(s) "
                         f"{sorted({c for c in clients if clients.count(c) > 1})}; pass one report per client")
    if lc.method == "local" or not reports:
        return logd
    t0 = time.perf_counter()
    side = state.side
    da_loss = _da_loss(cfg)
    rng = random.Random(derive_seed(cfg.seed, "server-holdout", round))
    for rep in reports:
        if rep.round != round:
            raise ValueError(f"server_learn: round {round}: client {rep.client}'s report is of round {rep.round}")
    # what the server trains on: paths on this round's candidates whose answer is right (the server holds the
    # public answers; a client that sends anything else is not believed)
    candidates = set(candidate_ids(state.public, n=lc.candidates_per_round, seed=cfg.seed, round=round))
    usable = {rep.client: [p for p in rep.paths if p.question_id in candidates and reasoning.is_correct(
        reasoning.extract_answer(p.text, mode="strict"), state.public[p.question_id].answer)] for rep in reports}
    logd.metrics["server_refused_paths"] = sum(len(rep.paths) - len(usable[rep.client]) for rep in reports)
    # the reward slice (LaDa's methods learn from it): a seeded 20% of the questions received this round, drawn over
    # every client's questions at once, so that a question held out is trained on through no client's path
    received = sorted({p.question_id for paths in usable.values() for p in paths})
    n_hold = max(1, len(received) // 5) if len(received) >= 5 and lc.method in ("lada", "lada-sft") else 0
    hold = set(rng.sample(received, n_hold)) if n_hold else set()
    pref, listwise, dist, holdout = [], [], [], []
    per_client_feats: list[tuple[int, np.ndarray, int]] = []
    for rep in sorted(reports, key=lambda r: r.client):
        k = rep.client
        paths = usable[k]
        if not paths:
            continue
        # one item per question: the client's most confident correct path
        best: dict[str, PathItem] = {}
        for p in paths:
            if p.question_id not in best or p.nll < best[p.question_id].nll:
                best[p.question_id] = p
        qids = sorted(best)
        holdout += [best[q] for q in qids if q in hold]
        qids = [q for q in qids if q not in hold]
        if not qids:
            continue
        prompts = side.prompts([state.public[q].question for q in qids])
        sc = score_paths(side.model, side.tokenizer, prompts, [best[q].text for q in qids], batch_size=64,
                         max_length=cfg.train.max_length)
        llm_nll = sc.nll
        slm_nll = np.array([best[q].nll for q in qids])
        gap = novelty_gap(llm_nll, slm_nll, np.ones(len(qids), bool))
        llm_pass = np.array([np.mean([r[3] for r in state.own_paths.get(q, [])] or [0.0]) for q in qids])
        scalars = {"novelty_gap": gap, "llm_nll": llm_nll, "slm_nll": slm_nll,
                   "path_tokens": np.array([best[q].num_tokens for q in qids], float), "llm_pass": llm_pass}
        emb = question_embeddings(side.model, side.tokenizer, prompts, batch_size=64)
        feats = build_features(emb, scalars)
        state.filters[k] = _filter_for(state.filters.get(k), feats.shape[1], cfg,
                                       derive_seed(cfg.seed, "server-filter", k))
        sel = _select(lc.method, state.filters[k], qids, feats, round=round, budget=lc.budget,
                      seed=derive_seed(cfg.seed, "server-random-select", round, k), scalars=scalars,
                      pair=f"client{k}->llm")
        logd.selections += _selection_records(sel, round=round, pair=f"client{k}->llm", scalars=scalars)
        logd.metrics[f"filter_client{k}"] = summarize(sel, {"novelty_gap": gap})
        n_before = len(dist)
        for j, q in enumerate(qids):
            if not sel.selected[j]:
                continue
            prompt = prompts[j]
            dist.append(SFTExample(prompt, best[q].text))
            wrong = [r for r in state.own_paths.get(q, []) if not r[3]]
            if wrong and da_loss == "pairwise":
                y_neg = max(wrong, key=lambda r: r[1] / max(r[2], 1))[0]
                pref.append(PreferenceExample(prompt, best[q].text, y_neg))
            elif da_loss == "listwise":
                ps = [p for p in paths if p.question_id == q]
                if len(ps) >= 2:  # the teacher here is the client: its own scores are the targets
                    listwise.append(ListwiseExample(prompt, [p.text for p in ps], [p.logprob for p in ps],
                                                    [True] * len(ps)))
        per_client_feats.append((k, feats[sel.selected], len(dist) - n_before))

    if not dist:
        logd.metrics.update({"server_selected": 0, "server_preference_pairs": 0, "server_listwise_groups": 0,
                             "server_distill_sft": 0})
        return logd
    h_prompts = side.prompts([state.public[p.question_id].question for p in holdout])
    h_before = (score_paths(side.model, side.tokenizer, h_prompts, [p.text for p in holdout], batch_size=64,
                            max_length=cfg.train.max_length).nll if holdout else np.zeros(0))
    d_before = score_paths(side.model, side.tokenizer, [e.prompt for e in dist], [e.path for e in dist],
                           batch_size=64, max_length=cfg.train.max_length).nll
    stats = train(side.model, side.tokenizer, sft=(), preference=pref, listwise=listwise, distill_sft=dist,
                  **_train_kwargs(cfg, lr=cfg.train.server_lr, epochs=cfg.train.server_epochs,
                                  seed=derive_seed(cfg.seed, "server-train", round)), progress=progress)
    logd.metrics.update(_stats(stats, "server_train"))
    if lc.method in ("lada", "lada-sft"):
        h_after = (score_paths(side.model, side.tokenizer, h_prompts, [p.text for p in holdout], batch_size=64,
                               max_length=cfg.train.max_length).nll if holdout else np.zeros(0))
        d_after = score_paths(side.model, side.tokenizer, [e.prompt for e in dist], [e.path for e in dist],
                              batch_size=64, max_length=cfg.train.max_length).nll
        # fewer than 5 received questions leave no reward slice: R is unknown (None in the metrics), and the labels
        # are the per-sample improvements alone (filter.sample_rewards)
        R = perplexity_reward(h_before, h_after) if len(h_before) else float("nan")
        logd.metrics["server_reward"] = _f(R)
        start = 0
        for k, f, n in per_client_feats:
            if n:
                drops = perplexity_drops(d_before[start:start + n], d_after[start:start + n])
                state.filters[k].observe(f, sample_rewards(R, drops, mix=lc.reward_mix))
                logd.metrics[f"server_filter_fit_client{k}"] = state.filters[k].fit()
            start += n
    logd.metrics.update({"server_selected": len(dist), "server_preference_pairs": len(pref),
                         "server_listwise_groups": len(listwise), "server_distill_sft": _trained_sft(dist, cfg),
                         "server_seconds": _secs(t0)})
    return logd


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(side: Side, records: list[Record], *, max_new_tokens: int, batch_size: int = 64,
             predictions: bool = False) -> dict:
    """Greedy answer accuracy, overall and by domain and by number of reasoning steps. With ``predictions``, also
    each record's ``{id, answer (extracted), gold, correct, path}`` under ``"predictions"``."""
    from fedlada.data import steps_of

    if not records:
        return {"accuracy": None, "n": 0}
    prompts = side.prompts([r.question for r in records])
    outs = sample_paths(side.model, side.tokenizer, prompts, num_paths=1, temperature=0.0,
                        max_new_tokens=max_new_tokens, seed=0, batch_size=batch_size)
    ok = [reasoning.grade(o[0], r.answer) for o, r in zip(outs, records)]
    by_domain: dict[str, list[bool]] = {}
    by_steps: dict[str, list[bool]] | None = {}
    for r, c in zip(records, ok):
        by_domain.setdefault(r.domain or "-", []).append(c)
        if by_steps is not None:
            try:  # user data may carry no step count (no "-s<N>-" id, no equation lines): then no per-step rows at
                by_steps.setdefault(str(steps_of(r)), []).append(c)
            except ValueError:  # all, as rows over the records that happen to have one would misdescribe the split
                by_steps = None
    out = {"accuracy": float(np.mean(ok)), "n": len(ok),
           "by_domain": {d: float(np.mean(v)) for d, v in sorted(by_domain.items())},
           "by_steps": {s: float(np.mean(v))
                        for s, v in sorted((by_steps or {}).items(), key=lambda kv: int(kv[0]))},
           "answer_extraction_version": reasoning.ANSWER_EXTRACTION_VERSION}
    if predictions:
        out["predictions"] = [{"id": r.id, "answer": reasoning.extract_answer(o[0]), "gold": r.answer, "correct": c,
                               "path": o[0]} for o, r, c in zip(outs, records, ok)]
    return out
