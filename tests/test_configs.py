"""Every config shipped in configs/ loads with the typed loader, round-trips through the TOML rendering a run writes,
and names models the loader understands (tiny, the SmolLM2 GGUF, a hub id, a path or a .gguf file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlada.config import dump_toml, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"smoke.toml", "smollm2.toml", "qwen-gsm8k.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    rendered = tmp_path / "resolved.toml"
    rendered.write_text(dump_toml(cfg))
    assert load_config(rendered) == cfg  # the resolved file a run writes gives the same config back
    for spec in (cfg.models.llm, *cfg.models.slms):
        assert spec.is_tiny or spec.source in ("smollm2-gguf",) or "/" in spec.source or spec.source.endswith(
            ".gguf"), spec.source


def test_real_model_presets_say_what_they_load():
    smol = load_config(CONFIGS[0].parent / "smollm2.toml")
    assert smol.models.llm.source == "smollm2-gguf" and smol.models.llm.lora and smol.models.llm.chat_template == "on"
    assert all(s.is_tiny for s in smol.models.slms) and smol.data.builtin and smol.data.num_clients == 2
    qwen = load_config(CONFIGS[0].parent / "qwen-gsm8k.toml")
    assert qwen.models.llm.source == "Qwen/Qwen2.5-7B-Instruct" and qwen.models.llm.dtype == "bfloat16"
    assert [qwen.models.slm_for(k).source for k in range(3)] == [
        "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"]
    assert len(qwen.data.clients) == 3 and qwen.data.public == "data/gsm8k/public.jsonl" and qwen.train.bf16
