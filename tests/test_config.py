"""The typed config: defaults, TOML files, overrides, Flower's flat run_config, and errors naming the key."""

import re
from pathlib import Path

import pytest

from fedlada.config import RunConfig, dump_toml, flat_items, load_config
from fedlada.errors import ConfigError


def test_defaults_round_trip_through_toml(tmp_path):
    cfg = load_config()
    assert cfg == RunConfig()
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg


def test_config_toml_says_which_keys_a_loaded_model_does_not_use(tmp_path):
    cfg = load_config(overrides=["models.llm.source=Qwen/Qwen2.5-0.5B", 'models.slms=[{"source": "/m/slm"}, {}]'])
    text = dump_toml(cfg)
    note = '# hidden_size, num_layers, num_heads, tokenizer, tokenizer_vocab, pretrain_tokens: used by source = "tiny"'
    assert text.count(note) == 2  # the LLM and the first SLM; the second SLM is tiny
    assert text.index(note) < text.index('source = "Qwen/Qwen2.5-0.5B"')
    assert note not in dump_toml(RunConfig())
    (tmp_path / "c.toml").write_text(text)
    assert load_config(tmp_path / "c.toml") == cfg


def test_overrides_and_list_items():
    cfg = load_config(overrides=["lada.budget=0.3", "models.slms.1.hidden_size=96", "rounds=2",
                                 "models.llm.lora_target_modules=q_proj,v_proj", "train.bf16=true"])
    assert cfg.lada.budget == 0.3
    assert cfg.models.slms[1].hidden_size == 96
    assert cfg.rounds == 2
    assert cfg.models.llm.lora_target_modules == ("q_proj", "v_proj")
    assert cfg.train.bf16 is True
    # an index one past the end appends a copy of the last item (a fourth SLM)
    cfg = load_config(overrides=["models.slms.3.hidden_size=32"])
    assert len(cfg.models.slms) == 4 and cfg.models.slms[3].hidden_size == 32
    assert cfg.models.slms[3].num_layers == cfg.models.slms[2].num_layers


def test_flat_run_config_equals_nested():
    cfg = load_config(overrides=["lada.method=random", "seed=7"])
    assert load_config(overrides=flat_items(cfg)) == cfg


@pytest.mark.parametrize("override, fragment", [
    ("lada.bogus=1", "unknown config key 'lada.bogus'"),
    ("lada.budget=abc", "config key 'lada.budget': expected a finite number, found 'abc'"),
    ("lada.temperature=inf", "config key 'lada.temperature': expected a finite number, found 'inf'"),
    ("lada.filter_epochs=0", "config key 'lada.filter_epochs': expected an integer >= 1"),
    ("lada.filter_hidden=0", "config key 'lada.filter_hidden'"),
    ("lada.filter_lr=0", "config key 'lada.filter_lr'"),
    ("models.llm.lora_dropout=5", "config key 'models.llm.lora_dropout': expected a probability in [0, 1)"),
    ("models.slms.1.device=gpu", "config key 'models.slms.1.device'"),
    ("models.slms.2.lora_r=0", "config key 'models.slms.2.lora_r'"),
    ("models.llm.lora_alpha=0", "config key 'models.llm.lora_alpha': expected an integer >= 1"),
    ("models.slms.0.dtype=float16", "config key 'models.slms.0.dtype': expected 'bfloat16' or 'float32' for a fully "
                                    "fine-tuned model (float16 weights are trained only through LoRA adapters"),
    ('data.clients=[{"train": "a", "test": "b", "format": "xml"}]', "config key 'data.clients.0.format'"),
    ('data.clients=[{"train": "a", "test": "b"}, {"train": "a", "test": ""}]', "config key 'data.clients.1.test'"),
    ("lada.budget=2", "expected a fraction in (0, 1]"),
    ("lada.method=magic", "config key 'lada.method'"),
    ("rounds=0", "config key 'rounds': expected an integer >= 1"),
    ("train.bf16=maybe", "expected true or false"),
    ("models.slms.x.hidden_size=3", "expected an index"),
    ("models.slms.9.hidden_size=64", "out of range"),
    ("models.llm.num_heads=7", "a divisor of hidden_size"),
    ("budget", "expected key=value"),
    ("lada.method=lada-sft,lada.mu=0.3", "lada.method = 'lada-sft' trains SFT at weight 1"),
    ("lada.method=lada-sft,lada.lambda_da=3", "so it takes neither key"),
    ("lada.loss=listwise,lada.paths_per_question=1", "config key 'lada.paths_per_question': expected an integer >= 2 "
                                                     "with lada.loss = 'listwise'"),
    ("lada.loss=listwise,lada.temperature=0", "config key 'lada.temperature': expected > 0 with lada.loss = "
                                              "'listwise' (greedy decoding"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=override.split(",") if override.startswith(("lada.method=lada-sft", "lada.loss="))
                    else [override])
    assert fragment in str(e.value)


def test_bad_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[lada]\nbudget = 0.3\nfoo = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown config key 'lada.foo'"):
        load_config(p)
    p.write_text("[lada\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"--config .*: is a folder; give a TOML config file"):
        load_config(tmp_path)
    p.write_bytes(b"\xef\xbb\xbfrounds = 2\n")  # a Windows editor's byte-order mark
    assert load_config(p).rounds == 2
    p.write_bytes(b"rounds = 2\n# caf\xe9\n")  # Latin-1
    with pytest.raises(ConfigError, match=r"bad.toml: not valid UTF-8 \(byte 0xe9 on line 2\); save the config as "
                                          r"UTF-8"):
        load_config(p)


def test_a_toml_file_is_typed_while_the_command_line_parses_strings(tmp_path):
    p = tmp_path / "typed.toml"
    for text, fragment in (('rounds = "2"', "'rounds': expected an integer, found the string '2'"),
                           ('[train]\nbf16 = "yes"', "'train.bf16': expected true or false"),
                           ('[lada]\nbudget = "0.3"', "'lada.budget': expected a number"),
                           ('[[models.slms]]\nlora_r = "8"', "'models.slms.0.lora_r': expected an integer"),
                           ("[data]\npublic = 5", "'data.public': expected a string (in quotes), found a number 5"),
                           ("[data]\neval_limit = 5.0", "'data.eval_limit': expected an integer (without a decimal"),
                           ('[data]\nclients = "x"', "'data.clients': expected a list of tables ([[data.clients]]")):
        p.write_text(text + "\n")
        with pytest.raises(ConfigError, match=re.escape(f"typed.toml: config key {fragment}")):
            load_config(p)
    p.write_text('rounds = 2\n[[models.slms]]\nlora_r = 8\n')
    assert load_config(p, ["lada.budget=0.3", "train.bf16=true"]).rounds == 2  # CLI strings are parsed
    p.write_text("[lada]\ntemperature = nan\n")  # a bad value names the file
    with pytest.raises(ConfigError, match=r"typed.toml: config key 'lada.temperature': expected a finite number"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^config key 'lada.temperature'"):  # the override's value, not the file's
        load_config(p, ["lada.temperature=nan"])
    p.write_text("[[models.slms]]\nlora_r = 0\n")
    with pytest.raises(ConfigError, match=r"typed.toml: config key 'models.slms.0.lora_r'"):
        load_config(p)
    # a file's client list: a new client is not made by index (it would copy the last one's test file), and a bad
    # list given on the command line is not blamed on the file
    p.write_text('[data]\npublic = "p.jsonl"\n[[data.clients]]\ntrain = "a.jsonl"\ntest = "b.jsonl"\n')
    with pytest.raises(ConfigError, match=r"a new client is not made by index.*give the whole list instead"):
        load_config(p, ["data.clients.1.train=c.jsonl"])
    with pytest.raises(ConfigError, match=r"^config key 'data.clients.0.test'"):
        load_config(p, ['data.clients=[{"train": "x.jsonl"}]'])
    assert load_config(p, ["data.clients.0.train=c.jsonl"]).data.clients[0].train == "c.jsonl"
    assert load_config(overrides=["out_dir=~/runs/x"]).out_dir == str(Path.home() / "runs" / "x")


def test_a_string_key_takes_brackets_as_text():
    assert load_config(overrides=["out_dir=[exp1]"]).out_dir == "[exp1]"
    with pytest.raises(ConfigError, match=r"config key 'data.clients': expected JSON, found '\[\{bad'"):
        load_config(overrides=["data.clients=[{bad"])


def test_user_data_needs_public_pool():
    with pytest.raises(ConfigError, match="data.public"):
        load_config(overrides={"data.clients": [{"train": "a.jsonl", "test": "b.jsonl"}]})


def test_built_in_benchmark_keys_set_with_your_own_files_are_named_as_unused():
    own = {"data.clients": [{"train": "a.jsonl", "test": "b.jsonl"}], "data.public": "p.jsonl"}
    assert load_config(overrides={**own, "data.num_clients": 3}).data.unused_builtin_keys() == []  # the defaults
    cfg = load_config(overrides={**own, "data.num_clients": 5, "data.public_size": 3})
    assert cfg.data.n_clients == 1 and cfg.data.unused_builtin_keys() == ["data.num_clients=5", "data.public_size=3"]
    assert load_config(overrides=["data.num_clients=5"]).data.unused_builtin_keys() == []  # the benchmark uses it


def test_the_evaluation_answer_length_defaults_to_the_sampling_length():
    assert load_config(overrides=["lada.max_new_tokens=40"]).eval_max_new_tokens == 40
    cfg = load_config(overrides=["lada.max_new_tokens=40", "data.eval_max_new_tokens=96"])
    assert cfg.eval_max_new_tokens == 96 and cfg.lada.max_new_tokens == 40
    with pytest.raises(ConfigError, match="data.eval_max_new_tokens"):
        load_config(overrides=["data.eval_max_new_tokens=-1"])


def test_a_stored_config_from_before_a_new_key_still_matches(tmp_path):
    from fedlada.config import dump_toml, same_config

    cfg = load_config(overrides=["rounds=2"])
    text = dump_toml(cfg)
    old = tmp_path / "old.toml"  # written before models.*.vllm_gpu_memory existed
    old.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("vllm_gpu_memory")) + "\n")
    assert old.read_text() != text and same_config(old, cfg)
    assert not same_config(old, load_config(overrides=["rounds=3"]))
    gone = tmp_path / "gone.toml"  # a key that no longer exists: a different config, not a crash
    gone.write_text(text + "\n[obsolete]\nx = 1\n")
    assert not same_config(gone, cfg)


def test_train_keys_reach_the_training_loop():
    import inspect

    from fedlada.rounds import _train_kwargs
    from fedlada.train import train

    cfg = load_config(overrides=["train.compile=true", "train.bf16=true", "train.grad_accum=3", "lada.method=lada"])
    kw = _train_kwargs(cfg, lr=0.1, epochs=2, seed=5)
    got = (kw["compile"], kw["bf16"], kw["grad_accum"], kw["lr"], kw["epochs"], kw["seed"])
    assert got == (True, True, 3, 0.1, 2, 5)
    assert set(kw) <= set(inspect.signature(train).parameters)
    assert _train_kwargs(load_config(), lr=0.1, epochs=1, seed=0)["compile"] is False
    # every config key named like a training argument reaches it (lada.tau once did not)
    cfg = load_config(overrides=["lada.tau=5.0", "lada.beta=0.3", "lada.lambda_da=2.0", "lada.mu=0.25",
                                 "train.max_length=200", "train.batch_size=5", "train.max_grad_norm=3.0"])
    kw = _train_kwargs(cfg, lr=0.1, epochs=1, seed=0)
    shared = {name for name in inspect.signature(train).parameters
              if hasattr(cfg.train, name) or hasattr(cfg.lada, name)}
    assert shared and shared <= set(kw)
    for name in shared:
        assert kw[name] == getattr(cfg.train if hasattr(cfg.train, name) else cfg.lada, name), name


def test_the_contrastive_term_that_trains_follows_method_loss_and_weight():
    from fedlada.rounds import _da_loss

    assert _da_loss(load_config()) == "pairwise"
    assert _da_loss(load_config(overrides=["lada.loss=listwise"])) == "listwise"
    # no L_DA term trains: no pairs or lists are built (and none is counted as preference_pairs)
    for over in (["lada.method=lada-sft"], ["lada.lambda_da=0"], ["lada.loss=sft"]):
        assert _da_loss(load_config(overrides=over)) == "sft"


def test_quoted_command_line_strings_are_their_text():
    """--set values written as TOML strings ("..." or '...'), as in a config file, are their text; in a list too."""
    cfg = load_config(overrides=["models.llm.source='/tmp/x y'", 'out_dir="runs/q"', 'lada.plugins="a.py", b.py',
                                 "lada.method=gap-first", 'models.llm.lora_target_modules="q_proj",v_proj'])
    assert (cfg.models.llm.source, cfg.out_dir) == ("/tmp/x y", "runs/q")
    assert cfg.lada.plugins == ("a.py", "b.py") and cfg.models.llm.lora_target_modules == ("q_proj", "v_proj")
    assert load_config(overrides=['out_dir="a\\d"']).out_dir == '"a\\d"'  # not a valid TOML string: as given


def test_a_json_table_changes_the_keys_it_names_as_a_config_files_table_does():
    """``--set 'models.llm={"num_layers": 2}'`` keeps the LLM's other defaults (LoRA, width), as ``[models.llm]`` in
    a file does; one slot's JSON table edits that slot; a whole list still replaces the list."""
    cfg = load_config(None, ['models.llm={"num_layers": 2}', 'models.slms.1={"lora": true}'])
    assert (cfg.models.llm.num_layers, cfg.models.llm.hidden_size, cfg.models.llm.lora) == (2, 256, True)
    assert (cfg.models.slms[1].lora, cfg.models.slms[1].hidden_size) == (True, RunConfig().models.slms[1].hidden_size)
    assert load_config(None, ['models.llm={"num_layers": 2}']) == load_config(None, ["models.llm.num_layers=2"])
    whole = load_config(None, ['models.slms=[{"hidden_size": 32}]']).models.slms
    assert len(whole) == 1 and whole[0].hidden_size == 32 and whole[0].lora is False
    with pytest.raises(ConfigError, match="unknown config key|models.llm"):
        load_config(None, ['models.llm={"num_layer": 2}'])


def test_any_unicode_in_a_string_value_round_trips_through_config_toml(tmp_path):
    """An emoji in a path or an instruction was written as JSON's surrogate-pair escape, which TOML refuses: the run
    finished, then its folder could not be reported on or resumed. Control characters and DEL are escaped; a lone
    surrogate (a file name whose bytes are not UTF-8) is refused up front, naming the key."""
    import tomllib

    from fedlada.config import dump_toml, toml_string
    from fedlada_app.settings import run_config_file

    for v in ("my run ünïcødé 🚀", "tab\tnew\nline", "del\x7f", 'quote" back\\', "\x00"):
        assert tomllib.loads("x = " + toml_string(v))["x"] == v
    cfg = load_config(overrides=[f"out_dir={tmp_path / 'run 🚀'}", "models.llm.instruction=think 🤔\x7f"])
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg), encoding="utf-8")
    assert load_config(path) == cfg
    assert tomllib.loads(run_config_file(cfg))["models"]["llm"]["instruction"] == "think 🤔\x7f"
    with pytest.raises(ConfigError, match=r"config key 'models.llm.source': .* is not valid Unicode"):
        dump_toml(load_config(overrides=["models.llm.source=/tmp/caf\udce9"]))


def test_a_tilde_user_that_names_no_user_is_an_error_not_a_folder():
    """``--out ~nosuchuser/run`` made a folder literally named ``~nosuchuser`` in the working directory."""
    assert load_config(overrides=["out_dir=~/runs/x"]).out_dir == str(Path.home() / "runs" / "x")
    for key in ("out_dir", "data.public"):
        with pytest.raises(ConfigError, match=rf"config key '{key}': expected a path whose ~user names a user"):
            load_config(overrides=[f"{key}=~nosuchuser-fedlada/x"])
