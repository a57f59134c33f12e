"""``fedlada run --engine flower``: the ServerApp and ClientApp in Flower's simulation engine, from Python.

One virtual SuperNode per client (``partition-id`` = client index); the ServerApp runs in a thread of this process,
the ClientApps in Ray workers with ``flower.client_cpus`` CPUs each (so ``cores / client_cpus`` clients work in
parallel, each with ``cfg.threads`` torch threads; by default as many CPUs as threads, so they take turns). ``flwr.simulation.run_simulation`` passes no run config, so the
ServerApp is bound to ``cfg`` here and sends the config to the clients with every message (see ``records``).
Flower 1.42 marks ``run_simulation`` deprecated in favour of ``flwr run`` (its warning is shown with ``verbose``
only); ``flwr run . local`` runs the same apps from ``pyproject.toml`` (docs/deployment.md).

Start-up costs what Ray costs: on a 2-core machine about 8-10 s to start Ray and a few seconds for each worker's
first import of torch/transformers and its first SLM; models then stay loaded in the workers (``flower.model_cache``).
"""

from __future__ import annotations

import logging
import os
import re
import time

from fedlada.config import RunConfig, resolve_threads
from fedlada.errors import ConfigError
from fedlada.runner import Events, RunDir, RunResult, summarize_run
from fedlada_app.settings import QUIET_FLOWER_ENV, FlowerConfig

log = logging.getLogger(__name__)

QUIET_ENV = QUIET_FLOWER_ENV  # set before Flower starts, unless the caller chose otherwise


def backend_config(fcfg: FlowerConfig, cfg: RunConfig) -> dict:
    """Ray's resources per ClientApp: ``flower.client_cpus``, or (0, the default) the run's torch threads capped at
    the cores Ray sees, so on the default config one ClientApp at a time uses every core, as in-process."""
    cpus = fcfg.client_cpus or min(resolve_threads(cfg.threads), resolve_threads(0))
    return {"client_resources": {"num_cpus": cpus, "num_gpus": fcfg.client_gpus},
            # Ray on loopback only, without its dashboard: both shorten start-up
            "init_args": {"include_dashboard": False, "logging_level": "ERROR", "_node_ip_address": "127.0.0.1"}}


def _not_our_deprecation(record: logging.LogRecord) -> bool:
    """Flower's warning that ``run_simulation`` is deprecated is this module's concern, not the user's: dropped
    (``verbose`` keeps it)."""
    return not (str(record.msg).startswith("DEPRECATED FEATURE") and "run_simulation" in str(record.args))


ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its actors' names


class ClientAppTracebacks(logging.Filter):
    """Flower's engine logs a failed ClientApp as three ERROR records (its exception with Ray's repr, a traceback,
    a notice): 40-60 lines a failure, each printed twice (Flower's handler and the root logger's). The run already
    says which client failed and why (``client_failed`` in ``metrics.jsonl`` and a one-line warning), so without
    ``verbose`` these records go to ``path`` (``flower-errors.log`` in the run directory), nothing lost, and the
    terminal gets one line naming that file on the first failure."""

    MODULES = ("vce_api", "raybackend")  # flwr.server.superlink.fleet.vce: the simulation's worker and Ray backend

    def __init__(self, path):
        super().__init__()
        self.path, self.diverted = path, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or record.module not in self.MODULES:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {ANSI_RE.sub('', record.getMessage())}\n")
        except OSError:
            return True  # it cannot be kept in a file: printed, as Flower would
        if not self.diverted:
            log.warning("a ClientApp failed; Flower's traceback is in %s (--verbose prints it)", self.path)
        self.diverted += 1
        return False


def run_simulation(cfg: RunConfig, *, resume: bool = True, events: Events | None = None,
                   flower: FlowerConfig | None = None, verbose: bool = False) -> RunResult:
    """Run (or resume) ``cfg`` in Flower's simulation engine; the RunResult is read back from the run directory.

    ``flower`` sets the engine's knobs (default ``FlowerConfig()``). A user error raised by the ServerApp (bad
    config, bad data, too few clients) propagates as that error."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedlada_app.client_app import app as client_app
    from fedlada_app.server_app import make_server_app

    fcfg = flower or FlowerConfig()
    cores = resolve_threads(0)
    if fcfg.client_cpus > cores:
        raise ConfigError(f"config key 'flower.client_cpus': a ClientApp asking for {fcfg.client_cpus:g} CPUs can "
                          f"never be placed on this machine ({cores} usable cores); use at most {cores}, or 0 (the "
                          f"run's threads)")
    if fcfg.client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if fcfg.client_gpus > gpus:
            raise ConfigError(f"config key 'flower.client_gpus': a ClientApp asking for {fcfg.client_gpus:g} GPUs "
                              f"can never be placed on this machine ({gpus} CUDA device(s)); use at most {gpus}, or 0 "
                              f"(none reserved)")
    from fedlada.runner import check_run_dir

    check_run_dir(cfg, resume=resume)  # a folder this config cannot run in is refused before Ray starts
    cpus = backend_config(fcfg, cfg)["client_resources"]["num_cpus"]
    workers = max(1, int(cores // cpus)) if cpus else 1
    if fcfg.model_cache and cfg.data.n_clients > fcfg.model_cache * workers:
        # the workers serve the clients in the same order every round: least-recently-used entries are always the
        # ones needed next, so every client is prepared again for every message
        log.warning("flower.model_cache=%d prepared clients per worker x %d worker(s) hold fewer than the run's %d "
                    "clients: each client is prepared again (model, data) for every step; --set "
                    "flower.model_cache=%d keeps them all, if memory allows", fcfg.model_cache, workers,
                    cfg.data.n_clients, -(-cfg.data.n_clients // workers))
    t0 = time.perf_counter()
    done: list[RunResult] = []
    server_app = make_server_app(cfg, fcfg, resume=resume, events=events, t_start=t0, done=done.append)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    tracebacks = ClientAppTracebacks(RunDir(cfg.out_dir).path / "flower-errors.log")
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(_not_our_deprecation)
        flwr_logger.addFilter(tracebacks)
    pythonpath = os.environ.get("PYTHONPATH")  # Flower's Ray backend rewrites it for its workers
    try:
        flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.n_clients,
                            backend_config=backend_config(fcfg, cfg), verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(_not_our_deprecation)
        flwr_logger.removeFilter(tracebacks)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if not done:
        raise RuntimeError("the Flower simulation ended without finishing the run (see the log above)")
    rd = RunDir(cfg.out_dir)
    return RunResult(rd.path, summarize_run(rd, cfg), time.perf_counter() - t0, resumed_from=done[0].resumed_from,
                     extra={"engine": "flower-simulation"})
