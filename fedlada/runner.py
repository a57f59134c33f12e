"""The in-process driver: T rounds with K clients in one process, deterministic by seed, resumable.

A run directory holds everything needed to understand the run:

``config.toml``        the resolved config (every default spelled out)
``metrics.jsonl``      one JSON object per event: evaluations, each side's step, bytes per direction
``selections.jsonl``   every filter decision: round, pair, public question id, features' scalars, gaps, scores,
                       selected or not, and why
``audit.jsonl``        per round and client: what left the client (record kinds, counts, bytes)
``predictions.jsonl``  every evaluation's per-question answers (round, who, id, extracted answer, gold, correct,
                       path): the LLM's and in-process clients' (on Flower a client's test set stays on its node)
``checkpoints/round_NNN/``  models' trainable weights and filter states after each completed round
``report.html`` + ``plots/``  written at the end by the command line and ``compare``
                       (``fedlada.report.write_report``; ``run`` itself does not)
``summary.json``       the final table

Resume: the last round whose checkpoint holds a ``COMPLETE`` marker is loaded, lines of later rounds are dropped
from the JSONL files, and the run continues. Because every random choice is seeded from (seed, round, client,
purpose), a resumed run ends with the same numbers as an uninterrupted one.

Every message between the sides goes through ``to_bytes``/``from_bytes`` here too, so the in-process runner
exercises the same serialisation (and byte counts) as a federated deployment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fedlada import checkpoints
from fedlada import config as config_mod
from fedlada.config import RunConfig, method_label
from fedlada.errors import ConfigError, DataError, FedLadaError, RunDirBusy
from fedlada.generation import check_generation, llm_backend
from fedlada.selection import check_method, is_custom, load_plugins, plugin_fingerprints
from fedlada.models import DEFAULT_INSTRUCTION, check_devices, check_sources
from fedlada.messages import ReportMessage, TeachMessage
from fedlada.prepare import (FederatedData, client_digest, data_digest, data_source, eval_split, load_data,
                             prepare_model, split_holdout)
from fedlada.host_rounds import (check_host_config, check_loaded_tokenizers, client_step, describe, load_host_state,
                                 save_host_state, server_learn, server_teach)
from fedlada.report import read_jsonl
from fedlada.rounds import ClientState, ServerState, Side, check_prompts_fit, derive_seed, evaluate

log = logging.getLogger(__name__)


def _secs(t0: float) -> float:
    # (a helper because ``round`` is a parameter name throughout this module)
    return float(f"{time.perf_counter() - t0:.2f}")


def _r2(x: float) -> float:
    return float(f"{x:.2f}")


class Events:
    """Hooks the application uses for progress display; the library itself only logs."""

    def stage(self, text: str) -> None:  # a new long step starts
        log.info(text)

    def progress(self, done: int, total: int) -> None:  # progress inside the current step
        pass


# ----------------------------------------------------------------------------------------- run directory


LOCK_NAME = ".lock"  # held (flock) by the process running in a run folder; not part of the run


def _finite(value):
    """``value`` with every non-finite float (NaN, infinity) replaced by None, in nested dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Hold the folder for this process until :meth:`unlock` (or its exit): a second process that wants to run
        in it is refused (ConfigError) instead of interleaving its logs and checkpoints with this one's."""
        try:
            import fcntl
        except ImportError:  # not on this platform: no lock
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirBusy(f"run directory {self.path} is in use by another process (pid {holder}); wait for it to "
                             "end, or use another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self, *, remove: bool = False) -> None:
        if self._lock_fd is None:
            return
        if remove:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    def write_atomic(self, name: str, text: str) -> None:
        p = self.path / name
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(p)

    def append(self, name: str, rows: list[dict]) -> None:
        """Append JSON lines (a NaN or infinity becomes null: the files stay strict JSON), synced to disk."""
        if not rows:
            return
        with open(self.path / name, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(_finite(r), sort_keys=True, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self, name: str) -> list[dict]:
        return read_jsonl(self.path / name)

    def truncate_after(self, name: str, round: int) -> None:
        rows = [r for r in self.read(name) if r.get("round", 0) <= round]
        self.write_atomic(name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def last_complete_round(self) -> int:
        if not self.ckpt.is_dir():
            return 0
        done = [int(p.name.split("_")[1]) for p in self.ckpt.glob("round_*") if (p / "COMPLETE").is_file()]
        return max(done, default=0)


def comparable_metrics(rows: list[dict]) -> list[dict]:
    """Metric rows without wall-clock fields and cache bookkeeping: what must be identical between two runs of
    the same config and seed (a resumed run, another engine)."""

    def clean(x):
        if isinstance(x, dict):
            # data_digest: a federated server fingerprints only the files it reads (no client's train file)
            return {k: clean(v) for k, v in x.items()
                    if "seconds" not in k and k not in ("cached", "cache", "data_digest")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return [clean(r) for r in rows if r.get("event") != "round_time"]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The model's trainable tensors on the CPU, by state_dict name: what a checkpoint holds of a model."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(rd: RunDir, round: int, server: ServerState, pool) -> None:
    """Server weights and filters plus every client's state (``pool.save``), then the COMPLETE marker."""
    d = rd.ckpt / f"round_{round:03d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    checkpoints.save(trainable_state(server.side.model), d / "llm.pt")
    checkpoints.save({"server_filters": {k: f.state_dict() for k, f in server.filters.items()}, "round": round},
                     d / "server_state.pt")
    save_host_state(server, d)
    pool.save(d)
    checkpoints.mark_complete(d, round)


def load_trainable(model, path: Path, who: str) -> None:
    """Load a checkpoint of ``model``'s trainable weights (as ``save_checkpoint`` wrote them). A checkpoint whose
    names or shapes do not fit the model (its source was changed since the run started) is a ConfigError, not a
    silent partial load."""
    state = checkpoints.load(path)
    mine = model.state_dict()
    unknown = [n for n in state if n not in mine]
    wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(mine[n].shape)}" for n in state
             if n in mine and state[n].shape != mine[n].shape]
    if unknown or wrong:
        detail = "; ".join(([f"{len(unknown)} unknown weight(s), e.g. {unknown[0]}"] if unknown else [])
                           + ([f"{len(wrong)} of another shape, e.g. {wrong[0]}"] if wrong else []))
        raise ConfigError(f"{path} does not fit {who}'s model ({detail}): the model changed since the run started; "
                          "restore it, or start a new run in another out_dir")
    model.load_state_dict(state, strict=False)


def load_checkpoint(rd: RunDir, round: int, server: ServerState, cfg: RunConfig) -> None:
    from fedlada.rounds import _filter_for

    d = rd.ckpt / f"round_{round:03d}"
    load_trainable(server.side.model, d / "llm.pt", "the LLM")
    st = checkpoints.load(d / "server_state.pt", weights_only=False)
    for k, s in st["server_filters"].items():
        server.filters[k] = _filter_for(None, s["feature_dim"], cfg, derive_seed(cfg.seed, "server-filter", k))
        server.filters[k].load_state_dict(s)
    load_host_state(server, d, cfg)


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    wall_seconds: float
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)


RUN_LOGS = ("metrics.jsonl", "selections.jsonl", "audit.jsonl", "predictions.jsonl")


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.toml a FedLaDa run wrote (it may predate keys added since)."""
    try:
        top = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return {"seed", "rounds", "out_dir"} <= set(top)


def check_run_dir(cfg: RunConfig, *, resume: bool) -> tuple[RunDir, int]:
    """The run directory and the last completed round to resume from (0: a new run), checked before anything is
    written or deleted. A directory that is not empty must be a FedLaDa run directory; one that holds completed
    rounds must hold this very config (the keys that differ are named otherwise), except for a larger ``rounds``:
    the run is then extended (no round depends on the total, so it ends as a run started with the larger value)."""
    rd = RunDir(cfg.out_dir)
    if rd.path.exists() and not rd.path.is_dir():
        raise ConfigError(f"out_dir {rd.path}: exists and is not a directory")
    if not rd.path.is_dir() or not any(p.name != LOCK_NAME for p in rd.path.iterdir()):
        return rd, 0
    existing = rd.path / "config.toml"
    if existing.is_file() and (rd.path / "metrics.jsonl").is_file():  # a run's folder whose config.toml is damaged
        try:
            tomllib.loads(existing.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{existing} is not valid TOML ({e}): this run's config was damaged or edited; restore "
                              f"it (nothing in {rd.path} was changed)") from None
    if not _is_run_config(existing):
        raise ConfigError(f"out_dir {rd.path}: not empty and not a FedLaDa run directory (no run config.toml); "
                          f"pick a new or empty directory (nothing in it was changed)")
    done = rd.last_complete_round()
    if done == 0:
        return rd, 0  # an earlier start that completed no round: it is started over
    if not resume:
        raise ConfigError(f"run directory {rd.path} already holds a run ({done} round(s) done); resume it (leave out "
                          f"--fresh), or pick another out_dir")
    if not config_mod.same_config(existing, cfg):
        keys = config_mod.config_diff(existing, cfg)
        if keys != ["rounds"]:
            shown = [k for k in keys if k != "rounds"]  # a larger rounds alone is an extension, not a difference
            hint = ""
            if "engine" in keys:  # a client's checkpoints live where its engine keeps them: not interchangeable
                was = flat_items_of(existing).get("engine", "?")
                hint = f" (it ran with engine = {was!r}: resume it with --engine {was})"
            raise ConfigError(f"run directory {rd.path} holds a run with a different config ({existing}; differs "
                              f"in: {', '.join(shown)}){hint}; use another out_dir, or the same config to resume it")
        if done > cfg.rounds:
            raise ConfigError(f"run directory {rd.path} holds {done} completed rounds, more than rounds={cfg.rounds}")
        if done < cfg.rounds:  # (equal: an extension that never started a round; the run is finished as it is)
            log.info("%s: extending the run to %d rounds (%d done)", rd.path, cfg.rounds, done)
    return rd, done


def flat_items_of(path: Path) -> dict:
    """The dotted keys of a stored config.toml (empty when it no longer loads)."""
    try:
        return config_mod.flat_items(config_mod.load_config(path))
    except ConfigError:
        return {}


def init_run_dir(rd: RunDir, cfg: RunConfig, start: int) -> dict[str, str | None]:
    """Make ``rd`` ready for rounds ``start + 1``...: a new run clears what an earlier start left, a resumed one
    drops log lines of rounds after ``start``. Called once the data has loaded, so a failed start changes nothing.
    Returns what a resumed start may replace (summary.json, config.toml, flower.jsonl; None: absent), for a set-up
    that fails afterwards to put back (:meth:`RunStart.setting_up`)."""
    rd.path.mkdir(parents=True, exist_ok=True)
    previous: dict[str, str | None] = {}
    if start:
        for name in ("summary.json", "config.toml", "flower.jsonl"):
            p = rd.path / name
            previous[name] = p.read_text(encoding="utf-8") if p.is_file() else None
    try:
        if start:
            for name in RUN_LOGS:
                rd.truncate_after(name, start)
            (rd.path / "summary.json").unlink(missing_ok=True)  # an extended run is unfinished until its last round
        else:
            for name in RUN_LOGS:
                (rd.path / name).unlink(missing_ok=True)
            (rd.path / "summary.json").unlink(missing_ok=True)
            shutil.rmtree(rd.ckpt, ignore_errors=True)
        for name in RUN_LOGS:
            (rd.path / name).touch()  # present even when a run makes no filter decision
        rd.write_atomic("config.toml", config_mod.dump_toml(cfg))
    except BaseException:  # a Ctrl-C (or a full disk) right here: a finished run stays finished
        if start:
            _put_back_files(rd, previous)
        raise
    return previous


def _finished_summary(rd: RunDir, cfg: RunConfig, start: int) -> dict | None:
    """The summary of a run whose every round is done and summarised (nothing to prepare or run), else None."""
    summary = rd.path / "summary.json"
    if start < cfg.rounds or not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text(encoding="utf-8"))
    except ValueError:
        return None  # rewritten at the end from the metrics


def _setup_row(rd: RunDir) -> dict:
    """The run's ``setup`` line of metrics.jsonl (what it started with), or {}."""
    return next((r for r in rd.read("metrics.jsonl") if r.get("event") == "setup"), {})


def check_metrics_complete(rd: RunDir, start: int) -> None:
    """A run resumed after round ``start`` must have the metrics of rounds 0..start (every round appends its rows,
    ending with the LLM's evaluation and the round's time, before its checkpoint): a metrics.jsonl cut short or
    edited would otherwise lose those rounds from the summary and the report of the finished run, silently."""
    rows = rd.read("metrics.jsonl")
    evaluated = {r.get("round") for r in rows if r.get("event") == "eval" and r.get("who") == "llm"}
    timed = {r.get("round") for r in rows if r.get("event") == "round_time"}
    stepped = {r.get("round") for r in rows if r.get("event") in ("client_step", "client_failed")}
    missing = [t for t in range(start + 1) if t not in evaluated or (timed and t and t not in timed)
               or (stepped and t and t not in stepped)]
    if missing:
        raise ConfigError(f"run directory {rd.path}: metrics.jsonl lacks the rows of round(s) "
                          f"{', '.join(map(str, missing))}, although the checkpoints hold rounds 1..{start} (the file "
                          f"was cut short or edited); restore it from a copy, or start a new run in another out_dir")
    audit_rows = rd.read("audit.jsonl")
    audited = {r.get("round") for r in audit_rows}  # every completed round: >= 1 client reported
    # per client: each report of a round has its audit line and its client's evaluation of that round
    reported = {(r.get("round"), r.get("who")) for r in rows if r.get("event") == "client_step"}
    evals = {(r.get("round"), r.get("who")) for r in rows if r.get("event") in ("eval", "eval_failed")}
    lines = {(r.get("round"), f"client{r.get('client')}") for r in audit_rows}
    lost = sorted((t, who) for t, who in reported if isinstance(t, int) and 1 <= t <= start
                  and (who not in {w for (u, w) in evals if u == t} or (t, who) not in lines))
    if lost:
        t, who = lost[0]
        where = "metrics.jsonl has no evaluation" if (t, who) not in evals else "audit.jsonl has no line"
        raise ConfigError(f"run directory {rd.path}: {where} of {who} in round {t}, although it reported that round "
                          f"({len(lost)} such client-round(s); the file was cut short or edited); restore it from a "
                          "copy, or start a new run in another out_dir")
    # predictions.jsonl: an evaluation with lines there has all of its n; one model with lines in round 0 (a run
    # started since the file exists) has them every round
    predicted: dict = {}
    for r in rd.read("predictions.jsonl"):
        predicted[(r.get("round"), r.get("who"))] = predicted.get((r.get("round"), r.get("who")), 0) + 1
    evaluated_n = {(r.get("round"), r.get("who")): r.get("n") for r in rows
                   if r.get("event") == "eval" and isinstance(r.get("n"), int) and r.get("round", 0) <= start}
    since = {who for (t, who) in predicted if t == 0}
    short = sorted(k for k, n in evaluated_n.items()
                   if (k in predicted or k[1] in since) and predicted.get(k, 0) != n and n)
    if short:
        (t, who) = short[0]
        raise ConfigError(f"run directory {rd.path}: predictions.jsonl holds {predicted.get(short[0], 0)} of the "
                          f"{evaluated_n[short[0]]} answers of {who}'s evaluation in round {t} ({len(short)} such "
                          "evaluation(s); the file was lost, cut short or edited); restore it from a copy, or start a "
                          "new run in another out_dir")
    if gone := [t for t in range(1, start + 1) if t not in audited]:
        raise ConfigError(f"run directory {rd.path}: audit.jsonl lacks round(s) {', '.join(map(str, gone))}, although "
                          f"the checkpoints hold rounds 1..{start} (the file was lost, cut short or edited); restore it "
                          f"from a copy, or start a new run in another out_dir")
    counted = {r.get("round"): r["selections"] for r in rows
               if r.get("event") == "round_time" and isinstance(r.get("selections"), int)}
    held: dict = {}
    for r in rd.read("selections.jsonl"):
        held[r.get("round")] = held.get(r.get("round"), 0) + 1
    if short := [t for t in range(1, start + 1) if t in counted and held.get(t, 0) != counted[t]]:
        raise ConfigError(f"run directory {rd.path}: selections.jsonl holds "
                          + ", ".join(f"{held.get(t, 0)} of round {t}'s {counted[t]} filter decisions" for t in short)
                          + f" (the file was lost, cut short or edited), although the checkpoints hold rounds "
                          f"1..{start}; restore it from a copy, or start a new run in another out_dir")


def check_clients_unchanged(rd: RunDir, digests: dict[int, str | None]) -> None:
    """On Flower, where the server does not read the clients' files: each node's digest of its own records
    (``{client: digest}`` from the set-up) must be the one it reported when the run started."""
    before = _setup_row(rd).get("clients") or []
    changed = [k for k, now in sorted(digests.items())
               if now is not None and k < len(before) and isinstance(before[k], dict)
               and before[k].get("data_digest") not in (None, now)]
    if changed:
        raise ConfigError(f"run directory {rd.path}: the data of client(s) {', '.join(map(str, changed))} changed "
                          "since this run started (their nodes report other records); restore the files, or start a "
                          "new run in another out_dir")


def check_data_unchanged(rd: RunDir, digest: str, data: FederatedData | None = None) -> None:
    """A run that already has rounds must see the data it started with (its first ``setup`` line holds the digest;
    a run from before digests were kept is not checked). With ``data``, the error names the clients whose records
    changed (from the per-client digests of the setup line), else the shared files."""
    row = _setup_row(rd)
    before = row.get("data_digest")
    if before is None or before == digest:
        return
    what = "the data"
    old = [c.get("data_digest") if isinstance(c, dict) else None for c in row.get("clients") or []]
    if data is not None and old:
        changed = [k for k, files in enumerate(data.clients)
                   if k < len(old) and old[k] not in (None, client_digest(files))]
        if len(old) != len(data.clients):
            what = f"the data (the run started with {len(old)} client(s), now {len(data.clients)})"
        elif changed:
            what = "the train/test records of client(s) " + ", ".join(map(str, changed))
        elif all(o is not None for o in old):
            what = "the public pool or the general corpus (every client's records are as they were)"
    raise ConfigError(f"run directory {rd.path}: {what} changed since this run started (digest {before}, now "
                      f"{digest}); restore the files, or start a new run in another out_dir")


def check_plugins_unchanged(rd: RunDir, cfg: RunConfig) -> None:
    """A run under a plug-in selection rule must go on with the rule's code it started with (the setup line records
    each plug-in's file and digest): an edited rule would mix two rules in one run, or a table would reuse the old
    rule's numbers under the new one's name. Loads the plug-ins. A run of a built-in method is not checked (the
    plug-ins listed do not select for it)."""
    if not cfg.lada.plugins or not is_custom(cfg.lada.method):
        return
    before = _setup_row(rd).get("plugins")
    if not isinstance(before, dict):  # a run from before plug-ins were recorded
        return
    load_plugins(cfg.lada.plugins)
    now = plugin_fingerprints(cfg.lada.plugins)

    def sha(entry):
        return entry.get("sha256") if isinstance(entry, dict) else None

    def what(k, v):
        old = (before.get(k) or {}).get("files") if isinstance(before.get(k), dict) else None
        if isinstance(old, dict) and v.get("files"):
            names = sorted(n for n in set(old) | set(v["files"]) if old.get(n) != v["files"].get(n))
            return f"{k}: {', '.join(names)} changed (in {Path(v['file']).parent})"
        return f"{k} (sha256 {sha(before.get(k))}, now {sha(v)} in {v['file']})"

    changed = [what(k, v) for k, v in now.items() if sha(before.get(k)) != sha(v)]
    if not changed and set(before) == set(now):
        return
    raise ConfigError(f"run directory {rd.path}: the plug-in code of this run changed since it started: "
                      f"{'; '.join(changed) or 'another list of plug-ins'}; restore it, or start a new run in another "
                      "out_dir")


def check_models_unchanged(rd: RunDir, cfg: RunConfig, infos: dict,
                           remedy: str = "restore that model, or start a new run in another out_dir", *,
                           prompts_warn: bool = False) -> None:
    """A resumed run's LoRA models must start from the base weights the run began with: their checkpoints hold the
    adapters only, trained on those weights (the first ``setup`` line holds each model's fingerprint; a fully
    fine-tuned model's checkpoint holds all of its weights, so it is not checked)."""
    before = _setup_row(rd).get("models") or {}
    for who, info in infos.items():
        spec = cfg.models.llm if who == "llm" else cfg.models.slm_for(int(who.removeprefix("client")))
        was, now = before.get(who) or {}, info or {}
        # a plain prompt starts with the BOS token where the tokenizer adds one itself (models.PromptFormatter); a
        # run started before prompts did has no prompt_bos in its setup line and was trained without it
        if was and "prompt_bos" in now and was.get("prompt_bos", "") != now["prompt_bos"]:
            name = "the LLM" if who == "llm" else f"{who}'s SLM"
            text = (f"run directory {rd.path}: the prompts of {name} now start with {now['prompt_bos']!r} (its "
                    f"tokenizer's BOS token, which the tokenizer adds itself), but this run started with "
                    f"{was.get('prompt_bos', '')!r} (an earlier FedLaDa, or another tokenizer) and was trained on those")
            if prompts_warn:  # an export writes weights, which do not depend on the prompts: say it, go on
                log.warning("%s; the exported model was trained on prompts %s", text,
                            "without it" if not was.get("prompt_bos") else f"starting with {was['prompt_bos']!r}")
            else:
                raise ConfigError(f"{text}: {remedy}")
        # a chat-template prompt's instruction (models.instruction_for); runs from before it was recorded asked for
        # a number
        if was and "instruction" in now and was.get("instruction", DEFAULT_INSTRUCTION) != now["instruction"]:
            name = "the LLM" if who == "llm" else f"{who}'s SLM"
            raise ConfigError(f"run directory {rd.path}: the prompts of {name} now end with the instruction "
                              f"{now['instruction']!r}, but this run started with "
                              f"{was.get('instruction', DEFAULT_INSTRUCTION)!r} and was trained on those: {remedy}")
        old = was.get("weights_fingerprint")
        new = now.get("weights_fingerprint")
        if spec.lora and old and new and old != new:
            name = "the LLM" if who == "llm" else f"{who}'s SLM"
            raise ConfigError(f"run directory {rd.path}: the base weights of {name} (models source "
                              f"{spec.source!r}) changed since this run started (fingerprint {old}, now {new}); its "
                              f"checkpoints hold LoRA adapters trained on the old weights: {remedy}")


@dataclass
class RunStart:
    """Where a run stands once its folder and data are checked: resume after round ``start`` on ``data``."""

    rd: RunDir
    start: int
    data: FederatedData
    digest: str
    created: Path | None = None  # the topmost folder of the run's path this start made (None: it existed)
    previous: dict[str, str | None] = field(default_factory=dict)  # what init_run_dir replaced (a resumed start)

    @contextmanager
    def setting_up(self):
        """Around the set-up (models, clients): a new run whose set-up fails or is interrupted leaves no run
        folder behind (what ``init_run_dir`` wrote is removed, the folder too if this start made it), so a failed
        start does not look like a run. A resumed (or extended finished) run gets back its summary.json,
        config.toml and flower.jsonl as they were."""
        try:
            yield
        except BaseException:
            if self.start:
                _put_back_files(self.rd, self.previous)
            self.rd.unlock(remove=self.start == 0)
            if self.start == 0:
                for name in (*RUN_LOGS, "config.toml", "summary.json", "flower.jsonl"):
                    (self.rd.path / name).unlink(missing_ok=True)
                if self.rd.ckpt.is_dir() and not any(self.rd.ckpt.iterdir()):  # a node checked it could write there
                    self.rd.ckpt.rmdir()
                if self.created is not None:  # the folders this start made, from the run folder up, if empty
                    top = self.created.absolute()
                    for d in (self.rd.path.absolute(), *self.rd.path.absolute().parents):
                        if not d.is_dir() or any(d.iterdir()):
                            break
                        d.rmdir()
                        if d == top:
                            break
            raise


def _put_back_files(rd: RunDir, previous: dict[str, str | None]) -> None:
    for name, text in previous.items():
        if text is None:
            (rd.path / name).unlink(missing_ok=True)
        else:
            rd.write_atomic(name, text)


def begin_run(cfg: RunConfig, *, resume: bool, events: Events, t_start: float,
              load: Callable[[RunConfig], FederatedData] = load_data) -> RunStart | RunResult:
    """The start every engine shares: refuse a generation backend or a device this machine cannot run, set the thread
    count, check the run folder, load the data and check it is the data a resumed (or finished) run started
    with, return a finished run's result as it is, and only then prepare the folder (a start that fails on its
    data changes nothing; one that fails preparing its models, inside :meth:`RunStart.setting_up`, leaves
    nothing behind)."""
    check_generation(cfg)  # a vLLM config on a machine without vLLM or a GPU
    check_devices(cfg)  # a device this machine does not have
    check_sources(cfg, slms=load is load_data)  # a mistyped model folder (on Flower, the nodes check the SLMs')
    torch.set_num_threads(config_mod.resolve_threads(cfg.threads))
    rd, start = check_run_dir(cfg, resume=resume)
    events.stage("loading data")
    data = load(cfg)  # a federated server: load_server_data (never a client's train file)
    digest = data_digest(data)
    if start:
        # a finished run too (its results are not those of the data as it is now); only a process that reads the
        # clients' files can say which client changed
        check_data_unchanged(rd, digest, data if load is load_data else None)
        check_plugins_unchanged(rd, cfg)
    summary = _finished_summary(rd, cfg, start)
    if summary is not None:
        events.stage(f"{rd.path} holds this run, finished ({cfg.rounds} rounds): nothing to run")
        return RunResult(rd.path, summary, time.perf_counter() - t_start, resumed_from=start)
    if start:
        check_metrics_complete(rd, start)
        check_threads_unchanged(rd, cfg)
    created = next((p for p in reversed((rd.path.absolute(), *rd.path.absolute().parents)) if not p.exists()), None)
    try:
        rd.lock()  # before anything in the folder changes: a second process is refused here
    except OSError as e:  # a read-only or missing parent, a full disk
        raise ConfigError(f"out_dir {rd.path}: cannot write there ({e.strerror or e}"
                          f"{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}); pick a writable folder "
                          f"(--out)") from None
    try:
        # the folder was checked before the data loaded: another process may have run in it since (and finished)
        if check_run_dir(cfg, resume=resume)[1] != start or _finished_summary(rd, cfg, start) is not None:
            raise RunDirBusy(f"run directory {rd.path} changed while this run loaded its data (another process ran "
                             f"in it); nothing was changed: run the command again")
        previous = init_run_dir(rd, cfg, start)
    except BaseException:
        rd.unlock(remove=start == 0)
        raise
    return RunStart(rd, start, data, digest, created, previous)


def check_threads_unchanged(rd: RunDir, cfg: RunConfig) -> None:
    """A resumed run gets the torch thread count it started with (recorded in its setup line): ``threads = 0``
    resolves to the cores a process may use, and another count prepares other tiny models (float sums split
    otherwise) and gives other numbers, so a resume under another count is refused before any model is prepared."""
    started = _setup_row(rd).get("threads")
    now = config_mod.resolve_threads(cfg.threads)
    if isinstance(started, int) and started != now:
        how = (f"threads = 0 resolved to the {started} core(s) that process could use; this one can use {now}"
               if cfg.threads == 0 else f"threads = {cfg.threads} now gives {now}")
        raise ConfigError(f"run directory {rd.path} started with {started} torch thread(s) ({how}): another count "
                          f"prepares other tiny models and gives other numbers. Resume it in a process with "
                          f"{started} core(s) (e.g. taskset -c 0-{started - 1} ...), or start a new run (--out)")


def build_states(cfg: RunConfig, data: FederatedData, events: Events) -> tuple[ServerState, list[ClientState], dict]:
    from fedlada.prepare import same_data
    from fedlada.rounds import same_records

    # the server corpus' digest and the public pool's prompt lengths, once per set-up rather than once per client
    with same_data(), same_records():
        return _build_states(cfg, data, events)


def _build_states(cfg: RunConfig, data: FederatedData, events: Events) -> tuple[ServerState, list[ClientState],
                                                                                   dict]:
    from fedlada.models import prompt_formatter

    # the run's thread count (begin_run sets it too): a caller of the library gets the models and numbers of
    # `fedlada run` with the same config (a tiny model's cache key includes the thread count)
    torch.set_num_threads(config_mod.resolve_threads(cfg.threads))
    infos: dict[str, Any] = {}
    if len(cfg.models.slms) > len(data.clients):
        log.warning("models.slms lists %d SLMs but the run has %d client(s): models.slms.%d.. are not used",
                    len(cfg.models.slms), len(data.clients), len(data.clients))
    events.stage("preparing the LLM")
    llm, ltok, infos["llm"] = prepare_model(cfg.models.llm, role="llm", cfg=cfg, data=data,
                                            progress=events.progress)
    server = ServerState(Side(llm, ltok, prompt_formatter(ltok, cfg.models.llm, data.public, infos["llm"])),
                         {r.id: r for r in data.public})
    server.backend = llm_backend(cfg.models.llm, infos["llm"])
    check_prompts_fit(server.side, {data_source(cfg, data): data.public}, max_length=cfg.train.max_length,
                      who="the LLM", max_new_tokens=cfg.lada.max_new_tokens,
                      evaluated=[r for files in data.clients for r in eval_split(files.test, cfg)],
                      eval_max_new_tokens=cfg.eval_max_new_tokens)
    clients, unfit = [], []
    for k, files in enumerate(data.clients):
        spec = cfg.models.slm_for(k)
        events.stage(f"preparing SLM of client {k}")
        m, tok, infos[f"client{k}"] = prepare_model(spec, role=cfg.models.slm_role(k), cfg=cfg, data=data,
                                                    progress=events.progress)
        check_loaded_tokenizers(cfg, k, ltok, tok)
        side = Side(m, tok, prompt_formatter(tok, spec, data.public, infos[f"client{k}"]))
        try:  # every client's too-long questions are named at once
            check_prompts_fit(side, {data_source(cfg, data, k, "train"): files.train,
                                     data_source(cfg, data): data.public},
                              max_length=cfg.train.max_length, who=f"client {k}'s SLM",
                              max_new_tokens=cfg.lada.max_new_tokens, trained=data_source(cfg, data, k, "train"),
                              evaluated=eval_split(files.test, cfg), eval_max_new_tokens=cfg.eval_max_new_tokens)
        except DataError as e:
            unfit.append(str(e))
        train, hold = split_holdout(files.train, size=cfg.data.holdout_size, seed=derive_seed(cfg.seed, "holdout", k))
        test = eval_split(files.test, cfg)
        clients.append(ClientState(k, side, train, hold, test))
    if unfit:
        raise DataError("; ".join(dict.fromkeys(unfit)))
    return server, clients, infos


@dataclass
class ClientResult:
    """One client's answer to a round: the serialised report, its local logs, or why it failed."""

    client_id: int
    report: bytes | None = None
    metrics: dict = field(default_factory=dict)
    selections: list[dict] = field(default_factory=list)
    error: str | None = None


class InProcessClients:
    """The clients of an in-process run. A federated engine provides the same four methods over the network."""

    def __init__(self, clients: list[ClientState], public: dict, cfg: RunConfig,
                 fail_hook: Callable[[int, int], None] | None = None, events: Events | None = None):
        self.clients, self.public, self.cfg, self.fail_hook = clients, public, cfg, fail_hook
        self.events = events or Events()

    @property
    def ids(self) -> list[int]:
        return [c.client_id for c in self.clients]

    def step(self, teach: bytes, round: int) -> list[ClientResult]:
        out = []
        for c in self.clients:
            self.events.stage(f"round {round}/{self.cfg.rounds}: client {c.client_id}")
            try:
                if self.fail_hook:
                    self.fail_hook(round, c.client_id)
                rep, clog = client_step(c, TeachMessage.from_bytes(teach), public=self.public, cfg=self.cfg,
                                        round=round, progress=self.events.progress)
            except ClientFailure as e:
                out.append(ClientResult(c.client_id, error=str(e)))
                continue
            out.append(ClientResult(c.client_id, rep.to_bytes(), clog.metrics, clog.selections))
        return out

    def evaluate(self, round: int) -> list[dict]:
        return [{"round": round, "event": "eval", "who": f"client{c.client_id}",
                 **evaluate(c.side, c.test, max_new_tokens=self.cfg.eval_max_new_tokens, predictions=True)}
                for c in self.clients]

    def save(self, d: Path) -> None:
        for c in self.clients:
            checkpoints.save(trainable_state(c.side.model), d / f"client_{c.client_id}.pt")
            if c.filter is not None:
                checkpoints.save(c.filter.state_dict(), d / f"client_{c.client_id}_filter.pt")

    def load(self, d: Path) -> None:
        from fedlada.rounds import _filter_for

        for c in self.clients:
            load_trainable(c.side.model, d / f"client_{c.client_id}.pt", f"client {c.client_id}")
            f = d / f"client_{c.client_id}_filter.pt"
            if f.is_file():
                s = checkpoints.load(f, weights_only=False)
                c.filter = _filter_for(None, s["feature_dim"], self.cfg,
                                       derive_seed(self.cfg.seed, "filter", c.client_id))
                c.filter.load_state_dict(s)


class ClientFailure(Exception):
    """Raised (by a fail hook or an engine) when a client cannot complete its round."""


def run(cfg: RunConfig, *, resume: bool = True, events: Events | None = None,
        stop_after_round: int | None = None, fail_hook: Callable[[int, int], None] | None = None) -> RunResult:
    """Run (or resume) LaDa in one process. ``stop_after_round`` ends early (used to test resume);
    ``fail_hook(round, client)`` is called before each client step (tests use it to simulate a crash)."""
    events = events or Events()
    t_start = time.perf_counter()
    check_host_config(cfg)  # a refused host/model pairing fails before any work
    check_method(cfg.lada.method, cfg.lada.plugins)  # a plug-in selection rule that cannot be loaded, too
    begun = begin_run(cfg, resume=resume, events=events, t_start=t_start)
    if isinstance(begun, RunResult):
        return begun
    rd, start, data = begun.rd, begun.start, begun.data
    with begun.setting_up():
        server, clients, infos = build_states(cfg, data, events)
        pool = InProcessClients(clients, server.public, cfg, fail_hook, events)
        load_resumed(rd, cfg, start, server, pool, infos, events)
    llm_test = [rec for c in clients for rec in c.test]
    setup = {"models": infos, "data": data.source, "data_digest": begun.digest, "public": len(data.public),
             "threads": torch.get_num_threads(),
             **({"plugins": plugin_fingerprints(cfg.lada.plugins)} if cfg.lada.plugins else {}),
             "clients": [{"train": len(c.train), "holdout": len(c.holdout), "test": len(c.test),
                          "data_digest": client_digest(files)} for c, files in zip(clients, data.clients)]}
    return drive(cfg, rd, start, server, pool, llm_test, events, setup=setup, stop_after_round=stop_after_round,
                 t_start=t_start)


def load_resumed(rd: RunDir, cfg: RunConfig, start: int, server: ServerState, pool, models: dict,
                 events: Events) -> None:
    """A resumed (or extended) run's state after round ``start``: its models checked against the run's start, the
    server's checkpoint loaded, the clients' loaded by ``pool``. Part of the set-up (``RunStart.setting_up``), so a
    refusal leaves a finished run as it was. Nothing for a new run (``start`` 0)."""
    if not start:
        return
    events.stage(f"resuming after round {start}")
    check_models_unchanged(rd, cfg, models)
    load_checkpoint(rd, start, server, cfg)
    pool.load(rd.ckpt / f"round_{start:03d}")


def drive(cfg: RunConfig, rd: RunDir, start: int, server: ServerState, pool, llm_test: list, events: Events, *,
          setup: dict, stop_after_round: int | None = None, t_start: float | None = None) -> RunResult:
    """The round loop shared by every engine. ``pool`` is the engine's view of the clients (see
    :class:`InProcessClients`); only serialised messages pass between it and the server. The run folder's lock
    (:meth:`RunDir.lock`, taken by ``begin_run``) is released when the loop ends, however it ends."""
    try:
        return _drive(cfg, rd, start, server, pool, llm_test, events, setup=setup, stop_after_round=stop_after_round,
                      t_start=t_start)
    finally:
        rd.unlock()


def _drive(cfg: RunConfig, rd: RunDir, start: int, server: ServerState, pool, llm_test: list, events: Events, *,
           setup: dict, stop_after_round: int | None = None, t_start: float | None = None) -> RunResult:
    from fedlada.messages import MessageError

    t_start = t_start if t_start is not None else time.perf_counter()
    if not start:  # a resumed run's state was loaded during its set-up (load_resumed)
        rd.append("metrics.jsonl", [{"round": 0, "event": "setup", **setup}])
        events.stage("evaluating before round 1")
        _append_evaluations(rd, pool.evaluate(0) + [_llm_eval(server, llm_test, cfg, 0)])
    last = min(cfg.rounds, stop_after_round) if stop_after_round else cfg.rounds
    for t in range(start + 1, last + 1):
        t_round = time.perf_counter()
        events.stage(f"round {t}/{cfg.rounds}: LLM reasoning paths")
        teach, slog = server_teach(server, cfg=cfg, round=t, progress=events.progress)
        teach_bytes = teach.to_bytes()
        rows = [{"round": t, "event": "server_teach", **slog.metrics}]
        reports, audit, decisions = [], [], 0
        for res in pool.step(teach_bytes, t):
            who = f"client{res.client_id}"
            if res.error is None:
                try:
                    rep = ReportMessage.from_bytes(res.report)
                    if rep.client != res.client_id or rep.round != t:
                        raise MessageError(f"report names client {rep.client} round {rep.round}, expected "
                                           f"client {res.client_id} round {t}")
                except MessageError as e:
                    res.error = f"malformed report rejected: {e}"
            if res.error is not None:
                log.warning("round %d: %s failed: %s", t, who, res.error)
                rows.append({"round": t, "event": "client_failed", "who": who, "reason": res.error})
            else:
                reports.append(rep)
                rows.append({"round": t, "event": "client_step", "who": who, **res.metrics})
            # the teach message went to a failed client too, and a rejected report came all the same
            rows.append({"round": t, "event": "bytes", "who": who, "server_to_client": len(teach_bytes),
                         "client_to_server": len(res.report or b"")})
            if res.error is None:
                audit.append({"round": t, "client": res.client_id, "who": who, **rep.audit()})
                rd.append("selections.jsonl", res.selections)
                decisions += len(res.selections)
        if len(reports) < cfg.min_clients:
            rd.append("metrics.jsonl", rows)
            kept = (f"rounds 1..{t - 1} are checkpointed in {rd.ckpt}; the same command resumes after round {t - 1}"
                    if t > 1 else "no round was completed")
            raise RoundFailed(f"round {t}: only {len(reports)} client(s) reported, min_clients={cfg.min_clients}; "
                              f"{kept}")
        events.stage(f"round {t}/{cfg.rounds}: LLM update")
        llog = server_learn(server, reports, cfg=cfg, round=t, progress=events.progress)
        rows.append({"round": t, "event": "server_learn", **llog.metrics})
        rd.append("selections.jsonl", llog.selections)
        decisions += len(llog.selections)
        events.stage(f"round {t}/{cfg.rounds}: evaluation")
        rows += pool.evaluate(t) + [_llm_eval(server, llm_test, cfg, t)]
        # the round's selections.jsonl lines, counted: a resume checks the file still holds them
        rows.append({"round": t, "event": "round_time", "seconds": _secs(t_round), "selections": decisions})
        _append_evaluations(rd, rows)
        rd.append("audit.jsonl", audit)
        save_checkpoint(rd, t, server, pool)
    summary = summarize_run(rd, cfg)
    if last == cfg.rounds:
        rd.write_atomic("summary.json", json.dumps(summary, indent=1))
    return RunResult(rd.path, summary, time.perf_counter() - t_start, resumed_from=start)


class RoundFailed(FedLadaError):
    """Too few clients completed a round."""


def _llm_eval(server: ServerState, records: list, cfg: RunConfig, round: int) -> dict:
    # Evaluation-only access: the experimenter scores the LLM on the union of the clients' test splits (as the
    # paper reports); no training step ever sees these records.
    return {"round": round, "event": "eval", "who": "llm",
            **evaluate(server.side, records, max_new_tokens=cfg.eval_max_new_tokens, predictions=True)}


def _append_evaluations(rd: RunDir, rows: list[dict]) -> None:
    """Append ``rows`` to metrics.jsonl, each evaluation's per-question predictions (where it has them: an
    in-process client's, the LLM's) to predictions.jsonl first."""
    predictions = [{"round": r["round"], "who": r["who"], **p} for r in rows for p in r.pop("predictions", None) or ()]
    rd.append("predictions.jsonl", predictions)
    rd.append("metrics.jsonl", rows)


def summarize_run(rd: RunDir, cfg: RunConfig) -> dict:
    """Accuracy per round for every model, bytes and training tokens: the numbers the report and CLI show."""
    every = rd.read("metrics.jsonl")
    acc: dict[str, dict[int, float]] = {}
    n_eval: dict[str, int] = {}  # questions each model is evaluated on (its latest evaluation's)
    for r in every:
        if r.get("event") == "eval":
            acc.setdefault(r["who"], {})[r["round"]] = r["accuracy"]
            if isinstance(r.get("n"), int):
                n_eval[r["who"]] = r["n"]
    final_round = max((max(v) for v in acc.values()), default=0)
    # a round stopped short (fewer than min_clients reported) logged its steps for diagnosis, but nothing of it
    # counts: a resume redoes it
    rows = [r for r in every if not isinstance(r.get("round"), int) or r["round"] <= final_round]
    stopped = sorted({r["round"] for r in every if isinstance(r.get("round"), int) and r["round"] > final_round})
    bytes_up = sum(r.get("client_to_server", 0) for r in rows if r.get("event") == "bytes")
    bytes_down = sum(r.get("server_to_client", 0) for r in rows if r.get("event") == "bytes")
    tokens = sum(r.get("train_tokens", 0) or 0 for r in rows if r.get("event") == "client_step") + \
        sum(r.get("server_train_tokens", 0) or 0 for r in rows if r.get("event") == "server_learn")
    failed: dict[str, list[int]] = {}
    for r in rows:
        if r.get("event") == "client_failed":
            failed.setdefault(r["who"], []).append(r["round"])
    slm_final = [v[final_round] for k, v in acc.items() if k.startswith("client") and final_round in v]
    from fedlada.report import who_key

    models = sorted(acc, key=who_key)
    return {"method": cfg.lada.method, "host": cfg.host.name, "label": method_label(cfg.host.name, cfg.lada.method),
            "seed": cfg.seed, "rounds_done": final_round,
            "accuracy": {k: {str(t): a for t, a in sorted(acc[k].items())} for k in models},
            "final": {k: acc[k].get(final_round) for k in models},
            "eval_questions": {k: n_eval[k] for k in models if k in n_eval},
            "mean_slm_accuracy": (sum(slm_final) / len(slm_final)) if slm_final else None,
            # clients without an evaluation in the last round (a failed evaluation, a node that never answered):
            # not in the mean, which is then over fewer clients than the run has
            "mean_slm_left_out": [f"client{k}" for k in range(cfg.data.n_clients)
                                  if final_round not in acc.get(f"client{k}", {})],
            "bytes_client_to_server": bytes_up, "bytes_server_to_client": bytes_down,
            "train_tokens_federated": tokens,
            "failed_steps": {k: sorted(set(v)) for k, v in sorted(failed.items())},
            "stopped_round": ({"round": stopped[0], "failed": sorted(
                {r["who"] for r in every if r.get("round") == stopped[0] and r.get("event") == "client_failed"},
                key=lambda w: int(w[6:]) if w[6:].isdigit() else 0)} if stopped else None),
            "missing_clients": [f"client{k}" for k in range(cfg.data.n_clients) if f"client{k}" not in acc],
            "models": {"llm": _model_words(cfg.models.llm),
                       **{f"client{k}": _model_words(cfg.models.slm_for(k)) for k in range(cfg.data.n_clients)}}}


def _model_words(spec) -> str:
    return describe(spec) + (f", LoRA r={spec.lora_r}" if spec.lora else ", full fine-tuning")
