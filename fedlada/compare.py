"""The experiment table: several methods x seeds on the same data and budget, resumable, as Markdown/CSV/plot.

Each (method, seed) is an ordinary run in ``OUT/<method>/seed<k>/``; a run whose ``summary.json`` exists is
reused, and a partly finished run resumes from its last completed round, so a table can be completed later. A cell
another process is running (a second ``fedlada compare`` into the same folder) is left for later: this one runs the
other cells first, then waits for that run to end and takes its result.
Only the method and the seed differ between the runs of a table; everything else comes from the one
config, so all methods see the same data, models and round budget.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

from fedlada.config import RunConfig
from fedlada.report import who_key

log = logging.getLogger(__name__)

BUSY_POLL_SECONDS = 10.0  # how often a cell another process runs is tried again, once the others are done

DEFAULT_METHODS = ("local", "all", "random", "lada-sft", "lada")


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None  # undefined for one
    return m, sd


def parse_method(entry: str, default_host: str, plugins: tuple[str, ...] = (), *,
                 load: bool = True) -> tuple[str, str, str]:
    """``"lada"`` or ``"<host>:<method>"`` -> (host, method, row label). The label is the method alone for LaDa
    without a host, else ``<host>-<method>`` (also the run's sub-directory). A method may be a selection rule
    registered by ``plugins`` (``lada.plugins``), imported to check it unless ``load`` is false."""
    from fedlada.config import HOSTS, METHODS, method_label
    from fedlada.errors import ConfigError
    from fedlada.selection import check_method

    host, _, method = entry.rpartition(":")
    host = host or default_host
    if host not in HOSTS:
        raise ConfigError(f"--methods: {entry!r} names host {host!r}; expected one of {HOSTS}")
    if method not in METHODS:
        if not plugins:
            raise ConfigError(f"--methods: {entry!r} names method {method!r}; expected one of {METHODS} (or a "
                              "selection rule of a plug-in named in lada.plugins)")
        if load:  # (a table of finished runs only reads their files: it needs no plug-in)
            check_method(method, plugins, key="--methods")
    return host, method, method_label(host, method)


def check_table_folder(out: Path) -> None:
    """``--out`` must not be a file or a run's folder (``fedlada run``): the table's files and its runs would land
    among that run's. Any other folder is taken (a table's, a new one, one holding the experiment's config)."""
    from fedlada.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder for the table")
    if (out / "table.json").is_file():
        return
    if (out / "metrics.jsonl").is_file() or (out / "checkpoints").is_dir() or (out / "summary.json").is_file():
        raise ConfigError(f"--out {out}: is a run's folder (fedlada run), not a table's; give another folder")


def run_table(base: RunConfig, *, methods: tuple[str, ...], seeds: tuple[int, ...], out: str | Path,
              events=None, overrides_per_method: dict[str, list[str]] | None = None,
              finished_only: bool = False) -> dict:
    """Run (or reuse) every (method, seed) and return the aggregated table.

    A method is ``<method>`` (with the config's ``host.name``) or ``<host>:<method>``, so one table can hold LaDa
    alone, each host alone and each host + LaDa side by side (``none:lada,fedmkt:host,fedmkt:lada``).
    ``finished_only`` runs nothing: the table holds the runs already finished (each row says over how many seeds)."""
    from fedlada import runner
    from fedlada.report import write_report
    from fedlada.config import config_diff, same_config, with_overrides
    from fedlada.errors import ConfigError, RunDirBusy

    out = Path(out)
    check_table_folder(out)
    parsed = [parse_method(m, base.host.name, base.lada.plugins, load=not finished_only) for m in methods]
    labels = [p[2] for p in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods: {list(methods)} names a method twice")
    if not seeds:
        raise ConfigError("--seeds: expected an integer >= 1")
    from fedlada.host_rounds import check_host_config

    for host, method, _name in parsed:  # a pairing the host cannot run fails before any run starts
        check_host_config(with_overrides(base, {"host.name": host, "lada.method": method}))
    digest = None  # of the table's data, computed once when a finished run is first reused

    def cell(host: str, method: str, name: str, seed: int) -> dict | None:
        nonlocal digest
        extra = (overrides_per_method or {}).get(method, [])
        cfg = with_overrides(with_overrides(base, {"host.name": host, "lada.method": method, "seed": seed,
                                                   "out_dir": str(out / name / f"seed{seed}")}), extra)
        summ = Path(cfg.out_dir) / "summary.json"
        try:  # a damaged summary.json: the run is resumed, which writes it again from the metrics
            finished = summ.is_file() and isinstance(json.loads(summ.read_text()), dict)
        except ValueError:
            finished = False
        if finished:
            if not same_config(Path(cfg.out_dir) / "config.toml", cfg):
                keys = config_diff(Path(cfg.out_dir) / "config.toml", cfg)
                raise ConfigError(f"{cfg.out_dir} holds a finished run with a different config (differs in: "
                                  f"{', '.join(keys)}); use another --out for a table with other settings")
            if digest is None:
                from fedlada.prepare import data_digest, load_data

                digest = data_digest(load_data(base))
            runner.check_data_unchanged(runner.RunDir(cfg.out_dir), digest)
            if not finished_only:  # a finished run of an edited rule is not this rule's result
                runner.check_plugins_unchanged(runner.RunDir(cfg.out_dir), cfg)
            s = json.loads(summ.read_text())
            log.info("reusing %s", summ)
            if not (Path(cfg.out_dir) / "report.html").is_file() and not finished_only:
                write_report(cfg.out_dir)  # an earlier table stopped between the run's end and its report
            return s
        if finished_only:
            log.warning("no finished run in %s: left out of the table", cfg.out_dir)
            return None
        if events:
            events.stage(f"{name}, seed {seed}")
        res = runner.run(cfg, resume=True, events=events)
        write_report(res.run_dir)  # every run of the table is a full run directory
        return res.summary

    rows = {}
    busy = []  # cells another process is running: taken after the others
    for host, method, name in parsed:
        for seed in seeds:
            try:
                s = cell(host, method, name, seed)
            except RunDirBusy as e:
                log.warning("%s; this table runs its other cells first and comes back to it",
                            str(e).split(";")[0])  # (not the advice to wait: this table does)
                busy.append((host, method, name, seed))
                continue
            if s is not None:
                rows[(name, seed)] = s
    for host, method, name, seed in busy:
        waiting = False
        while True:
            try:
                s = cell(host, method, name, seed)
                break
            except RunDirBusy:
                if not waiting and events:
                    events.stage(f"{name}, seed {seed}: waiting for the other process running it to end")
                waiting = True
                time.sleep(BUSY_POLL_SECONDS)
        if s is not None:
            rows[(name, seed)] = s
    if not rows:
        raise ConfigError(f"{out}: no finished run of {', '.join(labels)} at seeds {list(seeds)} to tabulate")
    return aggregate(rows, methods=tuple(labels), seeds=seeds)


def _mean_before(run: dict, clients: list[str]) -> float | None:
    """The clients' mean accuracy before round 1, or None where a client has no round-0 evaluation."""
    before = [run["accuracy"].get(c, {}).get("0") for c in clients]
    return None if not before or any(b is None for b in before) else sum(before) / len(before)


def aggregate(rows: dict, *, methods, seeds) -> dict:
    table = []
    for method in methods:
        runs = [rows[(method, s)] for s in seeds if (method, s) in rows]
        if not runs:
            continue
        clients = sorted({k for r in runs for k in r["final"] if k.startswith("client")}, key=who_key)
        entry = {"method": method, "seeds": len(runs)}
        entry["mean_slm"] = _mean_std([r["mean_slm_accuracy"] for r in runs])
        for c in clients:
            entry[c] = _mean_std([r["final"].get(c) for r in runs])
        entry["llm"] = _mean_std([r["final"].get("llm") for r in runs])
        entry["llm_before"] = _mean_std([r["accuracy"].get("llm", {}).get("0") for r in runs])
        entry["slm_before"] = _mean_std([_mean_before(r, clients) for r in runs])
        entry["bytes"] = _mean_std([r["bytes_client_to_server"] + r["bytes_server_to_client"] for r in runs])
        entry["train_tokens"] = _mean_std([r["train_tokens_federated"] for r in runs])
        table.append(entry)
    return {"table": table, "seeds": list(seeds)}


def _fmt(ms, pct=True) -> str:
    m, s = ms
    if m is None:
        return "-"
    if pct:
        return f"{100 * m:.1f}" if s is None else f"{100 * m:.1f} ± {100 * s:.1f}"  # one seed: no spread to show
    return f"{m:,.0f}"


def write_table(result: dict, out: str | Path, *, title: str = "") -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = result["table"]
    clients = sorted({k for e in table for k in e if k.startswith("client")}, key=who_key)
    head = ["method", "seeds", "mean SLM acc %"] + [f"{c} %" for c in clients] + [
        "LLM acc %", "LLM before %", "bytes exchanged", "training tokens"]
    lines = [f"# {title}" if title else "",
             f"mean ± std over seeds {result['seeds']} (bytes and tokens: mean; their std is in table.csv)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv_rows = [["method", "metric", "mean", "std"]]
    for e in table:
        cells = [e["method"], str(e["seeds"]), _fmt(e["mean_slm"])] + [_fmt(e[c]) for c in clients] + [
            _fmt(e["llm"]), _fmt(e["llm_before"]), _fmt(e["bytes"], False), _fmt(e["train_tokens"], False)]
        lines.append("| " + " | ".join(cells) + " |")
        for k, v in e.items():
            if isinstance(v, tuple):
                csv_rows.append([e["method"], k, v[0], v[1]])
    md = out / "table.md"
    md.write_text("\n".join(lines).lstrip() + "\n", encoding="utf-8")
    with open(out / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows)
    (out / "table.json").write_text(json.dumps(result, indent=1, default=list))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [e["method"] for e in table]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [100 * (e["mean_slm"][0] or 0) for e in table], 0.4,
           yerr=[100 * (e["mean_slm"][1] or 0) for e in table], label="mean SLM", capsize=3)
    ax.bar([i + 0.2 for i in x], [100 * (e["llm"][0] or 0) for e in table], 0.4,
           yerr=[100 * (e["llm"][1] or 0) for e in table], label="LLM", capsize=3)
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, max(ax.get_ylim()[1], 5.0))  # never a negative accuracy axis (all zeros drew -0.04..0.04)
    ax.set_title(title or "methods compared")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out / "table.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return {"markdown": md, "csv": out / "table.csv", "plot": out / "table.png"}
