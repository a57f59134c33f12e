"""The experiment table for the four shipped scenarios: every method each scenario supports, over seeds, plus the
paper's claim checked per host (does host + LaDa beat the host alone, and by how much relative to the seeds?).

For each scenario this is one ``fedlada compare`` (the methods are listed in ``SCENARIOS``; ``HOST:METHOD`` names
a host's run), written to ``OUT/<scenario>/table.{md,csv,json,png}``. Then ``OUT/claims.md`` / ``claims.json``
compare, per scenario and host, host + LaDa with the host alone (and LaDa alone with local-only SFT and with
random selection) seed by seed: the same seed means the same data and starting models, so the paired difference
of the mean SLM accuracy is the fair comparison; it is reported as mean ± std over seeds next to the runs' own
spread. Runs are cached per (method, seed) below ``OUT/<scenario>/``, so the table can be finished later
and two processes may split the scenarios (``--only a,d`` and ``--only b,c``).

    python benchmarks/scenarios.py --seeds 2 --out runs/tables              # all four: 64 runs, ~3 h on one core
    python benchmarks/scenarios.py --only a,d --seeds 2 &                    # or split in two: ~1.5 h on 2 cores
    python benchmarks/scenarios.py --only c,b --seeds 2
    python benchmarks/scenarios.py --only a --seeds 1 --out runs/tables-a   # one scenario, one seed
    python benchmarks/scenarios.py --seeds 3 --table-only                    # tables of what has finished so far
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# in the order they run: the comparisons of the paper's claim first, the ablations after
LADA_ALONE = ["local", "lada"]
ABLATIONS = ["random", "all", "lada-sft"]
FEDMKT = ["fedmkt:host", "fedmkt:lada", "fedmkt:host-random"]
FEDCOLLM = ["fedcollm:host", "fedcollm:lada", "fedcollm:host-random"]

# scenario -> (config, methods): the hosts each scenario supports (see the configs' headers)
SCENARIOS = {
    "a": ("configs/scenario-a-identical.toml", LADA_ALONE + FEDMKT + FEDCOLLM + ABLATIONS),
    "b": ("configs/scenario-b-sizes.toml", LADA_ALONE + FEDMKT + ABLATIONS),
    "c": ("configs/scenario-c-depths.toml", LADA_ALONE + FEDMKT + ABLATIONS),
    "d": ("configs/scenario-d-tokenizer.toml", LADA_ALONE + ABLATIONS),
}

# (label, treatment, control): the comparisons the paper's claim is about
COMPARISONS = [
    ("LaDa alone vs local-only SFT", "lada", "local"),
    ("LaDa alone vs random selection", "lada", "random"),
    ("LaDa vs no filter (all)", "lada", "all"),
    ("contrastive vs SFT (lada vs lada-sft)", "lada", "lada-sft"),
    ("FedMKT + LaDa vs FedMKT alone", "fedmkt-lada", "fedmkt-host"),
    ("FedMKT + LaDa vs FedMKT + random", "fedmkt-lada", "fedmkt-host-random"),
    ("FedCoLLM + LaDa vs FedCoLLM alone", "fedcollm-lada", "fedcollm-host"),
    ("FedCoLLM + LaDa vs FedCoLLM + random", "fedcollm-lada", "fedcollm-host-random"),
]


def _ms(xs):
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def paired(out: Path, treatment: str, control: str, seeds) -> dict | None:
    """Per-seed mean-SLM (and LLM) accuracy of two methods of one scenario, and their paired difference."""
    t, c = [], []
    for s in seeds:
        ft, fc = out / treatment / f"seed{s}" / "summary.json", out / control / f"seed{s}" / "summary.json"
        if ft.is_file() and fc.is_file():
            t.append(json.loads(ft.read_text()))
            c.append(json.loads(fc.read_text()))
    if not t:
        return None
    ts, cs = [r["mean_slm_accuracy"] for r in t], [r["mean_slm_accuracy"] for r in c]
    diff = [a - b for a, b in zip(ts, cs)]
    llm = [a["final"].get("llm", 0) - b["final"].get("llm", 0) for a, b in zip(t, c)]
    return {"seeds": len(t), "treatment": _ms(ts), "control": _ms(cs), "diff": _ms(diff), "diff_llm": _ms(llm),
            "wins": sum(d > 0 for d in diff), "ties": sum(d == 0 for d in diff)}


def claims(root: Path, scenarios, seeds) -> tuple[str, dict]:
    """claims.md's table and its data; ``seeds``: the seeds to pair, or a dict of them per scenario (each
    scenario's runs are counted from its config's seed, as ``fedlada compare`` counts them)."""
    lines = ["# The paper's claim checked per scenario", "",
             "Mean SLM accuracy (%, mean ± std over seeds) of treatment and control, their paired difference per "
             "seed (mean ± std), how many seeds the treatment won and tied, and the LLM's paired difference.", "",
             "| scenario | comparison | treatment | control | paired diff (pts) | wins/ties/seeds | LLM diff (pts) |",
             "|---|---|---|---|---|---|---|"]
    res = {}

    def f(ms) -> str:  # mean ± std in points; one seed has no spread to show
        if ms[0] is None:
            return "-"
        return f"{100 * ms[0]:.1f}" + ("" if ms[1] is None else f" ± {100 * ms[1]:.1f}")

    for sc in scenarios:
        for label, tr, ct in COMPARISONS:
            p = paired(root / sc, tr, ct, seeds[sc] if isinstance(seeds, dict) else seeds)
            if p is None:
                continue
            res[f"{sc}: {label}"] = p
            lines.append(f"| {sc} | {label} | {f(p['treatment'])} | {f(p['control'])} | {f(p['diff'])} | "
                         f"{p['wins']}/{p['ties']}/{p['seeds']} | {f(p['diff_llm'])} |")
    return "\n".join(lines) + "\n", res


REPO = Path(__file__).resolve().parents[1]


def scenario_seeds(n: int, overrides: list[str], root: Path = REPO) -> dict[str, range]:
    """The seeds each scenario's table holds: n of them from its config's seed (after a ``seed=`` override), as
    ``fedlada compare`` counts them, so claims.md pairs exactly the table's runs. Only the seed is read: the other
    overrides may fit one scenario's config and not another's."""
    from fedlada.config import load_config

    seed = [o for o in overrides if o.partition("=")[0].strip() == "seed"]
    return {sc: range(s0, s0 + n) for sc, s0 in
            ((sc, load_config(root / cfg, seed).seed) for sc, (cfg, _) in SCENARIOS.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="a,b,c,d", help="comma-separated scenarios (default: a,b,c,d)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default="runs/tables")
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out this time (e.g. the ablations "
                    "random,all,lada-sft); the cache lets a later call without --skip complete the table")
    ap.add_argument("--claims-only", action="store_true", help="only (re)write claims.md from finished runs")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: write each scenario's table (and claims.md) from the runs finished so far")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SCENARIOS]
    if bad:
        ap.error(f"--only: unknown scenario(s) {bad}; expected some of {sorted(SCENARIOS)}")
    from fedlada.cli import main as cli

    from fedlada.errors import FedLadaError

    try:
        root, seeds = Path(args.out), scenario_seeds(args.seeds, args.set)
    except FedLadaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    walls = {}
    for sc in ([] if args.claims_only else only):
        config, methods = SCENARIOS[sc]
        methods = [m for m in methods if m not in {x.strip() for x in args.skip.split(",")}]
        argv = ["compare", "--config", str(REPO / config), "--methods", ",".join(methods), "--seeds", str(args.seeds),
                "--out", str(root / sc), "--title", f"scenario {sc} ({config})"]
        for s in args.set:
            argv += ["--set", s]
        if args.table_only:
            argv.append("--finished-only")
        t0 = time.perf_counter()
        rc = cli(argv)
        if not args.table_only:
            walls[sc] = time.perf_counter() - t0
            print(f"scenario {sc}: wall time (runs not already cached) {walls[sc]:.0f}s", flush=True)
        if rc:
            return rc
    md, res = claims(root, sorted(SCENARIOS), seeds)
    root.mkdir(parents=True, exist_ok=True)
    (root / "claims.md").write_text(md, encoding="utf-8")
    (root / "claims.json").write_text(json.dumps({"comparisons": res, "wall_s": walls}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
