"""The command line's handling of user mistakes: a one-line error, exit status 2, no traceback."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from fedlada.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_file_where_a_folder_is_needed_is_an_error_not_a_traceback(tmp_path, capsys):
    afile = tmp_path / "afile.jsonl"
    afile.write_text("x")
    assert main(["data", "make", "--out", str(afile / "bench"), "--set", "data.general_size=10"]) == 2
    assert "Not a directory" in _err(capsys) and afile.read_text() == "x"


def test_validate_prints_one_line_per_problem(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q" * 20, "answer": "A\nB"}) + "\n")
    assert main(["data", "validate", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bad}:1: answer: spans several lines") and out[0].endswith("'rationale')")


def test_validate_counts_a_problem_repeated_on_many_lines(tmp_path, capsys):
    extra = tmp_path / "extra.csv"  # an extra column: the same problem on every row
    extra.write_text("id,question,answer,difficulty\n" + "".join(f"r{i},q{i},{i},easy\n" for i in range(40)))
    assert main(["data", "validate", str(extra)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and all(": difficulty: unknown key" in line for line in out[:3])
    assert out[3] == f"{extra}: difficulty: the same on 37 more line(s): 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, ..."
    assert out[4].startswith("40 problem(s) in 1 of 1 file(s)")


def test_an_empty_out_is_refused_by_every_command(tmp_path, capsys):
    for argv in (["data", "make", "--out", ""], ["compare", "--out", " ", "--seeds", "1"],
                 ["export", str(tmp_path), "--model", "llm", "--out", ""], ["run", "--out", ""]):
        with pytest.raises(SystemExit) if argv[0] != "run" else contextlib.nullcontext():
            assert main(argv) == 2
        assert "empty string" in _err(capsys)
    assert list(tmp_path.iterdir()) == []


def test_compare_needs_a_seed_and_finished_runs(tmp_path, capsys):
    assert main(["compare", "--seeds", "0", "--out", str(tmp_path / "t")]) == 2
    assert "--seeds: expected an integer >= 1" in _err(capsys)
    assert main(["compare", "--finished-only", "--seeds", "1", "--methods", "local", "--out",
                 str(tmp_path / "t")]) == 2
    assert "no finished run of local" in _err(capsys)
    assert not (tmp_path / "t" / "table.md").exists()


def test_report_of_a_run_that_never_evaluated_is_an_error(tmp_path, capsys):
    from fedlada.config import dump_toml, load_config

    (tmp_path / "config.toml").write_text(dump_toml(load_config()))
    assert main(["report", str(tmp_path)]) == 2
    err = _err(capsys)
    assert "no evaluation yet" in err and "warning" not in err and not (tmp_path / "report.html").exists()


def test_report_of_a_run_with_a_damaged_line_says_what_to_do(tmp_path, capsys):
    from fedlada.config import dump_toml, load_config

    (tmp_path / "config.toml").write_text(dump_toml(load_config()))
    row = json.dumps({"round": 0, "event": "eval", "who": "llm", "accuracy": 0.1, "n": 1})
    (tmp_path / "metrics.jsonl").write_text(f"{row}\n{{torn\n{row}\n")
    assert main(["report", str(tmp_path)]) == 2
    err = _err(capsys)
    assert "metrics.jsonl:2: not a JSON object" in err and "delete that line to report the rest" in err
    assert "warning" not in err and not (tmp_path / "report.html").exists()


def test_report_of_a_run_whose_metrics_were_cut_short_says_so(tmp_path, capsys):
    from fedlada.config import dump_toml, load_config
    from fedlada.runner import RunDir

    (tmp_path / "config.toml").write_text(dump_toml(load_config(None, ["rounds=2"])))
    for t in (1, 2):  # two checkpointed rounds, but the metrics of round 0 and 1 only
        (tmp_path / "checkpoints" / f"round_00{t}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"round_00{t}" / "COMPLETE").write_text(str(t))
    RunDir(tmp_path).append("metrics.jsonl", [{"round": t, "event": "eval", "who": w, "accuracy": 0.1, "n": 1}
                                              for t in (0, 1) for w in ("client0", "llm")])
    assert main(["report", str(tmp_path)]) == 0
    err = _err(capsys)
    assert "warning: " in err and "metrics.jsonl lacks the rows of round(s) 2" in err
    assert (tmp_path / "report.html").is_file()


def test_export_of_a_folder_that_is_not_a_run_is_an_error(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--model", "llm", "--out", str(tmp_path / "m")]) == 2
    assert "is not a run directory (no config.toml)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("override, fragment", [
    ("lada.budget=2", "config key 'lada.budget'"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("threads=100000", "config key 'threads': expected an integer in 0..1024"),
])
def test_bad_config_values_exit_2(override, fragment, tmp_path, capsys):
    assert main(["run", "--set", override, "--out", str(tmp_path / "r")]) == 2
    assert fragment in _err(capsys) and not (tmp_path / "r").exists()


def test_compare_refuses_flower_and_a_pairing_its_host_cannot_run_before_any_run(tmp_path, capsys, monkeypatch):
    from fedlada import runner

    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("a run started"))
    assert main(["compare", "--set", "engine=flower", "--out", str(tmp_path / "t")]) == 2
    assert "runs every (method, seed) in process" in _err(capsys)
    # the default SLMs differ in shape, which FedCoLLM's averaging cannot take: refused before 'local' runs
    assert main(["compare", "--methods", "local,fedcollm:host", "--seeds", "1", "--out", str(tmp_path / "t")]) == 2
    assert "'fedcollm' averages the SLMs' weights" in _err(capsys)


def test_devices_and_model_folders_are_checked_with_clear_errors(tmp_path):
    from fedlada.config import load_config
    from fedlada.errors import ConfigError, ModelError
    from fedlada.models import check_devices, load_model

    with pytest.raises(ConfigError, match=r"'models.slms.1.device'.*cuda:99"):
        check_devices(load_config(overrides=["models.slms.1.device=cuda:99"]))
    (tmp_path / "models").mkdir()  # "models/my-slm" with a ./models folder here: a mistyped folder, not a hub id
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ModelError, match=r"model not found: models/my-slm does not exist .*a folder 'models'"):
            load_model("models/my-slm")
    finally:
        os.chdir(cwd)
    import torch

    if not torch.backends.mps.is_available():  # the common case off a Mac: named up front, not a crash later
        with pytest.raises(ConfigError, match=r"'models.slms.0.device'.*no Apple MPS device"):
            check_devices(load_config(overrides=["models.slms.0.device=mps"]))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="not a model directory: it has no config.json"):
        load_model(tmp_path)


def test_a_client_asking_for_more_cpus_than_the_machine_has_is_refused(tmp_path):
    pytest.importorskip("flwr")
    from fedlada.config import load_config
    from fedlada.errors import ConfigError
    from fedlada_app.settings import FlowerConfig
    from fedlada_app.simulate import run_simulation

    with pytest.raises(ConfigError, match="'flower.client_cpus'"):
        run_simulation(load_config(overrides=[f"out_dir={tmp_path / 'r'}"]), flower=FlowerConfig(client_cpus=4096))
    assert not (tmp_path / "r").exists()


def test_validate_counts_the_files_it_read_and_bounds_the_record_limit(tmp_path, capsys):
    good = {"id": "a", "question": "What is 1 + 1?", "answer": "2"}
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        (tmp_path / name).write_text(json.dumps({**good, "id": name}) + "\n")
    assert main(["data", "validate", str(tmp_path)]) == 0
    assert "ok: 3 file(s), no problems" in capsys.readouterr().out
    (tmp_path / "c.jsonl").write_text("{not json\n")
    assert main(["data", "validate", str(tmp_path)]) == 1
    assert "1 problem(s) in 1 of 3 file(s)" in capsys.readouterr().out
    assert main(["data", "validate", "--max-record-bytes", "10", str(tmp_path)]) == 2
    assert "--max-record-bytes: expected an integer >= 64, found 10" in _err(capsys)


def test_data_make_lists_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["data", "make", "--out", str(out), "--set", "data.num_clients=2", "--set", "data.general_size=0",
                 "--set", "data.train_per_client=5", "--set", "data.test_per_client=3",
                 "--set", "data.public_size=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote the built-in benchmark to {out}"
    assert any(line.strip().startswith("client 1 (") for line in lines)
    assert not any("general corpus" in line or "PosixPath" in line for line in lines)


def test_an_interrupt_that_surfaces_late_or_as_another_error_still_exits_as_an_interrupt(monkeypatch, capsys):
    """Python ignores an exception raised inside a finaliser (the KeyboardInterrupt is printed as "Exception ignored"
    and the command goes on), and a KeyboardInterrupt inside an import can come out as another exception: the
    signal handlers remember the signal, so the command still ends as interrupted, with that command's message."""
    from fedlada import cli

    def swallowed(args):
        cli._signalled.append(143)  # what _on_sigterm records before raising
        return 0

    def wrapped(args):
        cli._signalled.append(130)
        raise RuntimeError("Error calling __set_name__ on '_axis_method_wrapper'")

    monkeypatch.setattr(cli, "_signalled", [])
    monkeypatch.setattr(cli, "cmd_report", swallowed)
    assert main(["report", "somewhere"]) == 143
    assert _err(capsys).strip() == "interrupted; the same command writes the report again"
    monkeypatch.setattr(cli, "_signalled", [])
    monkeypatch.setattr(cli, "cmd_export", wrapped)
    assert main(["export", "r", "--model", "llm", "--out", "x"]) == 130
    assert _err(capsys).strip() == "interrupted; nothing was exported (the same command starts over)"
    # the next command in this process starts afresh; a second Ctrl-C during the clean-up is only counted
    monkeypatch.setattr(cli, "cmd_report", lambda args: 0)
    assert main(["report", "somewhere"]) == 0 and cli._signalled == []
    with pytest.raises(KeyboardInterrupt):
        cli._on_sigint(2, None)
    cli._on_sigint(2, None)
    assert cli._signalled == [130, 130]
    monkeypatch.setattr(cli, "_signalled", [])
    monkeypatch.setattr(cli, "cmd_export", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # without a signal, a bug is a bug
        main(["export", "r", "--model", "llm", "--out", "x"])


@pytest.mark.slow
def test_sigterm_while_preparing_models_stops_like_ctrl_c_and_leaves_no_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "runs" / "term"
    cmd = [sys.executable, "-m", "fedlada.cli", "run", "--config", "configs/smoke.toml", "--set", "threads=1",
           "--set", f"models.cache_dir={tmp_path / 'cache'}", "--set", "models.llm.pretrain_tokens=5000000",
           "--out", str(out)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "config.toml").exists():  # the folder is made once data loaded
        time.sleep(0.2)
    time.sleep(2)  # into the LLM's (long) pretraining
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # neither the run folder nor the parent this start made


def test_the_command_turns_off_the_libraries_own_progress_bars_unless_the_environment_sets_them(tmp_path,
                                                                                                monkeypatch):
    """The command shows its own stages: transformers' tqdm bars (GGUF de-quantisation) and the hub's would
    interleave with them. They are turned off before any library reads the variables; a user's setting stays."""
    import subprocess
    import sys

    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"id": "x", "question": "What is 2 + 2?", "answer": "4"}) + "\n")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert main(["data", "validate", str(good)]) == 0
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert main(["data", "validate", str(good)]) == 0 and os.environ["TQDM_DISABLE"] == "0"
    # as a command, no library that reads them is imported before they are set
    probe = ("import sys; import fedlada.cli as c; c.build_parser().parse_args(['run']); "
             "print(sorted(m for m in ('tqdm', 'transformers', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_progress_written_to_a_file_is_a_line_every_so_often():
    """A bar is not drawn where the output is no terminal (nohup, a job's log): a plain line every NOTE_SECONDS says
    how far a long step is."""
    import io

    from rich.console import Console

    from fedlada.cli import _RichEvents

    out = io.StringIO()
    with _RichEvents(Console(file=out, width=120)) as ev:
        ev.NOTE_SECONDS = 0.0
        ev.stage("pretraining the LLM")
        for step in range(1, 4):
            ev.progress(step, 3)
    text = out.getvalue()
    assert "pretraining the LLM: 1/3" in text and "pretraining the LLM: 2/3" in text
    assert "3/3" not in text  # the end is the next stage's line


def test_running_out_of_memory_is_one_line_saying_what_to_shrink(monkeypatch, capsys):
    """A config too big for the machine (a 4M-wide SLM, a huge LoRA rank) failed with torch's allocator traceback;
    it is a one-line error with the knobs to shrink (``--verbose`` keeps the traceback)."""
    import torch

    from fedlada import cli

    for exc in (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                             "tried to allocate 64000000000000 bytes"),
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError()):
        monkeypatch.setattr(cli, "cmd_report", lambda args, exc=exc: (_ for _ in ()).throw(exc))
        assert main(["report", "somewhere"]) == 1
        err = _err(capsys)
        assert err.startswith("error: out of memory (") and "train.batch_size" in err and "Traceback" not in err
    with pytest.raises(MemoryError):
        main(["--verbose", "report", "somewhere"])


def test_a_lora_rank_past_every_layers_width_is_refused_naming_the_key(tmp_path, capsys):
    assert main(["run", "--config", "configs/smoke.toml", "--set", "threads=1", "--set", "models.llm.lora_r=100000",
                 "--out", str(tmp_path / "r")]) == 2
    assert "config key 'models.llm.lora_r': apply_lora: rank r=100000 exceeds the smaller dimension" in _err(capsys)
    assert not (tmp_path / "r").exists()


def test_a_new_flower_run_interrupted_in_its_set_up_leaves_no_folder(tmp_path):
    """Under Flower the set-up runs in the ServerApp's thread, which cannot clean up on Ctrl-C: the command removes
    a new run's folder while it has no setup line and no completed round, and keeps it from then on."""
    from fedlada.cli import _drop_unstarted_run

    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.toml", "metrics.jsonl", "selections.jsonl", ".lock"):
        (out / name).write_text("")
    _drop_unstarted_run(out)
    assert not out.exists()
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 0, "event": "setup"}\n')
    _drop_unstarted_run(out)
    assert (out / "metrics.jsonl").is_file()
    (out / "metrics.jsonl").write_text("")
    (out / "checkpoints" / "round_001").mkdir(parents=True)
    (out / "checkpoints" / "round_001" / "COMPLETE").write_text("")
    _drop_unstarted_run(out)
    assert (out / "checkpoints" / "round_001" / "COMPLETE").is_file()
