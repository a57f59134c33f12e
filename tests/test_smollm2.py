"""The SmolLM2 preset (configs/smollm2.toml) end to end on a real pretrained checkpoint: GGUF load and dequantise,
chat-template prompts, LLM path sampling and scoring, LoRA training of the LLM on the clients' paths, evaluation.

The SLMs of the preset are tiny models trained for seconds and almost never answer correctly, so, as in the other
round tests, ``gold_sampler`` puts the reference path first for a seeded half of the clients' questions (plain
prompts only): the clients then report correct paths and the server's learn step -- filter, contrastive pairs
against the LLM's own wrong paths, LoRA update -- runs on the real model. The LLM's own paths stay its own (its
prompts use the chat template, which the sampler does not know).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlada.config import load_config
from fedlada.models import find_smollm2_gguf
from fedlada.prepare import load_data
from fedlada.runner import run

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2.toml"


@pytest.mark.slow
def test_smollm2_preset_runs_a_lada_round_on_the_real_checkpoint(model_cache, tmp_path, gold_sampler):
    # The preset names the model "smollm2-gguf"; the file's path is given here so the test does not depend on how
    # that name is resolved.
    # One torch thread: on a shared 2-core machine two threads per process slow generation down several times.
    cfg = load_config(CONFIG, [f"models.llm.source={find_smollm2_gguf()}", f"out_dir={tmp_path / 'run'}",
                               "threads=1"])
    gold_sampler(load_data(cfg).public)
    result = run(cfg)

    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    setup = next(r for r in rows if r["event"] == "setup")
    llm = setup["models"]["llm"]
    base = llm["parameters"] - llm["trainable_parameters"]
    assert 134e6 < base < 135e6  # SmolLM2-135M; only its LoRA adapters train
    assert 0 < llm["trainable_parameters"] < 0.05 * base

    evals = {(r["who"], r["round"]): r for r in rows if r["event"] == "eval"}
    assert set(evals) == {(w, t) for w in ("llm", "client0", "client1") for t in (0, 1)}
    assert evals[("llm", 0)]["n"] == evals[("llm", 1)]["n"] == 2 * cfg.data.eval_limit
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evals.values())

    teach = next(r for r in rows if r["event"] == "server_teach")
    assert teach["llm_paths_sampled"] == cfg.lada.candidates_per_round * cfg.lada.paths_per_question
    learn = next(r for r in rows if r["event"] == "server_learn")
    assert learn["server_selected"] >= 1 and learn["server_train_steps"] >= 1 and learn["server_train_tokens"] > 0
    assert learn["server_preference_pairs"] >= 1  # the LLM's own wrong paths are the rejected ones

    # the LLM's LoRA adapters were trained: peft initialises lora_B at zero, and only adapters are checkpointed
    state = torch.load(result.run_dir / "checkpoints" / "round_001" / "llm.pt")
    assert state and all("lora_" in k for k in state)
    assert max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k) > 0
    assert (result.run_dir / "summary.json").is_file()
