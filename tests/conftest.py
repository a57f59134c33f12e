"""Shared fixtures: an isolated model cache, a tiny run config, and a sampler that mixes in gold paths.

Tiny models pretrained for seconds rarely answer correctly, and LaDa only exchanges answer-correct paths; to
exercise every branch of a round (filter, contrastive pairs, rewards) in seconds, ``gold_sampler`` wraps the real
``sample_paths``: for a seeded half of the questions whose gold path it knows, it replaces the first sampled path
with the gold one. Everything downstream (scoring, filtering, training, messages) runs for real.
"""

from __future__ import annotations

import hashlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TINY = [
    "rounds=2",
    "data.num_clients=2", "data.train_per_client=40", "data.test_per_client=12", "data.public_size=30",
    "data.general_size=200", "data.eval_limit=12", "data.holdout_size=6",
    "models.pretrain_batch_size=16",
    "models.llm.hidden_size=32", "models.llm.num_layers=2", "models.llm.num_heads=4", "models.llm.lora_r=4",
    "models.llm.pretrain_tokens=3000",
    "models.slms.0.hidden_size=24", "models.slms.0.num_layers=2", "models.slms.0.num_heads=4",
    "models.slms.0.pretrain_tokens=2000",
    "models.slms.1.hidden_size=16", "models.slms.1.num_layers=3", "models.slms.1.num_heads=4",
    "models.slms.1.pretrain_tokens=2000",
    "models.slms.2.hidden_size=16", "models.slms.2.num_layers=2", "models.slms.2.num_heads=4",
    "models.slms.2.pretrain_tokens=2000",
    "lada.candidates_per_round=16", "lada.paths_per_question=2", "lada.client_paths_per_question=2",
    "lada.max_new_tokens=24", "lada.min_count=2", "lada.filter_epochs=2",
    "train.batch_size=8", "train.max_length=256", "threads=2",
]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One model/data cache for the whole test session (tiny models are pretrained once)."""
    path = tmp_path_factory.mktemp("fedlada-cache")
    old = os.environ.get("FEDLADA_CACHE")
    os.environ["FEDLADA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEDLADA_CACHE", None)
    else:
        os.environ["FEDLADA_CACHE"] = old


@pytest.fixture
def tiny_overrides(model_cache, tmp_path):
    return TINY + [f"out_dir={tmp_path / 'run'}"]


def _key(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16)


@pytest.fixture
def gold_sampler(monkeypatch):
    """Patch ``fedlada.rounds.sample_paths`` so half of the known questions get their gold path first."""
    from fedlada import reasoning, rounds

    real = rounds.sample_paths
    gold: dict[str, str] = {}

    def register(records):
        for r in records:
            gold[reasoning.format_prompt(r.question)] = reasoning.format_path(r.rationale, r.answer)

    def sampler(model, tokenizer, prompts, *, num_paths, **kw):
        out = real(model, tokenizer, prompts, num_paths=num_paths, **kw)
        for p, paths in zip(prompts, out):
            if p in gold and num_paths > 1 and _key(p + str(kw.get("seed"))) % 2 == 0:
                paths[0] = gold[p] + "\n"
        return out

    monkeypatch.setattr(rounds, "sample_paths", sampler)
    return register


def markdown_cells(line: str) -> list[str]:
    """The cells of a Markdown table row (``\\|`` inside a cell is not a separator); for the docs' tests."""
    import re

    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", s)]
