"""The Flower ServerApp of LaDa: the library's round loop (``fedlada.runner.drive``) over a Flower Grid.

``serve`` does what ``fedlada.runner.run`` does (run directory, data, the LLM, the loop), with
:class:`FlowerClients` in place of ``InProcessClients``: the same four methods, each one Flower message per client.
Every line of the round logic (teach, the checks on each report, learn, evaluation, checkpoints, resume) is the
library's.

The server reads the public pool, ``data.general`` and, where they are on its machine, the clients' test files
(``prepare.load_server_data``), never a client's train file: the LLM's accuracy is measured on the union of the
clients' test splits, as in the in-process runner and the paper. That is evaluation-only access for the
experimenter; no training step of the server reads a client's records.

Faults. A node whose reply is a Flower error, or malformed (``records.RecordError``), or missing after
``flower.timeout`` seconds, becomes a failed client of that round (``client_failed`` in ``metrics.jsonl``, with the
reason); the round goes on when at least ``min_clients`` reported (else ``drive`` stops after the last checkpoint).
A report whose bytes do not parse is rejected by ``drive`` itself. A node that failed keeps its previous state
(Flower does not store the context of a failed message), as a failed client does in the in-process runner. One
asymmetry remains: a node that replies after the timeout has trained although the server counted it as failed.

Besides the run directory's files, the server appends one line per Flower exchange to ``flower.jsonl`` (round,
step, seconds, clients asked, bytes of the messages' content each way, failed clients).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedlada.config import RunConfig
from fedlada.errors import ConfigError, FedLadaError
from fedlada.runner import ClientResult, Events, RunDir, RunResult
from fedlada_app import records
from fedlada_app.settings import FlowerConfig, split_run_config

log = logging.getLogger(__name__)

app = ServerApp()


class ConnectError(FedLadaError):
    """Too few SuperNodes of the run's partitions connected in time."""


class SetupRefused(FedLadaError):
    """A SuperNode cannot start its client: its data or model is wrong (the node's reason is in the message)."""


@dataclass
class _Reply:
    client_id: int
    message: Message | None = None
    error: str | None = None


def _last_line(reason: str, limit: int = 400) -> str:
    """The telling line of a Flower error reason (which may carry a whole remote traceback)."""
    lines = [x.strip() for x in str(reason).splitlines() if x.strip()]
    last = (lines[-1] if lines else "").removesuffix("'>").strip()
    last = re.sub(r"^<class '([\w.]+)'>:<'", r"\1: ", last)  # Flower's "<class 'E'>:<'message'>" wrapping
    return last if len(last) <= limit else last[: limit - 3] + "..."


class FlowerClients:
    """The clients of a run, reached through a Flower Grid (same methods as ``fedlada.runner.InProcessClients``)."""

    PULL_SECONDS = 1.0  # how often replies are pulled from a grid without its own pull interval (Flower's: 3 s)

    def __init__(self, grid: Grid, cfg: RunConfig, fcfg: FlowerConfig, rd: RunDir, events: Events | None = None,
                 *, public: tuple[str, int] | None = None):
        self.grid, self.cfg, self.fcfg, self.rd = grid, cfg, fcfg, rd
        self.public = public  # (digest, records) of the server's public pool: every node must read the same one
        self.events = events or Events()
        self.config, self.digest = records.wire_config(cfg, fcfg), records.config_digest(cfg)
        self.nodes: dict[int, int] = {}  # client id -> node id
        self._ignored: set[int] = set()  # nodes that are not a client of this run
        self.saved: dict[int, int] = {}  # client id -> last round it saved its state (a node without state loads it)
        self.setup: dict[int, tuple[dict, dict]] = {}  # client id -> (SLM info, split sizes)
        self._evals: dict[int, dict[int, dict]] = {}  # round -> client id -> evaluation that came with a reply
        self._resume_round = 0  # during connect(): the round a resumed run's nodes must load at set-up

    @property
    def ids(self) -> list[int]:
        return list(range(self.cfg.data.n_clients))

    # ----------------------------------------------------------------------------------------- messaging

    def _request(self, round: int = 0, teach: bytes | None = None, evaluate: bool = False
                 ) -> Callable[[int], records.Request]:
        """Client id -> its request (each names the last round that client saved its state)."""
        ckpt = str(self.rd.ckpt.resolve())
        return lambda k: records.Request(self.config, self.digest, round=round, resume_round=self.saved.get(k, 0),
                                         checkpoint_dir=ckpt, teach=teach, evaluate=evaluate)

    def _keep_eval(self, round: int, rep: "_Reply") -> None:
        if rep.message is not None and records.has_eval(rep.message.content):
            try:
                self._evals.setdefault(round, {})[rep.client_id] = records.eval_from(rep.message.content)
            except records.RecordError as e:  # evaluated again by a plain evaluate message
                log.warning("round %d: client %d: malformed evaluation ignored: %s", round, rep.client_id, e)

    def _send_and_receive(self, msgs: list, timeout: float) -> list:
        """The grid's ``send_and_receive``, counting the replies as they come (a progress bar of the clients that
        answered; a line every 30 s when the output is a file). A grid without ``push_messages``/``pull_messages``
        is asked through ``send_and_receive``."""
        grid = self.grid
        if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
            return list(grid.send_and_receive(msgs, timeout=timeout))
        pending = set(grid.push_messages(msgs))
        total, replies = len(msgs), []
        self.events.progress(0, total)
        interval = getattr(grid, "pull_interval", self.PULL_SECONDS)  # the in-memory grid's own (0.1 s)
        end = time.time() + timeout
        while pending and time.time() < end:
            got = list(grid.pull_messages(pending))
            if got:
                replies += got
                pending -= {m.metadata.reply_to_message_id for m in got}
                self.events.progress(total - len(pending), total)
            if pending:
                time.sleep(interval)
        return replies

    def _exchange(self, kind: str, targets: dict[int, int], req: Callable[[int], records.Request], *, round: int,
                  timeout: float) -> list[_Reply]:
        """Send ``req(key)`` as a ``kind`` message to each target (key -> node id); one reply or error per key."""
        if not targets:
            return []
        contents = {key: records.request_content(req(key)) for key in targets}
        size = sum(records.content_bytes(c) for c in contents.values())
        msgs = {key: Message(content=contents[key], dst_node_id=node, message_type=kind, group_id=str(round))
                for key, node in targets.items()}
        by_node = {node: key for key, node in targets.items()}
        t0 = time.perf_counter()
        replies = self._send_and_receive(list(msgs.values()), timeout)
        # a reply answers a message id (the grid sets it when sending); an error the SuperLink writes for a node
        # it lost ("node unavailable") comes from the SuperLink, not from that node
        by_id = {getattr(getattr(m, "metadata", None), "message_id", None): key for key, m in msgs.items()}
        by_id.pop(None, None)
        by_id.pop("", None)
        got: dict[int, _Reply] = {}
        received = 0
        for rep in replies:
            key = by_id.get(getattr(rep.metadata, "reply_to_message_id", None), by_node.get(rep.metadata.src_node_id))
            if key is None:
                continue
            if rep.has_error():
                log.debug("%s reply of %s: Flower error %s: %s", kind, key, rep.error.code, rep.error.reason)
                got[key] = _Reply(key, error=f"Flower error {rep.error.code}: {_last_line(rep.error.reason)}")
            else:
                got[key] = _Reply(key, message=rep)
                received += records.content_bytes(rep.content)
        waited = time.perf_counter() - t0
        missing = (f"no reply within flower.timeout={timeout:g}s" if waited >= 0.9 * timeout else
                   f"no reply (the SuperLink returned after {waited:.1f}s without one: the node is gone or the "
                   "message was not delivered; see the SuperLink's log)")
        out = [got.get(key) or _Reply(key, error=missing) for key in targets]
        self.rd.append("flower.jsonl", [{
            "round": round, "event": kind, "seconds": float(f"{time.perf_counter() - t0:.2f}"),
            "clients": len(targets), "sent_bytes": size, "received_bytes": received,
            "failed": sorted(r.client_id for r in out if r.error is not None)}])
        return out

    def _discover(self, *, evaluate: bool = False) -> None:
        """Set up the nodes not seen yet: each prepares its SLM and replies with the partition it serves (and, with
        ``evaluate``, its evaluation before round 1). One message per node, so the clients' start-up (imports, data,
        SLM) happens once."""
        new = {n: n for n in self.grid.get_node_ids() if n not in self.nodes.values() and n not in self._ignored}
        if not new:
            return
        self.events.stage(f"preparing the SLMs of {len(new)} SuperNode(s)")
        setup = self._request(evaluate=evaluate)
        # a node's set-up (imports, data, SLM) may take longer than one step: it gets the whole connect window
        wait = max(self.fcfg.timeout, self.fcfg.connect_timeout)
        request = dataclasses.replace(setup(-1), resume_round=self._resume_round)
        refusals: list[str] = []  # every node that refuses is named at once (each is a fix on another machine)
        for rep in self._exchange(records.SETUP_TYPE, new, lambda node: request, round=0, timeout=wait):
            node = rep.client_id
            if rep.error is not None:
                log.warning("node %s: setup failed: %s", node, rep.error)
                self._ignored.add(node)
                continue
            refused = records.setup_refusal(rep.message.content)
            if refused is not None:  # a user error on that node (its data, its model): stop, as in-process
                k = rep.message.content[records.SETUP].get("partition-id", -1)
                who = f"client {k}" if isinstance(k, int) and k >= 0 else "a client"
                refusals.append(f"{who} (SuperNode {node}) cannot start: {refused}")
                continue
            try:
                k, n, info, sizes = records.setup_from(rep.message.content)
            except records.RecordError as e:
                log.warning("node %s: malformed setup reply: %s", node, e)
                self._ignored.add(node)
                continue
            if k in self.nodes and self.nodes[k] in set(self.grid.get_node_ids()):
                # two live SuperNodes claim one client: an operator error that would run the experiment without
                # the client whose node has the wrong partition-id
                raise SetupRefused(f"SuperNodes {self.nodes[k]} and {node} both serve client {k} (node config "
                                   f"partition-id={k}); give each SuperNode its own partition-id 0.."
                                   f"{self.cfg.data.n_clients - 1}")
            theirs, count = sizes.pop("public_digest", None), sizes.pop("public", None)
            if self.public is not None and theirs is not None and theirs != self.public[0]:
                raise SetupRefused(
                    f"client {k} (SuperNode {node}) reads another public pool than the server ({count} records, "
                    f"digest {theirs}; the server's: {self.public[1]} records, digest {self.public[0]}): the "
                    f"server's question ids name records of its own file, so every machine needs the same "
                    f"data.public file")
            if n != self.cfg.data.n_clients or not 0 <= k < n:
                log.warning("node %s serves partition %d of %d; the run has %d clients: ignored", node, k, n,
                            self.cfg.data.n_clients)
                self._ignored.add(node)
                continue
            self.nodes[k] = node
            self.setup[k] = (info, sizes)
            self._keep_eval(0, _Reply(k, message=rep.message))
        if refusals:
            raise SetupRefused("; ".join(refusals) if len(refusals) == 1 else
                               f"{len(refusals)} SuperNodes cannot start:\n  " + "\n  ".join(refusals))

    def connect(self, *, evaluate: bool = True, resume_round: int = 0) -> None:
        """Set up nodes as they come until one serves every partition (or ``flower.connect_timeout``); with
        ``evaluate``, each client's SLM is also evaluated before round 1 in the same message; with ``resume_round``,
        each node loads its checkpoint of that round during its set-up (one it cannot load is a refusal)."""
        n = self.cfg.data.n_clients
        deadline = time.monotonic() + self.fcfg.connect_timeout
        self.events.stage(f"waiting for the SuperNodes of {n} clients")
        self._resume_round = resume_round
        try:
            while True:
                self._discover(evaluate=evaluate)
                if len(self.nodes) == n or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            self._resume_round = 0  # a node (re)joining mid-run loads its files with its first step
        if len(self.nodes) < max(self.cfg.min_clients, 1):
            failed = (f"; {len(self._ignored)} SuperNode(s) answered the set-up with an error, not in time or for "
                      f"another run (see the warnings above)" if self._ignored else "")
            raise ConnectError(f"{len(self.nodes)} of {n} clients connected within flower.connect_timeout="
                               f"{self.fcfg.connect_timeout:g}s; min_clients={self.cfg.min_clients}{failed}")
        if len(self.nodes) < n:
            log.warning("clients %s did not connect; continuing with %s",
                        sorted(set(self.ids) - set(self.nodes)), sorted(self.nodes))

    def _to_clients(self, kind: str, req: records.Request, round: int, only: set[int] | None = None, *,
                    refresh: bool = True) -> list[_Reply]:
        if refresh:
            self._refresh(round)
        targets = {k: n for k, n in self.nodes.items() if only is None or k in only}
        replies = {r.client_id: r for r in self._exchange(kind, targets, req, round=round,
                                                         timeout=self.fcfg.timeout)}
        return [replies.get(k) or _Reply(k, error="no SuperNode serves this client")
                for k in self.ids if only is None or k in only]

    def _refresh(self, round: int) -> None:
        """Forget the nodes the SuperLink no longer lists, and set up any that (re)joined."""
        live = set(self.grid.get_node_ids())
        for k, node in list(self.nodes.items()):
            if node not in live:  # the SuperLink dropped it (a restarted node comes back under a new id)
                log.warning("round %d: client %d's SuperNode %s left; a SuperNode serving it may join again", round,
                            k, node)
                del self.nodes[k]
        if len(self.nodes) < self.cfg.data.n_clients:
            self._discover()  # a SuperNode may have (re)joined

    # ------------------------------------------------------------------------------ the pool's contract

    def step(self, teach: bytes, round: int) -> list[ClientResult]:
        self._refresh(round)  # first, so the line below counts a node that rejoined
        self.events.stage(f"round {round}/{self.cfg.rounds}: {len(self.nodes)} clients")
        out = []
        for rep in self._to_clients(records.TRAIN, self._request(round, teach, evaluate=True), round, refresh=False):
            self._keep_eval(round, rep)
            if rep.error is not None:
                out.append(ClientResult(rep.client_id, error=rep.error))
                continue
            stop = records.stop_reason(rep.message.content)
            if stop is not None:
                raise ConfigError(f"round {round}: client {rep.client_id}: {stop}")
            try:
                report, metrics, selections = records.report_from(rep.message.content)
            except records.RecordError as e:
                out.append(ClientResult(rep.client_id, error=f"malformed reply rejected: {e}"))
                continue
            out.append(ClientResult(rep.client_id, report, metrics, selections))
        return out

    def evaluate(self, round: int) -> list[dict]:
        """Each client's evaluation: the one that came with its setup or train reply, else an evaluate message
        (a client whose step failed is evaluated in the state it kept, as the in-process runner does)."""
        done = self._evals.pop(round, {})
        missing = set(self.ids) - set(done)
        asked = {r.client_id: r for r in self._to_clients(records.EVALUATE, self._request(round), round, missing)
                 } if missing else {}
        rows = []
        for k in self.ids:
            who = f"client{k}"
            if k in done:
                rows.append({"round": round, "event": "eval", "who": who, **done[k]})
                continue
            rep = asked[k]
            if rep.error is None:
                try:
                    rows.append({"round": round, "event": "eval", "who": who,
                                 **records.eval_from(rep.message.content)})
                    continue
                except records.RecordError as e:
                    rep.error = f"malformed reply rejected: {e}"
            log.warning("round %d: evaluation of %s failed: %s", round, who, rep.error)
            rows.append({"round": round, "event": "eval_failed", "who": who, "reason": rep.error})
        return rows

    def save(self, d: Path) -> None:
        round = int(d.name.split("_")[1])
        for rep in self._to_clients(records.SAVE_TYPE, self._request(round), round):
            if rep.error is not None:  # its state of this round is lost for a resume: a failed step, on record
                log.warning("round %d: client %d could not save its state: %s", round, rep.client_id, rep.error)
                self.rd.append("metrics.jsonl", [{"round": round, "event": "client_failed",
                                                  "who": f"client{rep.client_id}",
                                                  "reason": f"could not save its state: {rep.error}"}])
            else:
                self.saved[rep.client_id] = round

    def load(self, d: Path) -> None:
        """Nodes load their own state of this round on their next message (their context holds none)."""
        start = int(d.name.split("_")[1])
        self.saved = {k: start for k in self.ids}
        self.rd.truncate_after("flower.jsonl", start)


def serve(grid: Grid, cfg: RunConfig, fcfg: FlowerConfig, *, resume: bool = True, events: Events | None = None,
          t_start: float | None = None) -> RunResult:
    """Run (or resume) LaDa with the clients behind ``grid``; the ServerApp's body."""
    from fedlada.generation import llm_backend
    from fedlada.host_rounds import check_host_config
    from fedlada.models import prompt_formatter
    from fedlada.prepare import data_source, eval_split, load_server_data, prepare_model, public_digest
    from fedlada.rounds import ServerState, Side, check_prompts_fit
    from fedlada.runner import begin_run, check_clients_unchanged, drive, load_resumed
    from fedlada.selection import check_method, plugin_fingerprints

    events = events or Events()
    t_start = t_start if t_start is not None else time.perf_counter()
    check_host_config(cfg)  # a refused host/model pairing fails before any work, as in-process
    check_method(cfg.lada.method, cfg.lada.plugins)  # a plug-in selection rule that cannot be loaded, too
    begun = begin_run(cfg, resume=resume, events=events, t_start=t_start, load=load_server_data)
    if isinstance(begun, RunResult):
        return begun
    rd, start, data = begun.rd, begun.start, begun.data
    if not start:
        (rd.path / "flower.jsonl").unlink(missing_ok=True)
    with begun.setting_up():  # a new run whose models cannot be prepared leaves no run folder
        events.stage("preparing the LLM")
        llm, ltok, llm_info = prepare_model(cfg.models.llm, role="llm", cfg=cfg, data=data,
                                            progress=events.progress)
        server = ServerState(Side(llm, ltok, prompt_formatter(ltok, cfg.models.llm, data.public, llm_info)),
                             {r.id: r for r in data.public})
        server.backend = llm_backend(cfg.models.llm, llm_info)
        check_prompts_fit(server.side, {data_source(cfg, data): data.public}, max_length=cfg.train.max_length,
                          who="the LLM", max_new_tokens=cfg.lada.max_new_tokens,
                          evaluated=[r for files in data.clients for r in eval_split(files.test, cfg)],
                          eval_max_new_tokens=cfg.eval_max_new_tokens)
        pool = FlowerClients(grid, cfg, fcfg, rd, events, public=(public_digest(data.public), len(data.public)))
        # a node that refuses (its data, its model, on a resume its checkpoint) also stops the run cleanly
        pool.connect(evaluate=not start, resume_round=start)
        if start:  # the server has no client's train file: each node vouches for its own records
            check_clients_unchanged(rd, {k: sizes.get("data_digest") for k, (_info, sizes) in pool.setup.items()})
        infos = {"llm": llm_info, **{f"client{k}": pool.setup[k][0] for k in sorted(pool.setup)}}
        load_resumed(rd, cfg, start, server, pool, infos, events)
    llm_test = [rec for files in data.clients for rec in eval_split(files.test, cfg)]
    setup = {"models": infos, "data": data.source, "data_digest": begun.digest, "public": len(data.public),
             "threads": torch.get_num_threads(),
             **({"plugins": plugin_fingerprints(cfg.lada.plugins)} if cfg.lada.plugins else {}),
             "clients": [pool.setup[k][1] if k in pool.setup else None for k in pool.ids]}
    return drive(cfg, rd, start, server, pool, llm_test, events, setup=setup, t_start=t_start)


def make_server_app(cfg: RunConfig, fcfg: FlowerConfig, *, resume: bool = True, events: Events | None = None,
                    t_start: float | None = None, done: Callable[[RunResult], None] | None = None) -> ServerApp:
    """A ServerApp bound to a config (for ``flwr.simulation.run_simulation``, which passes no run config)."""
    bound = ServerApp()

    @bound.main()
    def main(grid: Grid, context: Context) -> None:
        result = serve(grid, cfg, fcfg, resume=resume, events=events, t_start=t_start)
        if done is not None:
            done(result)

    return bound


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run``: the config is Flower's run config (pyproject defaults plus ``--run-config`` overrides)."""
    for name in ("fedlada", "fedlada_app"):  # the library's and this glue's lines (the run directory at the end)
        lib = logging.getLogger(name)
        lib.setLevel(logging.INFO)
        if not lib.handlers:  # Flower mirrors the ServerApp's stdout/stderr to `flwr log`, not the root logger's INFO
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
            lib.addHandler(handler)
            lib.propagate = False
    cfg, fcfg = split_run_config(context.run_config)
    if not os.path.isabs(os.path.expanduser(cfg.out_dir)):
        log.warning("out_dir %r is relative: the run directory is %s, below the SuperLink's working directory "
                    "(python -m fedlada_app.settings --run-config FILE writes absolute paths)", cfg.out_dir,
                    os.path.abspath(os.path.expanduser(cfg.out_dir)))
    try:
        result = serve(grid, cfg, fcfg)
    except FedLadaError as e:  # a user error: its one line ends the log (Flower reports the ServerApp's failure)
        log.error("%s", e)
        raise
    from rich.console import Console

    from fedlada.report import print_summary, write_report

    report = write_report(result.run_dir)
    log.info("run finished: %s (report: %s)", json.dumps(result.summary.get("final", {})), report)
    print_summary(result.summary, console=Console(file=sys.stdout, width=120), wall_seconds=result.wall_seconds)
