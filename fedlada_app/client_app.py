"""The Flower ClientApp of LaDa: one client of the library's round, behind Flower messages.

Each handler unpacks a request (``fedlada_app.records``), calls the library, packs the reply:

- ``query.setup``: which client this node is (its node config ``partition-id`` and ``num-partitions``; Flower's
  simulation sets them, a SuperNode gets them from ``--node-config``); prepare the client's data and SLM
  (pretraining a tiny SLM into the shared model cache if it is not there yet), report what was prepared (the server
  writes it into the run's ``setup`` line) and, when asked, evaluate the SLM before round 1.
- ``train``: ``fedlada.host_rounds.client_step`` (``fedlada.rounds.client_step`` plus the host's step) on the
  server's teach bytes; replies with the report bytes, unless switched off the client's local log (``records`` explains the telemetry record), and, when asked, the evaluation
  of the updated SLM (one message per client and round instead of two; its state is final for the round).
- ``evaluate``: greedy accuracy of the SLM on the client's test split (``fedlada.rounds.evaluate``); the server
  sends it to clients whose train step failed.
- ``query.save``: write the client's state after a completed round to ``checkpoints/round_NNN/client_K.pt`` (and
  ``client_K_filter.pt``): the files ``fedlada.runner.InProcessClients.save`` writes, so a run directory looks the
  same for both engines.

State. The SLM's trained weights and filter state live in the node's ``context.state`` between messages (Flower keeps
it per node and run; the process that handles the next message may be another one). Preparing a SLM and its data
is the slow part of a message, so a process keeps up to ``flower.model_cache`` prepared clients, keyed by (config
digest, partition); before a message is handled the cached model is brought to the state the node's context
holds (a no-op when this process produced that state). Deployment SuperNodes start a new ClientApp process per
message, so there the cache never hits and every message prepares the SLM from the model cache on disk.

Resume. Every request names the last round this client saved its state. A node whose context holds no state (the
run was resumed, or its SuperNode restarted) loads its newest files up to that round from the checkpoint
directory (the node config's ``checkpoint-dir`` if set, else the run's own); with none named it starts from the
prepared SLM (a node that joined late).

Testing hook: the environment variable ``FEDLADA_TEST_FAIL="ROUND:CLIENT[,ROUND:CLIENT...]"`` makes the train
handler of that client raise in that round before any work (Flower turns it into an error reply). It exists for
the fault tests; nothing else reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlada import checkpoints
from fedlada.config import RunConfig, resolve_threads
from fedlada.errors import ConfigError, FedLadaError
from fedlada.runner import trainable_state  # what the runner checkpoints of a client's model
from fedlada_app import records

log = logging.getLogger(__name__)

FAIL_ENV = "FEDLADA_TEST_FAIL"

app = ClientApp()


@dataclass
class _Entry:
    """A prepared client: its library state, the public pool, what preparing it reported."""

    state: object  # fedlada.rounds.ClientState
    public: dict
    info: dict
    sizes: dict
    initial: dict  # trainable weights as prepared (restored when a node starts afresh)
    holds: str = "init"  # which state the model holds: "init", "resume-R", a state id, or "" (unknown)


_CACHE: OrderedDict[tuple[str, int], _Entry] = OrderedDict()


def _client_files(cfg: RunConfig, k: int):
    """This client's train/test records, the public pool and the general corpus; never another client's files."""
    from fedlada.prepare import ClientFiles, FederatedData, load_data, read_data_files

    if cfg.data.builtin:  # generated from its seed, identical on every node; this node uses its partition only
        data = load_data(cfg)
        return data.clients[k], data
    c, d = cfg.data.clients[k], cfg.data
    files = {"train": (c.train, c.format), "test": (c.test, c.format), "public": (d.public, d.public_format)}
    if d.general:
        files["general"] = (d.general, d.general_format)
    got = read_data_files(files, max_record_bytes=d.max_record_bytes, what=f"client {k}'s data files")
    mine = ClientFiles(got["train"], got["test"])
    return mine, FederatedData([mine], got["public"], got.get("general", []),
                               {"client": asdict(c), "public": d.public, "general": d.general})


def _prepare(cfg: RunConfig, k: int) -> _Entry:
    # Mirrors the per-client part of fedlada.runner.build_states (the parity tests hold the two together).
    from fedlada.models import prompt_formatter
    from fedlada.prepare import client_digest, data_source, eval_split, prepare_model, public_digest, split_holdout
    from fedlada.rounds import ClientState, Side, check_prompts_fit, derive_seed
    from fedlada.selection import check_method

    check_method(cfg.lada.method, cfg.lada.plugins)  # this node must have the run's plug-in rules too
    files, data = _client_files(cfg, k)
    spec = cfg.models.slm_for(k)
    model, tok, info = prepare_model(spec, role=cfg.models.slm_role(k), cfg=cfg, data=data)
    side = Side(model, tok, prompt_formatter(tok, spec, data.public, info))
    test = eval_split(files.test, cfg)
    check_prompts_fit(side, {data_source(cfg, data, k, "train"): files.train, data_source(cfg, data): data.public},
                      max_length=cfg.train.max_length, who=f"client {k}'s SLM",
                      max_new_tokens=cfg.lada.max_new_tokens, trained=data_source(cfg, data, k, "train"),
                      evaluated=test, eval_max_new_tokens=cfg.eval_max_new_tokens)
    train, hold = split_holdout(files.train, size=cfg.data.holdout_size, seed=derive_seed(cfg.seed, "holdout", k))
    state = ClientState(k, side, train, hold, test)
    return _Entry(state, {r.id: r for r in data.public}, info,
                  {"train": len(train), "holdout": len(hold), "test": len(test), "data_digest": client_digest(files),
                   "public_digest": public_digest(data.public), "public": len(data.public)},
                  trainable_state(model))


def _entry(cfg: RunConfig, digest: str, k: int, cache_size: int) -> _Entry:
    key = (digest, k)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    entry = _prepare(cfg, k)
    if cache_size > 0:
        _CACHE[key] = entry
        while len(_CACHE) > cache_size:
            _CACHE.popitem(last=False)
    return entry


def _filter(state: dict | None, cfg: RunConfig, k: int):
    from fedlada.rounds import _filter_for, derive_seed

    if state is None:
        return None
    flt = _filter_for(None, state["feature_dim"], cfg, derive_seed(cfg.seed, "filter", k))
    flt.load_state_dict(state)
    return flt


def _checkpoint_root(context: Context, req: records.Request, cfg: RunConfig) -> Path:
    """Where this client keeps its checkpoints: below the node config's ``checkpoint-dir``, in a folder of its own
    per run (``run-<key>``, the key a digest of the run's config apart from ``rounds``, so extending a run keeps it
    and two runs on the same nodes never share files); else the run's own checkpoints path (``req.checkpoint_dir``)."""
    node_dir = str(context.node_config.get("checkpoint-dir") or "")
    if node_dir:
        return Path(node_dir) / f"run-{records.config_digest(dataclasses.replace(cfg, rounds=1))}"
    return Path(req.checkpoint_dir)


def _check_checkpoint_root(root: Path) -> None:
    """ConfigError (a set-up refusal) where this node could not keep its checkpoints: found at set-up, not as a
    failed save after every round. A folder made for the probe is removed again (made by the first save): a run
    refused later leaves none behind."""
    made = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".fedlada-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"checkpoint directory {root} (node config 'checkpoint-dir', else the run's out_dir) is not "
                          f"writable on this node: {e}") from None
    if made:
        with contextlib.suppress(OSError):
            root.rmdir()


def _sync(entry: _Entry, context: Context, req: records.Request, cfg: RunConfig, k: int) -> None:
    """Bring the cached client to the state its node holds: context state, else a resume checkpoint, else fresh."""
    from fedlada.runner import load_trainable

    model = entry.state.side.model
    node = records.load_state(context.state)
    if node is not None:
        if node.digest != req.digest:
            raise ConfigError(f"client {k}: its state belongs to config {node.digest}, the server runs {req.digest}")
        if entry.holds != node.state_id:
            model.load_state_dict(node.weights(), strict=False)
            entry.state.filter = _filter(node.filter_state(), cfg, k)
            entry.holds = node.state_id
    elif req.resume_round > 0:  # a resumed run, or a node that lost its state (restarted): its newest files
        root = _checkpoint_root(context, req, cfg)
        r = next((r for r in range(req.resume_round, 0, -1)
                  if (root / f"round_{r:03d}" / f"client_{k}.pt").is_file()), None)
        if r is None:
            raise ConfigError(f"client {k}: no checkpoint client_{k}.pt in {root}/round_001.."
                              f"round_{req.resume_round:03d} to resume from (node config 'checkpoint-dir', else the "
                              "run's out_dir)")
        if entry.holds != f"resume-{r}":
            d = root / f"round_{r:03d}"
            load_trainable(model, d / f"client_{k}.pt", f"client {k}")
            ff = d / f"client_{k}_filter.pt"
            entry.state.filter = _filter(checkpoints.load(ff) if ff.is_file() else None, cfg, k)
            entry.holds = f"resume-{r}"
    elif entry.holds != "init":
        model.load_state_dict(entry.initial, strict=False)
        entry.state.filter = None
        entry.holds = "init"


def _unpack(msg: Message, context: Context):
    """(request, config, flower config, client index) of a message, after checking the config and the node."""
    import torch

    req = records.request_from(msg.content)
    cfg, fcfg = records.config_from_wire(req.config)
    if records.config_digest(cfg) != req.digest:
        raise ConfigError(f"config digest {records.config_digest(cfg)} differs from the server's {req.digest} "
                          f"(do both sides run the same fedlada version?)")
    nc = context.node_config
    _check_node_config(nc)
    if "partition-id" not in nc:
        raise ConfigError("node config lacks 'partition-id': start the SuperNode with "
                          "--node-config 'partition-id=N num-partitions=K'")
    try:
        k, n = int(nc["partition-id"]), int(nc.get("num-partitions", cfg.data.n_clients))
    except (TypeError, ValueError):
        raise ConfigError(f"node config partition-id={nc['partition-id']!r} num-partitions="
                          f"{nc.get('num-partitions', '-')!r}: expected integers (partition-id 0.."
                          f"{cfg.data.n_clients - 1})") from None
    if n != cfg.data.n_clients or not 0 <= k < n:
        raise ConfigError(f"node config partition-id={k} num-partitions={n}; the run has "
                          f"{cfg.data.n_clients} clients (partition-id 0..{cfg.data.n_clients - 1})")
    torch.set_num_threads(resolve_threads(cfg.threads))  # as the in-process runner does: the same numbers
    return req, cfg, fcfg, k


NODE_KEYS = ("partition-id", "num-partitions", "telemetry", "checkpoint-dir", "compute-lock")
_BOOLEAN = {"true": True, "1": True, "on": True, "yes": True, "false": False, "0": False, "off": False, "no": False}


def _check_node_config(nc) -> None:
    """A mistyped node-config key would be ignored silently (``telemtry=false`` leaves telemetry on: a privacy
    setting): a key close to one of ours is refused with the right spelling; another unknown key (another app's)
    is only logged. A telemetry value that is not a boolean is refused."""
    import difflib

    for key in nc:
        if key in NODE_KEYS:
            continue
        close = difflib.get_close_matches(str(key).replace("_", "-"), NODE_KEYS, n=1, cutoff=0.75)
        if close:
            raise ConfigError(f"node config key {key!r} is not one FedLaDa reads; did you mean {close[0]!r}? "
                              f"(keys: {', '.join(NODE_KEYS)})")
        log.warning("node config key %r is not one FedLaDa reads (keys: %s); ignored", key, ", ".join(NODE_KEYS))
    if "telemetry" in nc and str(nc["telemetry"]).strip().lower() not in _BOOLEAN:
        raise ConfigError(f"node config telemetry={nc['telemetry']!r}: expected true or false")


def _injected_failure(round: int, k: int) -> None:
    for item in filter(None, (s.strip() for s in os.environ.get(FAIL_ENV, "").split(","))):
        r, _, c = item.partition(":")
        if r.isdigit() and c.isdigit() and (int(r), int(c)) == (round, k):
            raise RuntimeError(f"injected failure ({FAIL_ENV}) of client {k} in round {round}")


def _evaluate(entry: _Entry, cfg: RunConfig) -> dict:
    from fedlada.rounds import evaluate

    return evaluate(entry.state.side, entry.state.test, max_new_tokens=cfg.eval_max_new_tokens)


@contextmanager
def _compute_lock(context: Context):
    """With node config ``compute-lock="PATH"``, hold an exclusive lock on PATH while handling a message: SuperNodes
    that share one machine (e.g. on loopback) then take turns, as clients do in-process, instead of all running their
    torch threads on the same cores at once. Unset (the default, one SuperNode per machine): no lock."""
    path = str(context.node_config.get("compute-lock", "") or "")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _telemetry(context: Context, on: bool) -> bool:
    return on and _BOOLEAN.get(str(context.node_config.get("telemetry", "true")).strip().lower(), True)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Which client this node is; prepare its data and SLM; report what was prepared."""
    try:
        req, cfg, fcfg, k = _unpack(msg, context)
    except ConfigError as e:  # this node's config (its partition-id) or version does not fit the run: say why
        log.error("this node cannot serve the run: %s", e)
        raw = str(context.node_config.get("partition-id", "-1"))
        k = int(raw) if raw.lstrip("-").isdigit() else -1
        return Message(records.setup_refusal_content(k, int(context.node_config.get("num-partitions", 0) or 0),
                                                     str(e)), reply_to=msg)
    with _compute_lock(context):
        try:
            _check_checkpoint_root(_checkpoint_root(context, req, cfg))
            entry = _entry(cfg, req.digest, k, fcfg.model_cache)
        except FedLadaError as e:  # this client's data, model or folders: the run cannot start here, say why
            log.error("client %d cannot start: %s", k, e)
            return Message(records.setup_refusal_content(k, cfg.data.n_clients, str(e)), reply_to=msg)
        info = {key: v for key, v in entry.info.items() if key != "cache"}  # a path on this machine stays here
        content = records.setup_content(k, cfg.data.n_clients, info, entry.sizes)
        if req.evaluate:  # the evaluation before round 1, in the same message
            _sync(entry, context, req, cfg, k)
            records.eval_content(_evaluate(entry, cfg), content)
        elif req.resume_round > 0 and records.load_state(context.state) is None:
            try:  # a resumed run: this node must hold its files of the round the run resumes after
                _sync(entry, context, req, cfg, k)
            except FedLadaError as e:
                log.error("client %d cannot resume: %s", k, e)
                return Message(records.setup_refusal_content(k, cfg.data.n_clients, str(e)), reply_to=msg)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One LaDa client step on the server's teach message."""
    from fedlada.messages import TeachMessage
    from fedlada.host_rounds import client_step

    req, cfg, fcfg, k = _unpack(msg, context)
    _injected_failure(req.round, k)
    if req.teach is None:
        raise records.RecordError("train request without teach bytes")
    teach = TeachMessage.from_bytes(req.teach)
    with _compute_lock(context):
        entry = _entry(cfg, req.digest, k, fcfg.model_cache)
        _sync(entry, context, req, cfg, k)
        entry.holds = ""  # the model is about to change: unknown until the new state is stored
        try:
            report, clog = client_step(entry.state, teach, public=entry.public, cfg=cfg, round=req.round)
        except ConfigError as e:  # a user error (a plug-in rule that fails): the run stops, as in-process
            log.error("client %d: %s", k, e)
            return Message(records.stop_content(str(e)), reply_to=msg)
        state_id = uuid.uuid4().hex
        flt = entry.state.filter
        records.store_state(context.state, weights=trainable_state(entry.state.side.model),
                            filter_state=flt.state_dict() if flt is not None else None, state_id=state_id,
                            round=req.round, digest=req.digest)
        entry.holds = state_id
        if _telemetry(context, fcfg.telemetry):
            content = records.report_content(report.to_bytes(), clog.metrics, clog.selections)
        else:
            content = records.report_content(report.to_bytes())
        if req.evaluate:  # this round's evaluation of the updated SLM, in the same message
            records.eval_content(_evaluate(entry, cfg), content)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Greedy accuracy of this client's SLM on its test split."""
    req, cfg, fcfg, k = _unpack(msg, context)
    with _compute_lock(context):
        entry = _entry(cfg, req.digest, k, fcfg.model_cache)
        _sync(entry, context, req, cfg, k)
        content = records.eval_content(_evaluate(entry, cfg))
    return Message(content, reply_to=msg)


@app.query("save")
def save(msg: Message, context: Context) -> Message:
    """Write this client's state after round ``req.round`` where the runner keeps client checkpoints."""
    req, cfg, fcfg, k = _unpack(msg, context)
    d = _checkpoint_root(context, req, cfg) / f"round_{req.round:03d}"
    d.mkdir(parents=True, exist_ok=True)
    node = records.load_state(context.state)
    written = [d / f"client_{k}.pt"]
    if node is not None:  # the state this node trained: no need to prepare the SLM
        checkpoints.save(node.weights(), written[0])
        if node.filter_bytes is not None:
            written.append(d / f"client_{k}_filter.pt")
            written[-1].write_bytes(node.filter_bytes)
    else:  # never trained in this run: the prepared (or resumed) state
        entry = _entry(cfg, req.digest, k, fcfg.model_cache)
        _sync(entry, context, req, cfg, k)
        checkpoints.save(trainable_state(entry.state.side.model), written[0])
        if entry.state.filter is not None:
            written.append(d / f"client_{k}_filter.pt")
            checkpoints.save(entry.state.filter.state_dict(), written[-1])
    return Message(records.saved_content([str(p) for p in written]), reply_to=msg)
