"""Shared by the Flower tests: a fast tiny config, the in-process reference run, and metric comparison.

Parity runs use no gold paths: ``conftest.gold_sampler`` patches this process only, and the ClientApps of the
Flower engines run in other processes (Ray workers, SuperNode subprocesses). Every comparison is exact: each
client's computation is the same deterministic code on the same number of CPU threads (``threads=2``), and the
only fields allowed to differ are wall-clock ones and the model cache's bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY

# TINY with less generation per round (the Flower tests pay engine start-up on top)
FAST = TINY + ["data.eval_limit=6", "lada.candidates_per_round=8", "lada.max_new_tokens=16"]

_REFERENCE: dict[str, Path] = {}


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    p = Path(run_dir) / name
    if not p.is_file():  # the run directory writes a JSONL file with its first line
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def strip(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock fields and cache bookkeeping (the only things that may differ between engines)."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if "seconds" not in k and k not in ("cached", "cache")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return [clean(r) for r in records if r.get("event") != "round_time"]


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


def reference_run(base: Path, overrides: list[str] = FAST) -> Path:
    """The in-process run of ``overrides`` (once per pytest run): the numbers every engine must reproduce."""
    from fedlada.config import load_config
    from fedlada.runner import run

    key = json.dumps(overrides)
    if key not in _REFERENCE:
        out = base / f"inprocess-{len(_REFERENCE)}"
        res = run(load_config(overrides=overrides + [f"out_dir={out}"]))
        assert res.summary["rounds_done"] == load_config(overrides=overrides).rounds
        _REFERENCE[key] = res.run_dir
    return _REFERENCE[key]
