"""Generation backends: the transformers backend is ``sample_paths``; the vLLM backend fails with an actionable
ModelError where vLLM or CUDA is missing, and (against a stand-in ``vllm`` module, since vLLM needs CUDA) tokenises
prompts without special tokens, seeds each prompt, cuts paths after the answer line and follows LoRA updates."""

from __future__ import annotations

import importlib.util
import random
import sys
import types

import pytest
import torch

from fedlada import generation
from fedlada.errors import ConfigError, ModelError
from fedlada.generation import GenerationBackend, TransformersBackend, VLLMBackend, make_backend
from fedlada.models import apply_lora, build_tiny_model, train_tokenizer
from fedlada.paths import sample_paths


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = []
    for _ in range(200):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        texts.append(f"Question: what is {a} + {b}?\nReasoning:\n{a} + {b} = {a + b}\nAnswer: {a + b}")
    return train_tokenizer(texts, vocab_size=200)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0)


PROMPTS = ["Question: what is 3 + 4?\nReasoning:\n", "Question: what is 12 + 5?\nReasoning:\n",
           "Question: what is 1 + 1?\nReasoning:\n"]


def test_transformers_backend_equals_sample_paths(tok, model):
    backend = make_backend("transformers", model=model, tokenizer=tok, batch_size=4)
    assert isinstance(backend, GenerationBackend) and backend.name == "transformers"
    for temperature in (0.0, 1.0):
        kw = dict(num_paths=3, temperature=temperature, top_p=0.9, max_new_tokens=12, seed=7)
        got = backend.sample(PROMPTS, **kw)
        assert got == sample_paths(model, tok, PROMPTS, batch_size=4, **kw)
        assert [len(p) for p in got] == [3, 3, 3]
    a = backend.sample(PROMPTS, num_paths=2, max_new_tokens=12, seed=1)
    b = backend.sample(PROMPTS, num_paths=2, max_new_tokens=12, seed=2)
    assert a == backend.sample(PROMPTS, num_paths=2, max_new_tokens=12, seed=1) and a != b


def test_transformers_backend_sync_follows_the_model(tok, model):
    backend = TransformersBackend(model, tok)
    other = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    backend.sync(other)
    kw = dict(num_paths=1, temperature=0.0, max_new_tokens=10)
    assert backend.sample(PROMPTS, **kw) == sample_paths(other, tok, PROMPTS, **kw)


def test_make_backend_rejects_unknown_names_and_missing_arguments(tok, model):
    with pytest.raises(ConfigError, match="expected one of transformers, vllm, found 'tgi'"):
        make_backend("tgi", model=model, tokenizer=tok)
    with pytest.raises(ConfigError, match="needs a model"):
        make_backend("transformers", model=model)
    with pytest.raises(ConfigError):
        TransformersBackend(model, tok, batch_size=0)


def test_vllm_refuses_gguf_sources(fake_vllm):
    for source in ("/models/smol.gguf", "smollm2-gguf"):
        with pytest.raises(ConfigError, match="GGUF"):
            make_backend("vllm", source=source)
    with pytest.raises(ConfigError, match="needs the model's source"):
        make_backend("vllm")


def test_vllm_missing_is_a_model_error_with_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ModelError) as err:
        make_backend("vllm", source="Qwen/Qwen2.5-7B-Instruct")
    msg = str(err.value)
    assert "vllm package is not installed" in msg and "pip install vllm" in msg and "CUDA" in msg
    assert "'transformers' backend" in msg and err.value.__cause__ is None


def test_vllm_without_cuda_is_a_model_error(monkeypatch):
    _fake_vllm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="needs a CUDA GPU and none is visible"):
        make_backend("vllm", source="Qwen/Qwen2.5-7B-Instruct")


# ------------------------------------------------------------------------- the vLLM backend on a stand-in engine


class _Completion:
    def __init__(self, text):
        self.text = text


class _FakeLLM:
    """Records what it is given; 'generates' text that names the request so the test can check the plumbing."""

    instances: list = []

    def __init__(self, **options):
        self.options, self.calls = options, []
        _FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, requests, params, use_tqdm=True, lora_request=None):
        self.calls.append((requests, params, lora_request))
        outs = []
        for req, p in zip(requests, params):
            ids = req["prompt_token_ids"]
            texts = [f"{len(ids)} tokens, seed {p.seed}, copy {j}\nAnswer: {j}\nextra line" for j in range(p.n)]
            outs.append(types.SimpleNamespace(outputs=[_Completion(t) for t in texts]))
        return outs


class _SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _fake_vllm(monkeypatch, tokenizer=None):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = _FakeLLM, _SamplingParams
    _FakeLLM.tokenizer = tokenizer
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, id, path: types.SimpleNamespace(lora_name=name, lora_int_id=id, lora_path=path)
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace(name=name) if name == "vllm" else real(name, *a))
    return vllm


@pytest.fixture
def fake_vllm(monkeypatch, tok):
    _fake_vllm(monkeypatch, tok)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _FakeLLM.instances.clear()


def test_vllm_backend_sampling_contract(fake_vllm, tok, tmp_path):
    backend = make_backend("vllm", source="/models/base", dtype="bfloat16", gpu_memory_utilization=0.3,
                           adapter_dir=str(tmp_path))
    assert isinstance(backend, VLLMBackend)
    engine = _FakeLLM.instances[-1]
    assert engine.options["model"] == "/models/base" and engine.options["gpu_memory_utilization"] == 0.3
    assert "enable_lora" not in engine.options
    out = backend.sample(PROMPTS, num_paths=2, temperature=0.8, top_p=0.95, max_new_tokens=50, seed=3)
    requests, params, lora = engine.calls[-1]
    n_ids = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert [len(r["prompt_token_ids"]) for r in requests] == n_ids  # no special tokens added
    assert [p.n for p in params] == [2, 2, 2] and {p.temperature for p in params} == {0.8}
    assert {p.top_p for p in params} == {0.95} and {p.max_tokens for p in params} == {50}
    seeds = [p.seed for p in params]
    assert len(set(seeds)) == 3 and lora is None  # one seed per prompt
    assert out[1] == [f"{n_ids[1]} tokens, seed {seeds[1]}, copy {j}\nAnswer: {j}" for j in range(2)]  # cut
    again = backend.sample(PROMPTS, num_paths=2, temperature=0.8, top_p=0.95, max_new_tokens=50, seed=3)
    assert again == out and [p.seed for p in engine.calls[-1][1]] == seeds
    greedy = backend.sample(PROMPTS[:1], num_paths=3, temperature=0.0, max_new_tokens=5)
    assert engine.calls[-1][1][0].n == 1 and engine.calls[-1][1][0].temperature == 0.0
    assert greedy == [[greedy[0][0]] * 3]
    assert backend.sample([], num_paths=2) == []


def test_vllm_backend_follows_lora_updates(fake_vllm, tok, tmp_path):
    base = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    with pytest.raises(ModelError, match="full fine-tuning"):
        make_backend("vllm", source="/m", lora_rank=8, adapter_dir=str(tmp_path)).sync(base)
    with pytest.raises(ModelError, match="without LoRA support"):
        make_backend("vllm", source="/m", adapter_dir=str(tmp_path)).sync(apply_lora(
            build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0), r=4))
    peft_model = apply_lora(base, r=4, alpha=8)
    with pytest.raises(ModelError, match="rank 4 is above the engine's max_lora_rank=2"):
        make_backend("vllm", source="/m", lora_rank=2, adapter_dir=str(tmp_path)).sync(peft_model)

    backend = make_backend("vllm", source="/m", lora_rank=8, adapter_dir=str(tmp_path / "adapters"))
    engine = _FakeLLM.instances[-1]
    assert engine.options["enable_lora"] and engine.options["max_lora_rank"] == 8
    backend.sync(peft_model)
    first = backend.lora_request
    assert (tmp_path / "adapters" / "adapter-0001" / "adapter_config.json").is_file()
    backend.sample(PROMPTS, num_paths=1, max_new_tokens=4)
    assert engine.calls[-1][2] is first and first.lora_int_id == 1
    backend.sync(peft_model)  # a new id: vLLM loads the new adapter; the old directory is gone
    assert backend.lora_request.lora_int_id == 2
    assert not (tmp_path / "adapters" / "adapter-0001").exists()
    assert (tmp_path / "adapters" / "adapter-0002" / "adapter_config.json").is_file()


def test_vllm_backend_removes_its_own_adapter_folder(fake_vllm, tok):
    import gc

    backend = make_backend("vllm", source="/m", lora_rank=8)  # no adapter_dir: a scratch folder of its own
    backend.sync(apply_lora(build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0), r=4))
    root = backend.adapter_root
    assert (root / "adapter-0001" / "adapter_config.json").is_file()
    del backend
    gc.collect()
    assert not root.exists()


def test_library_import_does_not_load_vllm():
    import subprocess

    code = "import sys, fedlada.generation; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False" and generation.BACKENDS == ("transformers", "vllm")


# --------------------------------------------------------------- the vLLM backend inside a run (stand-in engine)


def test_llm_generation_config_is_checked():
    from fedlada.config import load_config

    with pytest.raises(ConfigError, match="models.slms.0.generation"):
        load_config(overrides=["models.slms.0.generation=vllm", "models.slms.0.lora=true"])
    with pytest.raises(ConfigError, match="lora"):
        load_config(overrides=["models.llm.generation=vllm", "models.llm.lora=false"])
    with pytest.raises(ConfigError, match="GGUF"):
        load_config(overrides=["models.llm.generation=vllm", "models.llm.source=smollm2-gguf"])
    with pytest.raises(ConfigError, match="generation"):
        load_config(overrides=["models.llm.generation=sglang"])
    assert load_config().models.llm.generation == "transformers"


def test_a_run_samples_the_llm_through_its_generation_backend(monkeypatch, tiny_overrides):
    """models.llm.generation = "vllm": the engine starts on the LLM's weights on disk, follows the trained adapter
    each round (a new LoRA request), and its paths are what the round scores and sends."""
    from transformers import AutoTokenizer

    from fedlada.config import load_config
    from fedlada.runner import run

    class Engine(_FakeLLM):
        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(self.options["model"])

    _fake_vllm(monkeypatch)
    sys.modules["vllm"].LLM = Engine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _FakeLLM.instances.clear()
    cpu = [f"models.{m}.device=cpu" for m in ("llm", "slms.0", "slms.1", "slms.2")]  # "auto" would now pick cuda
    res = run(load_config(overrides=tiny_overrides + cpu + ["models.llm.generation=vllm", "models.llm.lora=true"]))
    (engine,) = _FakeLLM.instances
    from pathlib import Path

    weights = Path(engine.options["model"])  # the tiny LLM's cached base weights (the adapter comes by sync)
    assert weights.parent.name == "models" and (weights / "config.json").is_file()
    assert engine.options["enable_lora"] and engine.options["max_lora_rank"] == 4
    assert [c[2].lora_int_id for c in engine.calls] == [1, 2]  # one sync + one generate per round
    rows = [r for r in res.run_dir.joinpath("metrics.jsonl").read_text().splitlines() if '"server_teach"' in r]
    assert rows and all('"llm_paths_sampled": 32' in r for r in rows)  # 16 candidates x 2 paths, from the engine


def test_a_vllm_run_without_vllm_fails_before_any_work(monkeypatch, tiny_overrides, tmp_path):
    from fedlada.config import load_config
    from fedlada.runner import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    cfg = load_config(overrides=tiny_overrides + ["models.llm.generation=vllm", "models.llm.lora=true",
                                                  f"out_dir={tmp_path / 'never'}"])
    with pytest.raises(ModelError, match="vllm package is not installed"):
        run(cfg)
    assert not (tmp_path / "never").exists()
