"""Quality benchmark: LaDa against its baselines on the same data, models and round budget, over seeds.

Methods (``lada.method``): ``local`` (each SLM fine-tunes on its own data only), ``all`` (every public candidate
transferred, no filter), ``random`` (a random selection of LaDa's size), ``lada-sft`` (LaDa's selection, but SFT on
the other side's paths instead of the contrastive loss) and ``lada``. Prints the Markdown table (mean ± std over
seeds of each SLM's and the LLM's final accuracy on client domains, bytes exchanged, training tokens) and writes
``table.md``, ``table.csv``, ``table.json`` and ``table.png`` under ``--out``. It is ``fedlada compare`` with these
methods; runs are cached per (method, seed), so an interrupted table resumes where it stopped.

    python benchmarks/quality.py                         # the default run's config, 3 seeds
    python benchmarks/quality.py --set rounds=3 --set data.eval_limit=100 --out runs/quality-short
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a TOML config shared by every run (default: the built-in default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="local,all,random,lada-sft,lada")
    ap.add_argument("--out", default="runs/quality")
    args = ap.parse_args()
    from fedlada.cli import main as cli

    argv = ["compare", "--methods", args.methods, "--seeds", str(args.seeds), "--out", args.out,
            "--title", "quality benchmark: LaDa vs baselines"]
    if args.config:
        argv += ["--config", args.config]
    for s in args.set:
        argv += ["--set", s]
    t0 = time.perf_counter()
    rc = cli(argv)
    print(f"wall time (runs not already cached): {time.perf_counter() - t0:.0f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
