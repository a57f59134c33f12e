"""Generation backends: who samples the reasoning paths of a model (LADA.md, per-round step 2: M LLM paths per
public question).

One interface, :class:`GenerationBackend`, with the contract of ``paths.sample_paths``: ``sample(prompts, ...)``
returns ``num_paths`` paths per prompt, ``[prompt][path]``, each cut after its first complete ``Answer: ...`` line
(the newline and what follows dropped); prompts are tokenised without special tokens; ``temperature == 0`` is greedy
(the ``num_paths`` paths are then identical); the same seed gives the same paths.

* :class:`TransformersBackend` wraps ``paths.sample_paths`` on an in-memory model: the default, used everywhere
  on CPU, and the one the scores and the training loop see.
* :class:`VLLMBackend` runs vLLM (CUDA only) for the LLM's M paths at scale. vLLM is imported lazily; without it,
  or without a CUDA device, :func:`make_backend` raises a :class:`~fedlada.errors.ModelError` that says how to fix
  it (never an ImportError traceback).

A model that is trained during the run (the LLM with LoRA) must be sampled with its current weights. The strategy
here is vLLM's own LoRA support: the engine loads the base model once (``enable_lora``), and after every update
:meth:`VLLMBackend.sync` saves the peft adapter (a few MB) into a fresh directory and the next ``sample`` passes it
as a ``LoRARequest`` with a new id, so vLLM loads the new adapter and drops the old one. No merged checkpoint is
written and the engine is never rebuilt. A model trained without LoRA (full fine-tuning) cannot be followed this
way; ``sync`` then raises and the fix is ``lora = true`` for that model or the transformers backend.

Departures from ``sample_paths`` (vLLM only): vLLM cannot stop on a regular expression, so a row stops at eos or
``max_new_tokens`` and the path is cut after its answer line afterwards (instruct models usually end right after
it). Each prompt gets its own seed (derived from ``seed`` and its position), so the paths of a prompt do not depend
on the rest of the batch, but they differ from the transformers backend's paths for the same seed; vLLM also keeps
the base weights in ``dtype`` (bfloat16 by default) while the trained copy may be float32.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import logging
import shutil
import tempfile
import weakref
from pathlib import Path

from fedlada.config import GENERATION_BACKENDS, ModelSpec
from fedlada.errors import ConfigError, ModelError
from fedlada.paths import cut_after_answer_line, sample_paths

logger = logging.getLogger(__name__)

BACKENDS = GENERATION_BACKENDS
_VLLM_FIX = "install it with `pip install vllm` on a machine with a CUDA GPU, or use the 'transformers' backend"


class GenerationBackend(abc.ABC):
    """Samples reasoning paths; see the module docstring for the contract."""

    name: str = ""

    @abc.abstractmethod
    def sample(self, prompts: list[str], *, num_paths: int, temperature: float = 1.0, top_p: float = 1.0,
               max_new_tokens: int = 128, seed: int = 0) -> list[list[str]]:
        """``num_paths`` paths per prompt, ``[prompt][path]``, each cut after its first complete answer line."""

    def sync(self, model) -> None:
        """Make the next ``sample`` use ``model``'s current weights (call after every training step of it)."""


class TransformersBackend(GenerationBackend):
    """``paths.sample_paths`` on an in-memory transformers (or peft) model; always in step with its weights."""

    name = "transformers"

    def __init__(self, model, tokenizer, *, batch_size: int = 32):
        if batch_size < 1:
            raise ConfigError(f"generation batch_size: expected an integer >= 1, found {batch_size!r}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def sample(self, prompts: list[str], *, num_paths: int, temperature: float = 1.0, top_p: float = 1.0,
               max_new_tokens: int = 128, seed: int = 0) -> list[list[str]]:
        return sample_paths(self.model, self.tokenizer, prompts, num_paths=num_paths, temperature=temperature,
                            top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, batch_size=self.batch_size)

    def sync(self, model) -> None:
        self.model = model


def require_vllm() -> None:
    """ModelError unless vLLM is installed and a CUDA device is present (checked without importing vLLM)."""
    if importlib.util.find_spec("vllm") is None:
        raise ModelError(f"generation backend 'vllm': the vllm package is not installed; {_VLLM_FIX}")
    import torch

    if not torch.cuda.is_available():
        raise ModelError(f"generation backend 'vllm': vLLM needs a CUDA GPU and none is visible to torch "
                         f"(torch {torch.__version__}); run on a CUDA machine, or use the 'transformers' backend")


def _prompt_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) & 0x7FFFFFFF


class VLLMBackend(GenerationBackend):
    """vLLM engine over ``source`` (a local model directory or a Hugging Face id; the trained model's base).

    ``max_lora_rank`` > 0 enables LoRA (needed to follow a model trained with LoRA through :meth:`sync`; it must be
    at least the adapter's rank). ``gpu_memory_utilization`` is the share of GPU memory vLLM reserves (weights and
    KV cache); keep it below 1 minus what training the same model next to it needs. ``adapter_dir`` holds the
    adapter saved by ``sync`` (default: a fresh temporary directory). ``engine_options`` go to ``vllm.LLM``.
    """

    name = "vllm"

    def __init__(self, source: str, *, dtype: str = "bfloat16", max_lora_rank: int = 0,
                 gpu_memory_utilization: float = 0.4, max_model_len: int | None = 4096,
                 adapter_dir: str | None = None, **engine_options):
        require_vllm()
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm gpu_memory_utilization: expected a fraction in (0, 1], found "
                              f"{gpu_memory_utilization!r}")
        vllm = importlib.import_module("vllm")
        options = dict(model=str(source), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, **engine_options)
        if max_lora_rank > 0:
            options.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        try:
            self.llm = vllm.LLM(**options)
        except Exception as e:  # noqa: BLE001 - an engine that cannot start is a user-facing model error
            raise ModelError(f"generation backend 'vllm': cannot start vLLM on {source}: {type(e).__name__}: {e}") \
                from e
        self._vllm = vllm
        self.source, self.max_lora_rank = str(source), max_lora_rank
        self.tokenizer = self.llm.get_tokenizer()
        self.adapter_root = Path(adapter_dir or tempfile.mkdtemp(prefix="fedlada-vllm-"))
        if not adapter_dir:  # our own scratch folder: removed with the backend (or at exit), adapters and all
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.adapter_root), True)
        self.lora_request = None
        self._version = 0

    def sync(self, model) -> None:
        """Save ``model``'s LoRA adapter and use it from the next ``sample`` on (see the module docstring)."""
        if not hasattr(model, "peft_config"):
            raise ModelError("generation backend 'vllm' follows a trained model through its LoRA adapter, and this "
                             "model has none (full fine-tuning); set lora = true for it, or use the 'transformers' "
                             "backend")
        if self.max_lora_rank <= 0:
            raise ModelError("generation backend 'vllm' was started without LoRA support; create it with "
                             "max_lora_rank >= the adapter's rank")
        rank = max(int(c.r) for c in model.peft_config.values())
        if rank > self.max_lora_rank:
            raise ModelError(f"generation backend 'vllm': the adapter's LoRA rank {rank} is above the engine's "
                             f"max_lora_rank={self.max_lora_rank}")
        from vllm.lora.request import LoRARequest

        self._version += 1
        path = self.adapter_root / f"adapter-{self._version:04d}"
        model.save_pretrained(path)
        previous = self.lora_request
        self.lora_request = LoRARequest(f"fedlada-{self._version}", self._version, str(path))
        if previous is not None:  # the old adapter is never requested again
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        logger.info("vllm: adapter version %d saved to %s", self._version, path)

    def sample(self, prompts: list[str], *, num_paths: int, temperature: float = 1.0, top_p: float = 1.0,
               max_new_tokens: int = 128, seed: int = 0) -> list[list[str]]:
        if num_paths < 1:
            raise ValueError(f"sample: num_paths must be >= 1, found {num_paths}")
        if not prompts:
            return []
        greedy = temperature == 0
        copies = 1 if greedy else num_paths
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        requests = [{"prompt_token_ids": list(x)} for x in ids]
        params = [self._vllm.SamplingParams(n=copies, temperature=0.0 if greedy else temperature,
                                            top_p=1.0 if greedy else top_p, max_tokens=max_new_tokens,
                                            seed=_prompt_seed(seed, i), skip_special_tokens=True)
                  for i in range(len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        results = []
        for out in outputs:
            paths = [cut_after_answer_line(o.text)[0] for o in out.outputs]
            results.append(paths * num_paths if greedy else paths)
        return results


def make_backend(name: str, *, model=None, tokenizer=None, source: str | None = None, dtype: str = "bfloat16",
                 batch_size: int = 32, lora_rank: int = 0, **options) -> GenerationBackend:
    """The generation backend ``name``: ``"transformers"`` (needs ``model`` and ``tokenizer``) or ``"vllm"``
    (needs ``source``; ``lora_rank`` > 0 enables adapters of up to that rank; ``options`` go to
    :class:`VLLMBackend`). Unknown name: ConfigError; vLLM missing or no CUDA device: ModelError."""
    if name == "transformers":
        if model is None or tokenizer is None:
            raise ConfigError("generation backend 'transformers' needs a model and its tokenizer")
        return TransformersBackend(model, tokenizer, batch_size=batch_size)
    if name == "vllm":
        require_vllm()
        if not source:
            raise ConfigError("generation backend 'vllm' needs the model's source (a model directory or hub id)")
        if str(source).endswith(".gguf") or str(source) == "smollm2-gguf":
            raise ConfigError(f"generation backend 'vllm': source {source!r} is a GGUF file, which this backend does "
                              "not load; give the model's hub id or a saved model directory")
        return VLLMBackend(source, dtype=dtype, max_lora_rank=lora_rank, **options)
    raise ConfigError(f"generation backend: expected one of {', '.join(BACKENDS)}, found {name!r}")


def check_generation(cfg) -> None:
    """Fail before any work when the config asks for a backend this machine cannot run (vLLM: package + CUDA)."""
    if cfg.models.llm.generation == "vllm":
        require_vllm()


def llm_backend(spec: ModelSpec, info: dict) -> GenerationBackend | None:
    """The sampler of the LLM's M paths per question, from its spec (``models.llm.generation``): ``None`` for
    ``"transformers"`` (the rounds then sample the in-memory model directly), else a :class:`VLLMBackend` over the
    model's weights on disk (the tiny model's cache directory, or ``spec.source``) with LoRA up to the spec's rank.
    vLLM keeps those weights in bfloat16 (float16 when the spec asks for it), whatever the trained copy's dtype."""
    if spec.generation == "transformers":
        return None
    source = info.get("cache") or spec.source
    return make_backend(spec.generation, source=source, dtype="float16" if spec.dtype == "float16" else "bfloat16",
                        lora_rank=spec.lora_r, gpu_memory_utilization=spec.vllm_gpu_memory)


__all__ = ["BACKENDS", "GenerationBackend", "TransformersBackend", "VLLMBackend", "check_generation", "llm_backend", "make_backend", "require_vllm"]
