"""The one typed configuration of a FedLaDa run, and the one place for its defaults.

A config is a tree of frozen dataclasses validated in ``__post_init__``. It is built from, in order:
the defaults below, an optional TOML file (``fedlada run --config FILE``), then ``key=value`` overrides
(``--set lada.budget=0.3``) or Flower's flat ``run_config`` (``{"lada.budget": 0.3}``). Keys are dotted paths;
list items are addressed by index (``models.slms.1.hidden_size=96``). Unknown keys and ill-typed values are a
:class:`~fedlada.errors.ConfigError` naming the key, what was expected and what was found.

The [ours] choices of the method (module docstrings of ``filter``, ``losses``, ``train`` and ``rounds``) that a
run varies have their knob here; a few are arguments of the library functions only (the filter's ``nan_policy``,
``cold_start_clusters`` and ``batch_size``; ``train``'s ``bucket_by_length``, ``reuse_prefix``, ``weight_decay``
and ``lr_schedule`` for the round updates) or fixed rules of ``rounds`` (the chosen/rejected paths, the server's
20% reward slice), each documented where it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlada.data.formats import FORMATS
from fedlada.data.validate import DEFAULT_MAX_RECORD_BYTES
from fedlada.errors import ConfigError

METHODS = ("lada", "local", "all", "random", "lada-sft", "host", "host-random")
_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")  # fedlada.selection.RULE_NAME_RE, without importing numpy here
LOSSES = ("pairwise", "listwise", "sft")
LR_SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
GENERATION_BACKENDS = ("transformers", "vllm")  # fedlada.generation.BACKENDS
DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _expand(path: str, key: str) -> str:
    """``~`` and ``~user`` expanded; a ``~user`` that names no user is an error, not a folder named after it."""
    out = os.path.expanduser(path)
    _check(not out.startswith("~"), key, "a path whose ~user names a user of this machine", path)
    return out


def _check(cond: bool, key: str, expected: str, found: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': expected {expected}, found {found!r}")


DATA_FORMATS = ("auto", *FORMATS)


def _check_format(value: str, key: str) -> None:
    _check(value in DATA_FORMATS, key, f"one of {', '.join(DATA_FORMATS)}", value)


@dataclass(frozen=True)
class ClientData:
    """One client's private files. ``format`` is one the data package reads (auto, fedlada, gsm8k, ...)."""

    train: str = ""
    test: str = ""
    format: str = "auto"

    def __post_init__(self):
        _check(bool(self.train), "data.clients.N.train", "a path to the client's train file", self.train)
        _check(bool(self.test), "data.clients.N.test", "a path to the client's test file", self.test)
        _check_format(self.format, "data.clients.N.format")
        object.__setattr__(self, "train", _expand(self.train, "data.clients.N.train"))
        object.__setattr__(self, "test", _expand(self.test, "data.clients.N.test"))


BUILTIN_ONLY = ("seed", "num_clients", "train_per_client", "test_per_client", "public_size", "general_size",
                "max_steps", "max_value")  # DataConfig keys of the built-in benchmark


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from. With no ``clients`` given, the built-in benchmark is generated."""

    clients: tuple[ClientData, ...] = ()
    public: str = ""
    public_format: str = "auto"
    general: str = ""  # optional pretraining corpus for the default tiny models (server side)
    general_format: str = "auto"
    # built-in benchmark (used when `clients` is empty); its own seed, so run seeds vary training, not the files
    seed: int = 0
    num_clients: int = 3
    train_per_client: int = 1000
    test_per_client: int = 500
    public_size: int = 1000
    general_size: int = 20000
    max_steps: int = 6
    max_value: int = 99
    # evaluation and reward slices
    eval_limit: int = 100  # test questions per client scored each round (0 = the whole split)
    # tokens a greedy evaluation answer may take (0 = lada.max_new_tokens): set it to compare runs that vary
    # lada.max_new_tokens under one evaluation protocol
    eval_max_new_tokens: int = 0
    # examples of a client's train split held out for the filter's reward (at most a fifth of the split)
    holdout_size: int = 64
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES  # a longer record in a data file is reported as a problem

    def __post_init__(self):
        _check(self.num_clients >= 1, "data.num_clients", "an integer >= 1", self.num_clients)
        for k in ("train_per_client", "test_per_client", "public_size"):
            _check(getattr(self, k) >= 1, f"data.{k}", "an integer >= 1", getattr(self, k))
        _check(self.general_size >= 0, "data.general_size", "an integer >= 0", self.general_size)
        _check(1 <= self.max_steps <= 12, "data.max_steps", "an integer in 1..12", self.max_steps)
        _check(self.max_value >= 40, "data.max_value", "an integer >= 40", self.max_value)
        _check(self.eval_limit >= 0, "data.eval_limit", "an integer >= 0", self.eval_limit)
        _check(self.eval_max_new_tokens >= 0, "data.eval_max_new_tokens", "an integer >= 0 (0: lada.max_new_tokens)",
               self.eval_max_new_tokens)
        _check(self.holdout_size >= 1, "data.holdout_size", "an integer >= 1", self.holdout_size)
        _check(self.max_record_bytes >= 64, "data.max_record_bytes", "an integer >= 64", self.max_record_bytes)
        _check_format(self.public_format, "data.public_format")
        _check_format(self.general_format, "data.general_format")
        object.__setattr__(self, "public", _expand(self.public, "data.public"))
        object.__setattr__(self, "general", _expand(self.general, "data.general"))
        if self.clients:
            _check(bool(self.public), "data.public", "a public pool file when data.clients is set", self.public)
        else:  # the built-in benchmark makes its own pool and corpus: a file named here would be ignored
            for key in ("public", "general"):
                _check(not getattr(self, key), f"data.{key}", "no file without data.clients (the built-in benchmark "
                       "makes its own; name the clients' files in data.clients to use yours)", getattr(self, key))

    @property
    def builtin(self) -> bool:
        return not self.clients

    def unused_builtin_keys(self) -> list[str]:
        """The built-in benchmark's keys set away from their defaults while data.clients names files (ignored)."""
        if self.builtin:
            return []
        return [f"data.{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if f.name in BUILTIN_ONLY and getattr(self, f.name) != f.default]

    @property
    def n_clients(self) -> int:
        return len(self.clients) if self.clients else self.num_clients


# ModelSpec keys that only shape (and pretrain) a tiny model: a loaded model's architecture and tokenizer are its own
TINY_ONLY_KEYS = ("hidden_size", "num_layers", "num_heads", "tokenizer", "tokenizer_vocab", "pretrain_tokens")


@dataclass(frozen=True)
class ModelSpec:
    """One model. ``source="tiny"`` builds a Llama-style model of the given shape and pretrains it on the
    server-side corpus (cached); anything else is a local directory, a Hugging Face id, or a ``.gguf`` file."""

    source: str = "tiny"
    gguf_file: str = ""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    tokenizer: str = "shared"  # tiny models: "shared" server tokenizer or "own" (a separately trained one)
    tokenizer_vocab: int = 384
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | mps | cuda | cuda:N
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ()
    gradient_checkpointing: bool = False
    chat_template: str = "auto"  # auto | on | off
    # what a chat-template prompt asks for after the question: "auto" (a final 'Answer: <number>', '<letter>' or
    # '<answer>' line, by the public pool's gold answers), "" (nothing) or the text itself
    instruction: str = "auto"
    pretrain_tokens: int = 400_000  # tiny models only: tokens of server-side pretraining
    generation: str = "transformers"  # who samples this model's paths: transformers | vllm (the LLM only; CUDA)
    vllm_gpu_memory: float = 0.4  # vllm: share of GPU memory the engine reserves (the rest trains the model)

    def __post_init__(self):
        _check(bool(self.source), "models.*.source", "'tiny', a local path, an HF id or a .gguf file", self.source)
        _check(self.hidden_size >= 8, "models.*.hidden_size", "an integer >= 8", self.hidden_size)
        _check(self.num_layers >= 1, "models.*.num_layers", "an integer >= 1", self.num_layers)
        _check(self.num_heads >= 1 and self.hidden_size % self.num_heads == 0, "models.*.num_heads",
               f"a divisor of hidden_size={self.hidden_size}", self.num_heads)
        _check(self.tokenizer in ("shared", "own"), "models.*.tokenizer", "'shared' or 'own'", self.tokenizer)
        _check(self.tokenizer_vocab >= 64, "models.*.tokenizer_vocab", "an integer >= 64", self.tokenizer_vocab)
        _check(self.dtype in DTYPES, "models.*.dtype", f"one of {DTYPES}", self.dtype)
        _check(self.chat_template in ("auto", "on", "off"), "models.*.chat_template", "auto|on|off",
               self.chat_template)
        _check(self.lora_r >= 1, "models.*.lora_r", "an integer >= 1", self.lora_r)
        _check(self.lora_alpha > 0, "models.*.lora_alpha", "an integer >= 1 (the adapters' scale is alpha / r)",
               self.lora_alpha)
        # AdamW cannot train float16 weights in place (its eps and small updates underflow to 0, and a weight with a
        # zero gradient becomes NaN); LoRA keeps its adapters in float32
        _check(self.dtype != "float16" or self.lora, "models.*.dtype",
               "'bfloat16' or 'float32' for a fully fine-tuned model (float16 weights are trained only through "
               "LoRA adapters: set lora = true)", self.dtype)
        _check(0 <= self.lora_dropout < 1, "models.*.lora_dropout", "a probability in [0, 1)", self.lora_dropout)
        _check(DEVICE_RE.fullmatch(self.device) is not None, "models.*.device", "auto, cpu, cuda, cuda:N or mps",
               self.device)
        _check(self.pretrain_tokens >= 0, "models.*.pretrain_tokens", "an integer >= 0", self.pretrain_tokens)
        _check(self.generation in GENERATION_BACKENDS, "models.*.generation", f"one of {GENERATION_BACKENDS}",
               self.generation)
        _check(0 < self.vllm_gpu_memory <= 1, "models.*.vllm_gpu_memory", "a fraction in (0, 1]",
               self.vllm_gpu_memory)
        if self.generation == "vllm":
            _check(self.lora, "models.*.lora", "true when generation = 'vllm' (the engine follows the trained "
                   "model through its LoRA adapter)", self.lora)
            _check(not (self.gguf_file or self.source.endswith(".gguf") or self.source == "smollm2-gguf"),
                   "models.*.generation", "'transformers' for a GGUF model (vLLM loads a hub id or a model "
                   "directory)", self.generation)

    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"


def _default_slms() -> tuple[ModelSpec, ...]:
    # Three heterogeneous SLMs, each several times smaller than the default LLM and of different width/depth.
    return (
        ModelSpec(hidden_size=96, num_layers=3, num_heads=4, pretrain_tokens=450_000),
        ModelSpec(hidden_size=128, num_layers=2, num_heads=4, pretrain_tokens=450_000),
        ModelSpec(hidden_size=64, num_layers=4, num_heads=4, pretrain_tokens=450_000),
    )


@dataclass(frozen=True)
class ModelsConfig:
    llm: ModelSpec = field(default_factory=lambda: ModelSpec(
        hidden_size=256, num_layers=4, num_heads=8, lora=True, lora_r=16, lora_alpha=32,
        pretrain_tokens=1_000_000))
    slms: tuple[ModelSpec, ...] = field(default_factory=_default_slms)
    cache_dir: str = ""  # default: $FEDLADA_CACHE or ~/.cache/fedlada
    # Pretraining recipe of the default tiny models (measured on the built-in general corpus, 3.3M-param LLM, 1M
    # tokens: batch 8 reached a lower loss than 16 or 32 at the same tokens/s; a cosine schedule cost nothing).
    pretrain_lr: float = 2e-3
    pretrain_batch_size: int = 8
    pretrain_schedule: str = "cosine"  # constant | cosine (linear warm-up, then cosine decay to 10% of the lr)
    pretrain_warmup: float = 0.05  # fraction of pretraining steps spent warming up (cosine only)
    pretrain_bf16: bool = False  # bf16 autocast in pretraining (for GPUs; slower here at batch 8)
    # tiny models' init and pretraining order, and every LoRA adapter's initialisation: fixed, so the run seeds of a
    # comparison share one starting point (the run seed varies sampling, selection, training order and which of
    # a client's train records are held out for the reward slice)
    pretrain_seed: int = 0

    def __post_init__(self):
        _check(len(self.slms) >= 1, "models.slms", "at least one SLM spec", self.slms)
        _check(self.pretrain_lr > 0, "models.pretrain_lr", "a float > 0", self.pretrain_lr)
        _check(self.pretrain_batch_size >= 1, "models.pretrain_batch_size", "an integer >= 1",
               self.pretrain_batch_size)
        _check(self.pretrain_schedule in LR_SCHEDULES, "models.pretrain_schedule",
               "'constant' or 'cosine'", self.pretrain_schedule)
        _check(0 <= self.pretrain_warmup < 1, "models.pretrain_warmup", "a fraction in [0, 1)", self.pretrain_warmup)

        for k, spec in enumerate(self.slms):
            _check(spec.generation == "transformers", f"models.slms.{k}.generation",
                   "'transformers' (vLLM samples the LLM's paths; the SLMs sample with transformers)",
                   spec.generation)

    def slm_for(self, client: int) -> ModelSpec:
        """Client k uses ``slms[k]``; with fewer specs than clients, specs are reused cyclically."""
        return self.slms[client % len(self.slms)]

    def slm_role(self, client: int) -> str:
        """The cache and LoRA-seed role of client k's SLM: ``slm<i>`` for the first spec equal to the one it uses
        (clients sharing a spec share the prepared model, and a spec written out again, as a flwr run config file
        does for every client slot, is the same model as the spec it repeats)."""
        return f"slm{self.slms.index(self.slm_for(client))}"


@dataclass(frozen=True)
class LadaConfig:
    """The method's knobs (LADA.md). ``method`` picks LaDa or a baseline on the same loop."""

    method: str = "lada"  # a built-in method (METHODS), or a selection rule registered by a plug-in
    # plug-ins with selection rules of your own (fedlada.selection): .py files (relative to the working directory)
    # or importable modules, imported when a run starts
    plugins: tuple[str, ...] = ()
    candidates_per_round: int = 96  # public questions considered per round (a seeded subset of the pool)
    paths_per_question: int = 4  # M: LLM paths sampled per public question (rejection sampling keeps correct)
    client_paths_per_question: int = 2  # paths each SLM samples per public question
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 96
    # filter
    budget: float = 0.4
    min_count: int = 8
    threshold: float = 0.5
    alpha: float = 0.1
    filter_hidden: int = 64
    filter_epochs: int = 10
    filter_lr: float = 1e-3
    reward_mix: float = 0.5
    # distillation: L = L_SFT(local data) + lambda_da * L_DA + mu * L_SFT(the other side's selected correct paths)
    # loss (the L_DA term): pairwise = the contrastive path loss against a frozen reference (chosen: the other
    # side's correct path, rejected: the receiver's own wrong path); listwise = the joint-probability loss over the
    # M correct paths of a question (needs 2 or more); sft = no L_DA term (the same run as lambda_da = 0)
    loss: str = "pairwise"
    beta: float = 0.1  # pairwise: the inverse temperature of the contrastive loss
    lambda_da: float = 1.0  # weight of L_DA; method "lada-sft" fixes it to 0
    mu: float = 0.5  # weight of SFT on the other side's selected paths; method "lada-sft" fixes it to 1
    tau: float = 1.0  # listwise: the temperature of the path distributions

    def __post_init__(self):
        _check(self.method in METHODS or (bool(self.plugins) and _RULE_NAME.fullmatch(self.method) is not None),
               "lada.method", f"one of {METHODS}, or the name of a selection rule registered by lada.plugins",
               self.method)
        for i, p in enumerate(self.plugins):
            _check(bool(p) and p == p.strip(), f"lada.plugins.{i}", "a .py file path or an importable module name", p)
        _check(self.loss in LOSSES, "lada.loss", f"one of {LOSSES}", self.loss)
        _check(self.candidates_per_round >= 1, "lada.candidates_per_round", "an integer >= 1",
               self.candidates_per_round)
        _check(self.paths_per_question >= 1, "lada.paths_per_question", "an integer >= 1", self.paths_per_question)
        _check(self.client_paths_per_question >= 1, "lada.client_paths_per_question", "an integer >= 1",
               self.client_paths_per_question)
        _check(self.temperature >= 0, "lada.temperature", "a float >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "lada.top_p", "a float in (0, 1]", self.top_p)
        _check(self.max_new_tokens >= 1, "lada.max_new_tokens", "an integer >= 1", self.max_new_tokens)
        _check(0 < self.budget <= 1, "lada.budget", "a fraction in (0, 1]", self.budget)
        _check(self.min_count >= 0, "lada.min_count", "an integer >= 0", self.min_count)
        _check(0 < self.threshold < 1, "lada.threshold", "a float in (0, 1)", self.threshold)
        _check(self.alpha >= 0, "lada.alpha", "a float >= 0", self.alpha)
        _check(self.filter_epochs >= 1, "lada.filter_epochs", "an integer >= 1", self.filter_epochs)
        _check(self.filter_hidden >= 1, "lada.filter_hidden", "an integer >= 1", self.filter_hidden)
        _check(self.filter_lr > 0, "lada.filter_lr", "a float > 0", self.filter_lr)
        _check(0 <= self.reward_mix <= 1, "lada.reward_mix", "a float in [0, 1]", self.reward_mix)
        _check(self.beta > 0, "lada.beta", "a float > 0", self.beta)
        _check(self.lambda_da >= 0, "lada.lambda_da", "a float >= 0", self.lambda_da)
        _check(self.mu >= 0, "lada.mu", "a float >= 0", self.mu)
        _check(self.tau > 0, "lada.tau", "a float > 0", self.tau)
        fixed = {k: LadaConfig.__dataclass_fields__[k].default for k in ("lambda_da", "mu")}
        if self.method == "lada-sft" and (self.lambda_da, self.mu) != (fixed["lambda_da"], fixed["mu"]):
            # lada-sft is LaDa with SFT (weight 1) on the other side's paths in place of the contrastive term: a
            # value of these keys would be recorded in config.toml and not used
            raise ConfigError(f"'lada.lambda_da' = {self.lambda_da!r}, 'lada.mu' = {self.mu!r}: lada.method = "
                              "'lada-sft' trains SFT at weight 1 on the other side's selected paths and no "
                              "contrastive term, so it takes neither key; leave both at their defaults "
                              f"({fixed['lambda_da']}, {fixed['mu']}), "
                              "or use lada.method = 'lada' with lada.loss = 'sft' to weight that SFT by lada.mu")
        if self.loss == "listwise" and self.method not in ("local", "lada-sft") and self.lambda_da > 0:
            # the listwise loss ranks the distinct correct paths of a question: one path, or greedy decoding's
            # identical copies, leave nothing to rank in any round
            _check(self.paths_per_question >= 2, "lada.paths_per_question",
                   "an integer >= 2 with lada.loss = 'listwise' (it ranks several paths per question)",
                   self.paths_per_question)
            _check(self.temperature > 0, "lada.temperature",
                   "> 0 with lada.loss = 'listwise' (greedy decoding samples one path, so there is nothing to rank)",
                   self.temperature)


@dataclass(frozen=True)
class TrainConfig:
    """Local training of each side in a round (both use fedlada.train.train)."""

    client_lr: float = 2e-3
    client_epochs: int = 1
    server_lr: float = 2e-3
    server_epochs: int = 2
    batch_size: int = 8  # small batches: on the default run, 8 vs 32 lifted the SLMs' accuracy after 2 rounds ~4x
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = False
    compile: bool = False  # torch.compile the training forward passes (pays on long GPU updates, not on tiny ones)
    max_length: int = 384  # long benchmark questions reach ~260 tokens with the default 384-token vocabulary

    def __post_init__(self):
        _check(self.client_lr > 0, "train.client_lr", "a float > 0", self.client_lr)
        _check(self.server_lr > 0, "train.server_lr", "a float > 0", self.server_lr)
        _check(self.client_epochs >= 0, "train.client_epochs", "an integer >= 0", self.client_epochs)
        _check(self.server_epochs >= 0, "train.server_epochs", "an integer >= 0", self.server_epochs)
        _check(self.batch_size >= 1, "train.batch_size", "an integer >= 1", self.batch_size)
        _check(self.grad_accum >= 1, "train.grad_accum", "an integer >= 1", self.grad_accum)
        _check(self.max_length >= 16, "train.max_length", "an integer >= 16", self.max_length)


HOSTS = ("none", "fedmkt", "fedcollm")


@dataclass(frozen=True)
class HostConfig:
    """The collaboration framework LaDa plugs into (``fedlada.hosts``, ``fedlada.host_rounds``).

    ``name``: "none" (LaDa alone), "fedmkt" (per-token top-k logits exchanged both ways, min-CE target choice) or
    "fedcollm" (FedAvg of the SLMs' trainable weights + mutual KD between the LLM and the aggregated SLM).
    ``lada.method`` "host" runs the host alone on every candidate, "host-random" on a random subset at LaDa's budget.
    """

    name: str = "none"
    topk: int = 128  # logits kept per token position (values fp16 + indices)
    kd_weight: float = 1.0  # weight of the token-level KD term in the host's step
    kd_temperature: float = 1.0
    lm_weight: float = 0.0  # weight of plain NLL on the same path tokens (FedCoLLM's lm_loss; FedMKT's kd_alpha)
    kd_epochs: int = 1  # epochs of the host's KD step per round and side
    kd_student: str = "topk"  # student log-softmax over the teacher's k indices ("topk") or the whole vocab ("full")
    adapter_dtype: str = "float32"  # fedcollm: dtype of the weights on the wire (float32 | float16)

    def __post_init__(self):
        _check(self.name in HOSTS, "host.name", f"one of {HOSTS}", self.name)
        _check(self.topk >= 1, "host.topk", "an integer >= 1", self.topk)
        _check(self.kd_weight >= 0, "host.kd_weight", "a float >= 0", self.kd_weight)
        _check(self.kd_temperature > 0, "host.kd_temperature", "a float > 0", self.kd_temperature)
        _check(self.lm_weight >= 0, "host.lm_weight", "a float >= 0", self.lm_weight)
        _check(self.kd_epochs >= 0, "host.kd_epochs", "an integer >= 0", self.kd_epochs)
        _check(self.kd_student in ("topk", "full"), "host.kd_student", "'topk' or 'full'", self.kd_student)
        _check(self.adapter_dtype in ("float32", "float16"), "host.adapter_dtype", "'float32' or 'float16'",
               self.adapter_dtype)


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    rounds: int = 5
    out_dir: str = "runs/default"
    engine: str = "inprocess"  # inprocess | flower
    threads: int = 0  # torch threads per process (0 = every core this process may use; see resolve_threads)
    min_clients: int = 1  # a round fails (after checkpointing the previous one) if fewer clients report
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    lada: LadaConfig = field(default_factory=LadaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    host: HostConfig = field(default_factory=HostConfig)

    def __post_init__(self):
        _check(self.rounds >= 1, "rounds", "an integer >= 1", self.rounds)
        _check(self.engine in ("inprocess", "flower"), "engine", "'inprocess' or 'flower'", self.engine)
        _check(bool(self.out_dir), "out_dir", "a directory path", self.out_dir)
        object.__setattr__(self, "out_dir", _expand(self.out_dir, "out_dir"))  # "~/runs/x" is not a folder named ~
        _check(0 <= self.threads <= MAX_THREADS, "threads", f"an integer in 0..{MAX_THREADS} (0 = every usable core)",
               self.threads)
        _check(self.min_clients >= 1, "min_clients", "an integer >= 1", self.min_clients)
        _check(self.min_clients <= self.data.n_clients, "min_clients",
               f"at most the number of clients ({self.data.n_clients})", self.min_clients)

    @property
    def eval_max_new_tokens(self) -> int:
        """Tokens a greedy evaluation answer may take: data.eval_max_new_tokens, else lada.max_new_tokens."""
        return self.data.eval_max_new_tokens or self.lada.max_new_tokens


# ----------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from TOML, JSON or a CLI string) to the annotated type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "none":
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a table, found {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                try:
                    value = json.loads(s)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"config key '{key}': expected a JSON list, found {value!r} ({e})") from None
            else:
                value = [_unquote(v.strip()) for v in s.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, found {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected true or false, found {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, found {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, found {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"config key '{key}': expected a finite number, found {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, found {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        full = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown config key '{full}' (known at this level: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], full)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"config section '{prefix or 'top'}': {e}") from None
    except ConfigError as e:  # name the exact key: 'models.slms.1.lora_r' rather than 'models.*.lora_r'
        msg = str(e)
        if prefix:
            for generic in ("models.*.", "data.clients.N."):
                msg = msg.replace(f"'{generic}", f"'{prefix}.")
        raise ConfigError(msg) from None


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON/TOML-able values (tuples become lists)."""

    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return conv(cfg)


def _default_at(defaults: dict, key: str) -> Any:
    """The default value at dotted ``key`` (list items by index, else the first item), or None if there is none."""
    node: Any = defaults
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and node:
            node = node[min(int(part), len(node) - 1)]
        else:
            return None
    return node


def _unquote(text: str) -> str:
    """A command-line value written as a TOML string: "..." (with escapes) or '...' (literal) -> its text."""
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] == "'":
        return s[1:-1]
    if len(s) >= 2 and s[0] == s[-1] == '"':
        try:
            return tomllib.loads(f"v = {s}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    return text


def _set_path(tree: dict, key: str, value: Any, defaults: dict) -> None:
    """Set dotted ``key`` in the nested dict ``tree`` (lists addressed by index), checking the key exists.

    Where the defaults cannot tell (items of a list that is empty by default), the final ``_build`` checks the keys.
    """
    if isinstance(value, str) and isinstance(_default_at(defaults, key), str):
        value = _unquote(value)  # --set 'models.llm.source="/path"': a quoted string, as in a config file
    if isinstance(value, str) and value.strip()[:1] in ("[", "{") and not isinstance(_default_at(defaults, key), str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config key '{key}': expected JSON, found {value!r} ({e})") from None
    parts = key.split(".")
    node, dnode = tree, defaults
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"config key '{key}': '{'.'.join(parts[:i])}' is a list; expected an index, "
                                  f"found {part!r}")
            idx = int(part)
            if idx >= len(node):
                listed = ".".join(parts[:i])
                hint = (f"; give the whole list instead: --set '{listed}=[{{\"train\": ..., \"test\": ...}}, ...]'"
                        if listed == "data.clients" else "")
                if idx > len(node) or not node:
                    raise ConfigError(f"config key '{key}': index {idx} out of range (list has {len(node)} "
                                      f"items){hint}")
                if listed == "data.clients":  # a copy of the last client would evaluate on its test file
                    raise ConfigError(f"config key '{key}': data.clients has {len(node)} client(s); a new client "
                                      f"is not made by index, as it would take client {len(node) - 1}'s other "
                                      f"files{hint}")
                node.append(json.loads(json.dumps(node[-1])))
            if last:
                node[idx] = _merged(node[idx], value)
                return
            dnode = dnode[min(idx, len(dnode) - 1)] if isinstance(dnode, list) and dnode else None
            node = node[idx]
            continue
        if dnode is not None and (not isinstance(dnode, dict) or part not in dnode):
            known = ", ".join(sorted(dnode)) if isinstance(dnode, dict) else ""
            raise ConfigError(f"unknown config key '{path}'" + (f" (known at this level: {known})" if known else ""))
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{'.'.join(parts[:i])}' is not a table")
        if last:
            node[part] = _merged(node.get(part), value)
            return
        if part not in node or node[part] is None:
            node[part] = json.loads(json.dumps(dnode[part])) if dnode is not None else {}
        node, dnode = node[part], (dnode[part] if dnode is not None else None)


def _merged(old: Any, new: Any) -> Any:
    """A table given as JSON for a table (``--set 'models.llm={"source": "x"}'``) changes the keys it names and keeps
    the others, as a config file's table does; anything else (a list, a scalar) replaces what was there."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}
    return new


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. lada.budget=0.3")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Defaults <- TOML file <- overrides (``["a.b=1", ...]`` or a flat ``{"a.b": 1}`` like Flower's run_config)."""
    defaults = to_dict(RunConfig())
    tree = json.loads(json.dumps(defaults))
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--config {p}: is a folder; give a TOML config file")
        if not p.is_file():
            where = "" if p.is_absolute() else f" (a relative path, looked for in {Path.cwd()})"
            raise ConfigError(f"config file not found: {p}{where}")
        raw = p.read_bytes()
        try:  # a byte-order mark (Windows editors) is no part of the TOML
            text = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"{p}: not valid UTF-8 (byte 0x{raw[e.start]:02x} on line {line}); save the config as "
                              "UTF-8") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        _check_file_types(data, RunConfig, "", p)
        # a file's tables replace the defaults key by key (lists replace lists whole)
        _merge(tree, data, defaults, "", p)
    items = list(overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or ()))
    for k, v in items:
        _set_path(tree, k, v, defaults)
    try:
        return _build(RunConfig, tree)
    except ConfigError as e:  # a bad value from the file (not overridden): name the file
        named = re.search(r"config key '([^']+)'", str(e))
        overridden = any(named is not None and (named.group(1) == k or named.group(1).startswith(k + "."))
                         for k, _ in items)
        if (path is None or named is None or str(e).startswith(str(path))
                or named.group(1) not in _file_keys(data) or overridden):
            raise
        raise ConfigError(f"{path}: {e}") from None


def _file_keys(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys a TOML file sets (items of a list of tables by index)."""
    out = set()
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out |= _file_keys(v, key)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out |= _file_keys(x, f"{key}.{i}")
        else:
            out.add(key)
    return out


def with_overrides(cfg: RunConfig, overrides: dict[str, Any] | list[str]) -> RunConfig:
    """``cfg`` with dotted-key overrides applied (checked like ``load_config``'s). Unlike flattening ``cfg`` onto
    the defaults, lists keep ``cfg``'s length: a config with one SLM spec stays with one."""
    defaults = to_dict(RunConfig())
    tree = json.loads(json.dumps(to_dict(cfg)))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for k, v in items:
        _set_path(tree, k, v, defaults)
    return _build(RunConfig, tree)


def _check_file_types(data: dict, cls: type, prefix: str, source: Path) -> None:
    """A TOML file is typed: a quoted number or boolean (``rounds = "2"``) is an error there, although the same
    text is parsed on the command line and in Flower's run config, where every value arrives as a string. Keys that
    do not exist are left to the checks that name them."""
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        if k not in hints:
            continue
        full = f"{prefix}.{k}" if prefix else k
        tp = hints[k]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            _check_file_types(v, tp, full, source)
        elif item is not None and dataclasses.is_dataclass(item):
            if not isinstance(v, list):
                raise ConfigError(f"{source}: config key '{full}': expected a list of tables ([[{full}]] sections), "
                                  f"found {_toml_kind(v)} {v!r}")
            for i, x in enumerate(v):
                if isinstance(x, dict):
                    _check_file_types(x, item, f"{full}.{i}", source)
        elif isinstance(v, str) and tp in (bool, int, float):
            kind = "true or false" if tp is bool else "an integer" if tp is int else "a number"
            raise ConfigError(f"{source}: config key '{full}': expected {kind}, found the string {v!r} (in a TOML "
                              "file, write it without quotes)")
        elif (tp is str and not isinstance(v, str)) or (tp is int and isinstance(v, float)):
            kind = "a string (in quotes)" if tp is str else "an integer (without a decimal point)"
            raise ConfigError(f"{source}: config key '{full}': expected {kind}, found {_toml_kind(v)} {v!r}")


def _toml_kind(v) -> str:
    return ("a boolean" if isinstance(v, bool) else "a number" if isinstance(v, (int, float)) else
            "a string" if isinstance(v, str) else "a table" if isinstance(v, dict) else
            "a list" if isinstance(v, list) else type(v).__name__)


def _merge(tree: dict, data: dict, defaults: dict, prefix: str, source: Path) -> None:
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else k
        if k not in defaults:
            raise ConfigError(f"{source}: unknown config key '{full}' (known at this level: "
                              f"{', '.join(sorted(defaults))})")
        if isinstance(v, dict) and isinstance(defaults[k], dict):
            _merge(tree[k], v, defaults[k], full, source)
        else:
            tree[k] = v


MAX_THREADS = 1024  # torch and the tokenizers' thread pools fail to start far beyond any core count


def resolve_threads(threads: int) -> int:
    """torch threads for ``threads``: itself when > 0, else every core this process may use (CPU affinity).

    Resolved the same way in every engine, so the in-process runner, a Flower simulation worker (whose own default
    Ray sets to 1 thread) and a SuperNode compute with the same thread count on the same machine: float sums over
    a different number of threads differ in their last digits, which grows to about a point of accuracy after 5
    rounds."""
    if threads > 0:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def same_config(stored: str | Path, cfg: RunConfig) -> bool:
    """Whether a run directory's ``config.toml`` describes ``cfg``: the same text, or the same resolved config once
    keys added since it was written take their defaults (so a run or a table started before a new key existed
    still resumes). A stored file that no longer loads (a key since removed) is a different config."""
    text = Path(stored).read_text(encoding="utf-8")
    if text == dump_toml(cfg):
        return True
    try:  # out_dir says where the run lives, not what it is: a moved folder or another spelling still resumes
        return dataclasses.replace(load_config(stored), out_dir=cfg.out_dir) == cfg
    except ConfigError:
        return False


def config_diff(stored: str | Path, cfg: RunConfig) -> list[str]:
    """The dotted keys whose values differ between a run directory's ``config.toml`` and ``cfg``."""
    try:
        old = flat_items(load_config(stored))
    except ConfigError as e:
        return [f"the stored config no longer loads ({e})"]
    new = flat_items(cfg)
    return sorted(k for k in old.keys() | new.keys() if k != "out_dir" and old.get(k) != new.get(k)) or ["(none)"]


def flat_items(cfg: RunConfig) -> dict[str, Any]:
    """Flatten to dotted keys (lists by index): the shape of Flower's ``run_config``."""
    out: dict[str, Any] = {}

    def walk(x, prefix):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(x, list) and x and isinstance(x[0], dict):
            for i, v in enumerate(x):
                walk(v, f"{prefix}.{i}")
        else:
            out[prefix] = x

    walk(to_dict(cfg), "")
    return out


def toml_string(v: str, key: str = "") -> str:
    """``v`` as a TOML basic string: characters beyond the BMP (an emoji in a path) written as themselves (JSON's
    surrogate-pair escapes are not TOML), control characters and DEL escaped. A lone surrogate (a path's bytes that
    are not UTF-8, as Python decodes them) cannot be written: ConfigError naming ``key``."""
    if any("\ud800" <= c <= "\udfff" for c in v):
        raise ConfigError(f"config key '{key or '?'}': {v!r} is not valid Unicode (a file name's bytes that are not "
                          "UTF-8?); it cannot be recorded in the run's config.toml: rename the file or folder")
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def dump_toml(cfg: RunConfig) -> str:
    """A TOML rendering of the resolved config (written into every run directory)."""
    lines: list[str] = []

    def val(v, key=""):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return toml_string(v, key)
        if isinstance(v, list):
            return "[" + ", ".join(val(x, key) for x in v) + "]"
        return repr(v)

    def unused(d: dict) -> None:  # a loaded model's spec still lists the tiny-model shape keys: say they are unused
        if d.get("source", "tiny") != "tiny" and "hidden_size" in d:
            lines.append(f"# {', '.join(TINY_ONLY_KEYS)}: used by source = \"tiny\" only, not by this model")

    def table(d: dict, name: str):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)
                   and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        if name:
            lines.append(f"\n[{name}]")
        unused(d)
        for k, v in scalars.items():
            lines.append(f"{k} = {val(v, f'{name}.{k}' if name else k)}")
        for k, v in d.items():
            full = f"{name}.{k}" if name else k
            if isinstance(v, dict):
                table(v, full)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"\n[[{full}]]")
                    unused(item)
                    for ik, iv in item.items():
                        lines.append(f"{ik} = {val(iv)}")

    table(to_dict(cfg), "")
    return "\n".join(lines).lstrip() + "\n"


def method_label(host: str, method: str) -> str:
    """A run's method as tables name it: the method alone for LaDa without a host, else ``<host>-<method>``."""
    return method if host == "none" else f"{host}-{method}"
