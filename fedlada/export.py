"""Export a trained model of a run as a plain Hugging Face model folder.

A run's checkpoints hold only what each model trains (LoRA adapters, or every weight of a fully fine-tuned model), so
using a distilled SLM or the LLM outside FedLaDa needs its base model, the checkpoint and a merge. ``export_model``
does exactly what a resumed run does to get the model back -- the run's config prepares the base model (the cached
tiny model, or the same ``source``), its fingerprint is checked against the run's ``setup`` line, the round's
checkpoint is loaded -- then writes the model with any adapter merged (``models.save_model``), loadable by
``transformers.AutoModelForCausalLM.from_pretrained`` and by ``source = "<folder>"`` in a later run.

Besides the model files, the folder gets ``fedlada_export.json``: the run directory, the round, which model, its
spec, and its accuracy at that round.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from fedlada.errors import ConfigError, FedLadaError, is_write_failure

log = logging.getLogger(__name__)


def _parse_who(who: str, n_clients: int, host: str = "none") -> int | str | None:
    """``"llm"`` -> None; ``"client<K>"`` or ``"<K>"`` -> K (checked against the run's clients); ``"slm"`` -> "slm",
    the server's aggregated SLM of a FedCoLLM run."""
    if who == "llm":
        return None
    if who == "slm":
        if host != "fedcollm":
            raise ConfigError(f"--model slm: the server's aggregated SLM exists in runs with host.name='fedcollm' "
                              f"only; this run's host is {host!r} (export 'llm' or 'client<K>')")
        return "slm"
    digits = who.removeprefix("client")
    if not digits.isdigit():
        raise ConfigError(f"--model: expected 'llm', 'client<K>' (e.g. client0) or, for a FedCoLLM run, 'slm', "
                          f"found {who!r}")
    k = int(digits)
    if k >= n_clients:
        raise ConfigError(f"--model: {who!r}, but the run has {n_clients} client(s) (client0..client{n_clients - 1})")
    return k


def export_model(run_dir: str | Path, who: str, out: str | Path, *, round: int | None = None) -> Path:
    """Write ``who``'s model (``"llm"``, ``"client<K>"`` or a FedCoLLM run's aggregated ``"slm"``) after ``round`` (default: the last completed one) of the
    run in ``run_dir`` to the new or empty folder ``out``; return ``out``. ConfigError for a folder that is not a run,
    a round that is not complete, an unknown model, a non-empty ``out`` or changed base weights."""
    import torch

    from fedlada import config as config_mod
    from fedlada.config import load_config
    from fedlada.models import prompt_formatter, save_model
    from fedlada.prepare import load_data, prepare_model, quiet_data_warnings
    from fedlada.runner import RunDir, check_models_unchanged, load_trainable, summarize_run

    rd = RunDir(run_dir)
    if not (rd.path / "config.toml").is_file():
        raise ConfigError(f"{rd.path} is not a run directory (no config.toml)")
    cfg = load_config(rd.path / "config.toml")
    k = _parse_who(who, cfg.data.n_clients, cfg.host.name)
    who = "llm" if k is None else "slm" if k == "slm" else f"client{k}"
    done = rd.last_complete_round()
    if done == 0:
        raise ConfigError(f"{rd.path} has no completed round yet: nothing trained to export")
    round = done if round is None else round
    ckpt = rd.ckpt / f"round_{round:03d}"
    if not (1 <= round <= done) or not (ckpt / "COMPLETE").is_file():
        raise ConfigError(f"--round {round}: {rd.path} holds completed rounds 1..{done}")
    out = Path(out).expanduser()
    if out.is_dir():  # the work folders of exports killed before they could remove them
        from fedlada.prepare import _alive

        for p in out.iterdir():
            m = re.fullmatch(r"\.export-(\d+)", p.name)
            if m and p.is_dir() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
    if out.exists() and (not out.is_dir() or any(not re.fullmatch(r"\.export-\d+", p.name) for p in out.iterdir())):
        partial = out.is_dir() and not (out / "fedlada_export.json").exists() and any(
            (out / n).exists() for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"))
        raise ConfigError(f"--out {out}: expected a new or empty folder (nothing in it was changed)"
                          + ("; it holds part of a model but no fedlada_export.json, as an interrupted export leaves "
                             "it: delete the folder and export again" if partial else ""))

    torch.set_num_threads(config_mod.resolve_threads(cfg.threads))  # the run's count: the same cached tiny model
    with quiet_data_warnings():  # the data's warnings (overlaps, small test splits) were the run's to say
        data = load_data(cfg)
    slot = 0 if k == "slm" else k  # the aggregated SLM is client 0's spec (FedCoLLM's SLMs are one model)
    spec = cfg.models.llm if k is None else cfg.models.slm_for(slot)
    role = "llm" if k is None else cfg.models.slm_role(slot)
    model, tok, info = prepare_model(spec, role=role, cfg=cfg, data=data)
    check_models_unchanged(rd, cfg, {"client0" if k == "slm" else who: info},  # as a resume checks it
                           remedy="restore that model, or export on the machine (and CPU thread count) the run used",
                           prompts_warn=True)
    path = ckpt / ("llm.pt" if k is None else "host_slm.pt" if k == "slm" else f"client_{k}.pt")
    if k == "slm" and not path.is_file():
        raise ConfigError(f"--model slm: {ckpt} holds no aggregated SLM (host_slm.pt): the server aggregates the SLMs "
                          f"only in rounds where lada.method exchanges with the clients")
    try:
        load_trainable(model, path, "the LLM" if k is None else "the aggregated SLM" if k == "slm" else who)
    except ConfigError as e:
        other = f"; export an earlier round with --round {round - 1}" if round > 1 else ""
        damaged = str(e).split(": the checkpoint of that round is damaged")
        if len(damaged) == 2:  # checkpoints.load's message, whose advice is for resuming
            raise ConfigError(f"{damaged[0]}{other}") from None
        raise ConfigError(f"{e} (was the run's config.toml edited?){other}") from None
    try:
        accuracy = summarize_run(rd, cfg)["accuracy"].get(who, {}).get(str(round))
        if accuracy is None and k == "slm":
            log.info("no accuracy in fedlada_export.json: a run evaluates each client's SLM, not the aggregate")
        elif accuracy is None:
            log.warning("no accuracy in fedlada_export.json: %s holds no evaluation of %s in round %d (the file was "
                        "cut short or edited, or that evaluation failed)", rd.path / "metrics.jsonl", who, round)
    except FedLadaError as e:  # a damaged metrics.jsonl: the accuracy note is all it gives here
        log.warning("no accuracy in fedlada_export.json: %s", e)
        accuracy = None
    # written into a work folder inside --out (the same file system) and moved up at the end: an export that fails
    # or is interrupted leaves --out as it was, and two exports into one folder cannot mix their files
    created = not out.exists()
    work = out / f".export-{os.getpid()}"
    try:
        save_model(model, tok, work)
        spec_keys = config_mod.to_dict(spec)
        if not spec.is_tiny:  # a loaded model's shape and tokenizer are its own, not these defaults
            spec_keys = {k: v for k, v in spec_keys.items() if k not in config_mod.TINY_ONLY_KEYS}
        prompts: dict = {}  # the instruction its chat-template prompts ended with (resolved from "auto")
        prompt_formatter(tok, spec, data.public, prompts)
        spec_keys["instruction"] = prompts.get("instruction", "")
        record = {"run_dir": str(rd.path.resolve()), "round": round, "model": who, "spec": spec_keys,
                  "accuracy": accuracy, "merged_lora": bool(spec.lora)}
        (work / "fedlada_export.json").write_text(json.dumps(record, indent=1))
        if any(not p.name.startswith(".export-") for p in out.iterdir()):
            raise ConfigError(f"--out {out}: another export wrote a model there meanwhile; this one was not written")
        for p in sorted(work.iterdir(), key=lambda p: p.name == "fedlada_export.json"):  # the record last
            os.replace(p, out / p.name)
    except BaseException as e:
        if created and out.is_dir() and all(p == work for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)  # no half-written model folder left behind
        if is_write_failure(e):
            raise ConfigError(f"--out {out}: cannot write the model ({getattr(e, 'strerror', None) or e}); nothing "
                              f"was left there: free space or pick another folder") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
