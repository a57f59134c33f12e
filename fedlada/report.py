"""The run report: an HTML page with plots, written from the run directory's JSONL files alone.

Plots: each model's accuracy per round; the gap distribution (learnability gap for LLM->client pairs, novelty gap
for client->LLM pairs) of selected vs rejected samples per pair; bytes exchanged per round and direction.
``print_summary`` renders the final table on a terminal.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from pathlib import Path

import numpy as np

from fedlada.errors import FedLadaError


def who_key(name: str) -> tuple:
    """Sort key for "client2", "client10", "llm", "llm->client10": numbers compared as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


_warned_torn: set[tuple[str, int, int]] = set()  # (file, line, size): one warning per torn line, however often read


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a run's JSONL file ([] when it does not exist).

    A last line cut short (no newline after it: the process died while appending) is dropped with a warning (once
    per process), so an interrupted run can still be resumed and reported; a bad line anywhere else is a
    FedLadaError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, found {type(row).__name__}")
        except ValueError as err:
            if number == len(lines):  # the last line, not newline-terminated: a torn append
                key = (str(path.resolve()), number, len(text))
                if key not in _warned_torn:
                    _warned_torn.add(key)
                    logging.getLogger(__name__).warning("%s: line %d is incomplete (an interrupted write); ignored",
                                                        path, number)
                break
            raise FedLadaError(f"{path}:{number}: not a JSON object ({err}); the file is damaged") from None
        rows.append(row)
    return rows


def _left_out(summary: dict) -> str:
    """" (over 19 of 20 clients: client7 has no evaluation in the last round)" where the mean leaves clients out."""
    out = summary.get("mean_slm_left_out") or []
    n = len(summary.get("models", {})) - 1
    if not out or n <= 0:
        return ""
    return (f" (over {n - len(out)} of {n} clients: {', '.join(out)} "
            f"{'has' if len(out) == 1 else 'have'} no evaluation in round {summary['rounds_done']})")


def stopped_round_line(summary: dict) -> str:
    """What the report and the terminal say of a round that did not complete (``summary["stopped_round"]``)."""
    stop = summary["stopped_round"]
    failed = f" ({', '.join(stop['failed'])} failed: see the client_failed lines of metrics.jsonl)" \
        if stop["failed"] else ""
    return (f"round {stop['round']} did not complete{failed}; nothing of it is counted here, and running the same "
            f"command again resumes there")


def failed_step_lines(summary: dict) -> list[str]:
    """One line per client that failed a step (``summary["failed_steps"]``), for the report and the terminal."""
    lines = [f"{who} failed its step in round(s) {', '.join(map(str, rounds))} (reasons: the client_failed lines "
             "of metrics.jsonl); its accuracy there is that of the model it kept ('-' where its evaluation failed "
             "too)" for who, rounds in (summary.get("failed_steps") or {}).items()]
    return lines + [f"{who} has no evaluation at all (it never took part, e.g. its SuperNode never connected): it is "
                    "not in the table nor in the mean" for who in summary.get("missing_clients") or []]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


ACCURACY_LINES = 10  # clients drawn one line each in the accuracy plot; beyond: their mean and range


def _plots(metrics: list[dict], selections: list[dict], plots_dir: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    plots_dir.mkdir(parents=True, exist_ok=True)
    # accuracy per round
    acc: dict[str, dict[int, float]] = {}
    for r in metrics:
        if r.get("event") == "eval" and r.get("accuracy") is not None:
            acc.setdefault(r["who"], {})[r["round"]] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    slms = [(who, v) for who, v in sorted(acc.items(), key=lambda kv: who_key(kv[0])) if who != "llm"]
    many = len(slms) > ACCURACY_LINES  # one line per client stops being readable: their mean and range instead
    if many:
        for _who, v in slms:
            xs = sorted(v)
            ax.plot(xs, [v[x] for x in xs], color="0.75", lw=0.8)
        rounds = sorted({t for _w, v in slms for t in v})
        vals = [[v[t] for _w, v in slms if t in v] for t in rounds]
        ax.fill_between(rounds, [min(x) for x in vals], [max(x) for x in vals], color="C0", alpha=0.15,
                        label=f"SLMs: range ({len(slms)} clients)")
        ax.plot(rounds, [sum(x) / len(x) for x in vals], marker="o", color="C0", lw=2, label="SLMs: mean")
    else:
        for who, v in slms:
            xs = sorted(v)
            ax.plot(xs, [v[x] for x in xs], marker="o", label=who, lw=1.5)
    if "llm" in acc:  # drawn last, in black: never the colour of a client
        xs = sorted(acc["llm"])
        ax.plot(xs, [acc["llm"][x] for x in xs], marker="s", color="black", label="llm", lw=2.5)
    ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(0, max(ax.get_ylim()[1], 0.05))  # an accuracy is never negative (all-zero curves drew -0.04..0.04)
    ax.set_title("Accuracy per round" + (" (grey: each client)" if many else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, never over the lines
    fig.savefig(plots_dir / "accuracy.png", dpi=90, bbox_inches="tight")
    out.append(("Accuracy per round (each SLM on its client's test split; the LLM on their union)", _png(fig)))
    plt.close(fig)
    # gap distributions, selected vs rejected
    pairs = sorted({s["pair"] for s in selections}, key=who_key)
    if pairs:
        n = len(pairs)
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
        for ax, pair in zip(axes.flat, pairs):
            key = "learnability_gap" if pair.startswith("llm->") else "novelty_gap"
            sel = [s[key] for s in selections if s["pair"] == pair and s.get(key) is not None and s["selected"]]
            rej = [s[key] for s in selections if s["pair"] == pair and s.get(key) is not None and not s["selected"]]
            both = sel + rej  # one set of bin edges, so the two histograms' bars line up
            lo, hi = (min(both), max(both)) if both else (0.0, 1.0)
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 21)
            if sel:
                ax.hist(sel, bins=bins, alpha=0.6, label=f"selected ({len(sel)})", density=True)
            if rej:
                ax.hist(rej, bins=bins, alpha=0.6, label=f"rejected ({len(rej)})", density=True)
            ax.set_title(f"{pair}: {key.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("gap (nats per path token)", fontsize=7)
            ax.set_ylabel("density (each histogram's area is 1)", fontsize=7)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(plots_dir / "gaps.png", dpi=90, bbox_inches="tight")
        out.append(("Gap distribution of selected vs rejected samples, per pair, all rounds", _png(fig)))
        plt.close(fig)
    # bytes per round
    by: dict[int, list[int]] = {}
    for r in metrics:
        if r.get("event") == "bytes":
            b = by.setdefault(r["round"], [0, 0])
            b[0] += r.get("server_to_client", 0)
            b[1] += r.get("client_to_server", 0)
    if by:
        xs = sorted(by)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar([x - 0.2 for x in xs], [by[x][0] / 1e3 for x in xs], width=0.4, label="server -> clients")
        ax.bar([x + 0.2 for x in xs], [by[x][1] / 1e3 for x in xs], width=0.4, label="clients -> server")
        ax.set_xticks(xs)
        ax.set_xlabel("round")
        ax.set_ylabel("kB")
        ax.set_title("Bytes exchanged per round")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over one
        fig.savefig(plots_dir / "bytes.png", dpi=90, bbox_inches="tight")
        out.append(("Bytes exchanged per round (all clients)", _png(fig)))
        plt.close(fig)
    return out


def _table(summary: dict) -> tuple[list[str], list[list[str]]]:
    acc = summary.get("accuracy", {})
    n_eval = summary.get("eval_questions", {})
    rounds = sorted({int(t) for v in acc.values() for t in v})
    head = ["model", "n"] + [f"r{t}" for t in rounds]  # n: the test questions each accuracy is over
    rows = []
    for who, v in acc.items():
        rows.append([who, str(n_eval.get(who, "-"))]
                    + [("-" if v.get(str(t)) is None else f"{v[str(t)]:.3f}") for t in rounds])
    return head, rows


def write_report(run_dir: str | Path) -> Path:
    from fedlada.runner import RunDir, summarize_run
    from fedlada.config import load_config

    rd = RunDir(run_dir)
    cfg = load_config(rd.path / "config.toml")
    summary = summarize_run(rd, cfg)
    metrics = [r for r in read_jsonl(rd.path / "metrics.jsonl")  # completed rounds only, as the summary counts
               if not isinstance(r.get("round"), int) or r["round"] <= summary["rounds_done"]]
    # an interrupted round's decisions stay in the file until a resume redoes that round: completed rounds only
    selections = [s for s in read_jsonl(rd.path / "selections.jsonl") if s.get("round", 0) <= summary["rounds_done"]]
    figs = _plots(metrics, selections, rd.path / "plots")
    head, rows = _table(summary)
    tbl = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>"
    n_sel = sum(1 for s in selections if s["selected"])
    body = [f"<h1>FedLaDa run: {html.escape(str(rd.path))}</h1>",
            f"<p>method <b>{html.escape(summary.get('label', summary['method']))}</b>, seed {summary['seed']}, "
            f"{summary['rounds_done']} round(s) completed. Mean SLM accuracy: "
            f"{'-' if summary.get('mean_slm_accuracy') is None else format(summary['mean_slm_accuracy'], '.3f')}"
            f"{html.escape(_left_out(summary))}. Bytes clients&rarr;server: "
            f"{summary['bytes_client_to_server']:,}; server&rarr;clients: {summary['bytes_server_to_client']:,}. "
            f"Training tokens (federated rounds): {summary['train_tokens_federated']:,}. "
            f"Filter decisions recorded: {len(selections):,} ({n_sel:,} selected).</p>",
            "<p>Models: " + "; ".join(f"{html.escape(k)}: {html.escape(v)}"
                                      for k, v in summary.get("models", {}).items()) + ".</p>",
            "<h2>Accuracy</h2>", tbl]
    body += [f"<p><b>{html.escape(line)}</b></p>" for line in failed_step_lines(summary)]
    if summary.get("stopped_round"):
        body.append(f"<p><b>{html.escape(stopped_round_line(summary))}</b></p>")
    if not selections:
        body.append("<p>No filter decision was recorded (the method selects nothing, or no candidate had a usable "
                    "path), so there is no gap distribution to plot.</p>")
    for title, png in figs:
        body.append(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{png}'/>")
    body.append("<h2>Files</h2><ul><li>config.toml: resolved config</li><li>metrics.jsonl: every event</li>"
                "<li>selections.jsonl: every filter decision with scores and reasons</li>"
                "<li>audit.jsonl: what left each client</li>"
                "<li>predictions.jsonl: every evaluation's answers, per question</li><li>checkpoints/: per-round weights</li></ul>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>FedLaDa report</title><style>"
            "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    out = rd.path / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def print_summary(summary: dict, *, console=None, wall_seconds: float | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head, rows = _table(summary)
    t = Table(title=f"FedLaDa ({summary.get('label', summary['method'])}, seed {summary['seed']}): accuracy per round")
    for h in head:
        t.add_column(h, justify="right" if h != "model" else "left")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    msl = summary.get("mean_slm_accuracy")
    line = (f"mean SLM accuracy: {msl:.3f}" if msl is not None else "mean SLM accuracy: -") + _left_out(summary) + \
        f" | bytes up {summary['bytes_client_to_server']:,} down {summary['bytes_server_to_client']:,}" + \
        f" | training tokens {summary['train_tokens_federated']:,}"
    if wall_seconds is not None:
        line += f" | wall {wall_seconds:.0f}s"
    console.print(line)
    for line in failed_step_lines(summary) + ([stopped_round_line(summary)] if summary.get("stopped_round") else []):
        console.print(line, style="red", markup=False, highlight=False)
