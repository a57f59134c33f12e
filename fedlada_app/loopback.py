"""A Flower deployment on this machine: a SuperLink and SuperNodes on 127.0.0.1, with TLS and SuperNode
authentication, each in its own process group; and ``flwr run`` against Flower's local simulation SuperLink.

The commands are those of ``docs/deployment.md`` (there for separate machines); the tests and
``benchmarks/bench_engines.py`` use this module to run them on loopback and to stop everything they started:
processes are stopped by the process group each was started in, and the detached SuperLink that ``flwr run``
starts for a local simulation is found by its command line (it names this FLWR_HOME) and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlada_app.settings import QUIET_FLOWER_ENV

REPO = Path(__file__).resolve().parents[1]
QUIET_ENV = {**QUIET_FLOWER_ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict | None = None) -> dict:
    """This environment with the venv's scripts on PATH and Flower/Ray kept offline and quiet."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(QUIET_ENV)
    env.update(extra or {})
    return env


def toml_value(v) -> str:
    """A run-config value as ``flwr run --run-config`` parses it (TOML)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    for conv in (int, float):
        try:
            conv(s)
            return s
        except ValueError:
            pass
    if s in ("true", "false"):
        return s
    from fedlada.config import toml_string

    return toml_string(s)


def write_run_config(overrides: dict, path: Path) -> Path:
    """Overrides as a TOML file of dotted keys, the form of ``--run-config FILE`` that carries any string
    (``data.clients`` JSON included) unharmed."""
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in overrides.items()), encoding="utf-8")
    return path


def stop_group(proc: subprocess.Popen, *, grace: float = 10.0) -> None:
    """SIGTERM to the process group ``proc`` leads (it was started as a group leader), SIGKILL after ``grace``."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    import psutil

    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.info["pid"]) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False


class Loopback:
    """SuperLink + SuperNodes on 127.0.0.1 (TLS and SuperNode authentication unless ``secure=False``).

    ``workdir`` receives certificates (``scripts/make_certs.sh``), one FLWR_HOME per process, and logs. With
    ``take_turns`` (default) the SuperNodes share one ``compute-lock`` file, so their ClientApps compute one at a time
    on this machine's cores, as the in-process runner's clients do."""

    def __init__(self, workdir: str | Path, *, num_keys: int, secure: bool = True, env: dict | None = None,
                 take_turns: bool = True):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.secure, self.num_keys = secure, num_keys
        self.compute_lock = (self.dir / "compute.lock").resolve() if take_turns else None
        self.env = base_env(env)
        self.port = free_port()
        self.certs = self.dir / "certs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.cli_home = self.dir / "flwr-cli"
        self.connection = "fedlada-loopback"

    # ----------------------------------------------------------------------------------------------- processes

    def _spawn(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=self.dir, env={**self.env, "FLWR_HOME": str(home)}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        p = self.dir / f"{name}.log"
        return p.read_text(errors="replace") if p.is_file() else ""

    def _cli(self, args: list[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], cwd=cwd or self.dir, env={**self.env, "FLWR_HOME": str(self.cli_home)},
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *, timeout: float = 60.0) -> None:
        """Certificates and keys, the SuperLink, and the CLI's connection to it."""
        if self.secure:
            subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(self.certs), str(self.num_keys)],
                           check=True, capture_output=True, env=self.env, timeout=120)
            tls = ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                   "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
        else:
            tls = ["--insecure"]
        self._spawn("superlink", ["flower-superlink", *tls, "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"], self.dir / "superlink-home")
        self.cli_home.mkdir(parents=True, exist_ok=True)
        conn = [f"[superlink.{self.connection}]", f'address = "127.0.0.1:{self.port}"']
        conn.append(f'root-certificates = "{self.certs / "ca.crt"}"' if self.secure else "insecure = true")
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n' + "\n".join(conn) + "\n")
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        url = f"{'https' if self.secure else 'http'}://127.0.0.1:{self.port}/health"
        verify = str(self.certs / "ca.crt") if self.secure else False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited:\n{self.log('superlink')[-3000:]}")
            try:
                if httpx.get(url, verify=verify, timeout=2.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"SuperLink not ready within {timeout:g}s:\n{self.log('superlink')[-3000:]}")

    def register(self, key: int, *, timeout: float = 60.0) -> None:
        """Register SuperNode key ``key``'s public key (``flwr supernode register``)."""
        res = self._cli(["supernode", "register", str(self.certs / f"supernode_{key}.pub"), self.connection],
                        timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed:\n{res.stdout}\n{res.stderr}")

    def start_supernode(self, name: str, *, key: int | None, partition: int, num_partitions: int,
                        extra: list[str] | None = None) -> subprocess.Popen:
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
               "--node-config", f"partition-id={partition} num-partitions={num_partitions}"
               + (f' compute-lock="{self.compute_lock}"' if self.compute_lock else "")]
        if self.secure:
            cmd += ["--root-certificates", str(self.certs / "ca.crt")]
            if key is not None:
                cmd += ["--auth-supernode-private-key", str(self.certs / f"supernode_{key}")]
        else:
            cmd.append("--insecure")
        return self._spawn(name, cmd + list(extra or []), self.dir / f"{name}-home")

    def list_nodes(self, *, timeout: float = 60.0) -> list[dict]:
        res = self._cli(["supernode", "list", self.connection, "--format", "json"], timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode list failed:\n{res.stdout}\n{res.stderr}")
        return json.loads(res.stdout).get("nodes", [])

    def run(self, overrides: dict, *, timeout: float, app: Path = REPO) -> subprocess.CompletedProcess:
        """``flwr run <app> <connection> --stream --run-config ...``; returns when the run has ended."""
        conf = write_run_config(overrides, self.dir / f"run-config-{len(list(self.dir.glob('run-config-*')))}.toml")
        return self._cli(["run", str(app), self.connection, "--stream", "--run-config", str(conf)], timeout=timeout)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):  # SuperNodes first, the SuperLink last
            stop_group(self.procs[name])

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_local_simulation(flwr_home: str | Path, overrides: dict, *, num_supernodes: int, timeout: float,
                         client_cpus: float | None = None, env: dict | None = None, app: Path = REPO
                         ) -> subprocess.CompletedProcess:
    """``flwr run <app> local`` (Flower's simulation runtime behind a local SuperLink that ``flwr`` starts
    detached), then stop that SuperLink. ``flwr_home`` must be a directory of this run's own. ``client_cpus``
    (default: every core) is what each ClientApp reserves; with as many as its torch threads, they take turns."""
    if client_cpus is None:
        from fedlada.config import resolve_threads

        client_cpus = resolve_threads(0)
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    run_env = base_env({**(env or {}), "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port())})
    try:
        return subprocess.run(["flwr", "run", str(app), "local", "--stream", "--federation-config",
                               f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus:g}",
                               "--run-config", str(write_run_config(overrides, home / "run-config.toml"))],
                              cwd=home, env=run_env, capture_output=True, text=True, timeout=timeout)
    finally:
        stop_local_superlink(home)


def stop_local_superlink(flwr_home: str | Path, *, grace: float = 10.0) -> list[int]:
    """Stop the SuperLink ``flwr run ... local`` left running for this FLWR_HOME; returns the PIDs stopped."""
    import psutil

    marker = str(Path(flwr_home) / "local-superlink")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "flower-superlink" in cmd and marker in cmd:
            found.append(p)
    for p in found:
        try:
            kids = p.children(recursive=True)
            p.terminate()
            _, alive = psutil.wait_procs([p, *kids], timeout=grace)
            for q in alive:
                q.kill()
        except psutil.Error:
            pass
    return [p.pid for p in found]
