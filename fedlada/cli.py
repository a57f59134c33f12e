"""The ``fedlada`` command line: ``run``, ``data make``, ``data validate``, ``report``, ``compare``.

Heavy libraries (torch, transformers) are imported only inside the commands that need them, so ``--help`` is
instant. A :class:`~fedlada.errors.FedLadaError` (a user error) is printed without a traceback and exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from fedlada.data.validate import DEFAULT_MAX_RECORD_BYTES

INTERRUPTED = ("interrupted; every completed round is checkpointed and the same command resumes after the last "
               "(a new run interrupted while preparing its models leaves no folder)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, ``timeout``): stopped the way Ctrl-C stops, with exit status 143."""


_signalled: list[int] = []  # the exit status of a Ctrl-C (130) or SIGTERM (143) this process received


def _on_sigint(signum, frame):
    _signalled.append(130)
    if len(_signalled) == 1:  # a second Ctrl-C while the first one cleans up is only counted
        raise KeyboardInterrupt()


def _on_sigterm(signum, frame):
    _signalled.append(143)
    if len(_signalled) == 1:
        raise Terminated()


def _interrupted_status(e: KeyboardInterrupt | None) -> int:
    if e is None:
        return _signalled[0]
    return 143 if isinstance(e, Terminated) else 130


def _console():
    from rich.console import Console

    return Console(stderr=True)


class _RichEvents:
    """Progress display for long steps: one line per stage, a bar inside steps that report progress (a line every
    ``NOTE_SECONDS`` instead where the output is no terminal)."""

    NOTE_SECONDS = 30.0

    def __init__(self, console):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.t0 = time.perf_counter()
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                            "{task.total}"), TimeElapsedColumn(), console=console, transient=True)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def stage(self, text: str) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        self.console.log(f"[{time.perf_counter() - self.t0:6.1f}s] {text}")
        self._desc = text

    def progress(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task(getattr(self, "_desc", "working"), total=total)
            self._noted = time.perf_counter()
        self.bar.update(self.task, completed=done, total=total)
        # output to a file or a pipe (nohup, a cluster job) shows no bar: a line every NOTE_SECONDS instead
        if not self.console.is_terminal and time.perf_counter() - self._noted >= self.NOTE_SECONDS and done < total:
            self._noted = time.perf_counter()
            self.console.log(f"[{time.perf_counter() - self.t0:6.1f}s] {getattr(self, '_desc', 'working')}: "
                             f"{done}/{total}")


def _split_flower_sets(sets) -> tuple[list[str], dict[str, str]]:
    """Split ``--set`` values into the run config's overrides and the Flower engine's ``flower.*`` knobs."""
    rest, flower = [], {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if sep and key.strip().startswith("flower."):
            flower[key.strip()[len("flower."):]] = value.strip()
        else:
            rest.append(item)
    return rest, flower


def _load_cfg(args, sets=None):
    from fedlada.config import load_config

    overrides = list((args.set or []) if sets is None else sets)
    if getattr(args, "out", None) is not None:
        if not args.out.strip():
            from fedlada.errors import ConfigError

            raise ConfigError("--out: expected a folder, found an empty string")
        overrides.append(f"out_dir={args.out}")
    if getattr(args, "engine", None):
        overrides.append(f"engine={args.engine}")
    return load_config(args.config, overrides)


def _quiet_library_bars() -> None:
    """The command shows its own stages and bars: the libraries' tqdm bars (hub downloads, transformers' GGUF
    de-quantisation) would interleave with them. An environment that sets these variables keeps its choice."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def cmd_run(args) -> int:
    from fedlada.errors import ConfigError, FedLadaError

    sets, flower_sets = _split_flower_sets(args.set)
    cfg = _load_cfg(args, sets)
    console = _console()
    if flower_sets and cfg.engine != "flower":
        raise ConfigError(f"config keys {', '.join('flower.' + k for k in flower_sets)} configure the Flower engine; "
                          f"add --engine flower (or drop them)")
    if cfg.engine == "flower":
        try:
            from fedlada_app.settings import flower_config
            from fedlada_app.simulate import run_simulation
        except ImportError as e:
            raise FedLadaError(f"engine=flower needs Flower: pip install 'flwr[simulation]>=1.42' ({e})") from None
        fcfg = flower_config(flower_sets)
        out = Path(cfg.out_dir).expanduser()
        new_run = not out.is_dir() or not any(out.iterdir())
        try:
            with _RichEvents(console) as ev:
                result = run_simulation(cfg, resume=not args.fresh, events=ev, flower=fcfg)
        except KeyboardInterrupt as e:  # Flower's worker threads would keep the interpreter from exiting
            if new_run:  # interrupted in its set-up (the ServerApp's thread cannot clean up): leave no folder
                _drop_unstarted_run(out)
            print(INTERRUPTED, file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(_interrupted_status(e))
    else:
        from fedlada.runner import run

        with _RichEvents(console) as ev:
            result = run(cfg, resume=not args.fresh, events=ev)
    from fedlada.report import print_summary, write_report

    try:
        report = write_report(result.run_dir)
    except OSError as e:  # e.g. a finished run in a read-only folder: its summary still stands
        report = f"not written ({e.strerror or e}{': ' + str(e.filename) if getattr(e, 'filename', None) else ''})"
    print_summary(result.summary, console=_stdout_console(), wall_seconds=result.wall_seconds)
    console.print(f"run directory: {result.run_dir}\nreport: {report}")
    return 0


def _stdout_console():
    from rich.console import Console

    return Console()


def cmd_data_make(args) -> int:
    from fedlada.config import load_config
    from fedlada.data import make_benchmark
    from fedlada.prepare import benchmark_kwargs

    cfg = load_config(args.config, list(args.set or []))
    kw = benchmark_kwargs(cfg)
    layout = make_benchmark(args.out, **kw)
    console = _stdout_console()

    def say(text: str) -> None:  # paths as they are: no markup, no highlighting, no wrapping
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    say(f"wrote the built-in benchmark to {layout.out_dir}")
    for k, c in enumerate(layout.clients):
        say(f"  client {k} ({c.domain}): {c.train}, {c.test}")
    say(f"  public pool: {layout.public}")
    if layout.general is not None:
        say(f"  general corpus: {layout.general}")
    say(f"  manifest: {layout.manifest}")
    return 0


SAME_PROBLEM_SHOWN = 3  # `data validate` prints a problem repeated on many lines this many times, then a count


def cmd_data_validate(args) -> int:
    from fedlada.data import validate_files
    from fedlada.data.validate import expand_data_paths
    from fedlada.errors import ConfigError

    if args.max_record_bytes < 64:  # the bound of data.max_record_bytes
        raise ConfigError(f"--max-record-bytes: expected an integer >= 64, found {args.max_record_bytes}")
    problems = validate_files(args.files, format=args.format, max_record_bytes=args.max_record_bytes)
    n_files = len(expand_data_paths(args.files))
    console = _stdout_console()
    if problems:
        shown: dict[tuple, list] = {}  # the same problem on many lines (an extra CSV column): three, then a count
        for p in problems:
            lines = shown.setdefault((p.file, p.key, p.message), [])
            lines.append(p.line)
            if len(lines) <= SAME_PROBLEM_SHOWN:
                console.print(str(p), markup=False, highlight=False, soft_wrap=True)  # one problem, one line
        for (file, key, message), lines in shown.items():
            if len(lines) > SAME_PROBLEM_SHOWN:
                more = lines[SAME_PROBLEM_SHOWN:]
                listed = ", ".join(str(n) for n in more[:10]) + (", ..." if len(more) > 10 else "")
                console.print(f"{file}: {key + ': ' if key else ''}the same on {len(more)} more line(s): {listed}",
                              markup=False, highlight=False, soft_wrap=True)
        n_bad = len({p.file for p in problems})
        console.print(f"[red]{len(problems)} problem(s) in {n_bad} of {n_files} file(s)[/red]")
        return 1
    console.print(f"[green]ok[/green]: {n_files} file(s), no problems")
    return 0


def cmd_compare(args) -> int:
    from fedlada.compare import DEFAULT_METHODS, run_table, write_table
    from fedlada.config import load_config

    sets, flower_sets = _split_flower_sets(args.set)
    cfg = load_config(args.config, sets)
    if flower_sets or cfg.engine != "inprocess":
        from fedlada.errors import ConfigError

        raise ConfigError("fedlada compare runs every (method, seed) in process; drop engine=flower and flower.* "
                          "keys (run single methods on Flower with fedlada run --engine flower)")
    if args.methods is not None and not args.methods.strip():
        from fedlada.errors import ConfigError

        raise ConfigError("--methods: expected comma-separated methods, found nothing (leave --methods out for the "
                          f"default {','.join(DEFAULT_METHODS)})")
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else DEFAULT_METHODS
    seeds = tuple(range(cfg.seed, cfg.seed + args.seeds))  # counted from the config's seed (0 unless set)
    console = _console()
    with _RichEvents(console) as ev:
        result = run_table(cfg, methods=methods, seeds=seeds, out=args.out, events=ev,
                           finished_only=args.finished_only)
    files = write_table(result, args.out, title=args.title or f"methods compared ({args.out})")
    sys.stdout.write(files["markdown"].read_text())  # as written: a Markdown table must not be wrapped
    sys.stdout.flush()
    console.print(f"table: {files['markdown']}, {files['csv']}, {files['plot']}")
    return 0


def cmd_report(args) -> int:
    from fedlada.config import load_config
    from fedlada.errors import FedLadaError
    from fedlada.report import print_summary, write_report
    from fedlada.runner import RunDir, check_metrics_complete, summarize_run

    rd = RunDir(args.run_dir)
    if not rd.path.exists():
        raise FedLadaError(f"{rd.path} does not exist")
    if not (rd.path / "config.toml").is_file():
        raise FedLadaError(f"{rd.path} is not a run directory (no config.toml)")
    cfg = load_config(rd.path / "config.toml")
    for name in ("metrics.jsonl", "selections.jsonl"):
        try:
            rd.read(name)
        except FedLadaError as e:  # a damaged line inside: no report from a file that may say anything
            raise FedLadaError(f"{e}: restore it from a copy, or delete that line to report the rest") from None
    if not any(r.get("event") == "eval" for r in rd.read("metrics.jsonl")):
        raise FedLadaError(f"{rd.path}: the run has no evaluation yet (metrics.jsonl holds none); nothing to report")
    try:  # a metrics.jsonl cut short: the report is still written, from what is there, but not silently
        check_metrics_complete(rd, rd.last_complete_round())
    except FedLadaError as e:
        print(f"warning: {e}; the report shows the rounds that are there", file=sys.stderr)
    out = write_report(rd.path)
    print_summary(summarize_run(rd, cfg), console=_stdout_console())
    _console().print(f"report: {out}")
    return 0


def cmd_export(args) -> int:
    from fedlada.export import export_model


    out = export_model(args.run_dir, args.model, args.out, round=args.round)
    _console().print(f"{args.model} written to {out} (a plain Hugging Face model folder; see fedlada_export.json)")
    return 0


def _folder(text: str) -> str:
    """An --out value: a folder path, not an empty string (which would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, found an empty string")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedlada", description="Federated reasoning distillation with LaDa.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run LaDa (default: the built-in benchmark with tiny models, 5 rounds)",
                       description="Run LaDa. The same command again resumes an interrupted run from its last "
                       "completed round (same config), or extends a finished one (--set rounds=N, more rounds); "
                       "another config in the same --out is refused.")
    r.add_argument("--config", help="a TOML config file (see configs/)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--out", help="run directory (same as --set out_dir=...)")
    r.add_argument("--engine", choices=["inprocess", "flower"], help="in-process runner or Flower simulation")
    r.add_argument("--fresh", action="store_true", help="only start a new run: fail, changing nothing, if --out already holds a run (not to resume or "
                        "extend it)")
    r.set_defaults(func=cmd_run, interrupted=INTERRUPTED)

    d = sub.add_parser("data", help="built-in benchmark and data validation")
    dsub = d.add_subparsers(dest="data_command", required=True)
    m = dsub.add_parser("make", help="generate the built-in benchmark",
                        description="Write the built-in benchmark's files (clients' train/test, public pool, general "
                        "corpus, manifest.json) into --out, a new or empty folder. Same seed, same bytes.")
    m.add_argument("--out", type=_folder, default="data/benchmark", help="output directory (default: data/benchmark)")
    m.add_argument("--config", help="a TOML config file (its [data] table sets the sizes)")
    m.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. data.num_clients=4")
    m.set_defaults(func=cmd_data_make, interrupted="interrupted; the same command makes the benchmark again")
    v = dsub.add_parser("validate", help="check data files; lists every problem with file and line",
                        description="Check data files (or every data file of a folder) against the data contract; "
                        "one line per problem with file, line and key. Exit 0: no problem; 1: problems found; 2: "
                        "a usage error.")
    v.add_argument("files", nargs="+", help="data files or folders (.jsonl, .json, .csv, .parquet)")
    v.add_argument("--format", default="auto", help="auto | fedlada | gsm8k | mathinstruct | cot")
    v.add_argument("--max-record-bytes", type=int, default=DEFAULT_MAX_RECORD_BYTES, metavar="N",
                   help=f"a longer record is a problem (default {DEFAULT_MAX_RECORD_BYTES}; the run's key is "
                        f"data.max_record_bytes)")
    v.set_defaults(func=cmd_data_validate, interrupted="interrupted; no file was changed")

    c = sub.add_parser("compare", help="methods x seeds on the same data and budget -> table (resumable)",
                       description="Run every method with every seed on one config (each a run folder under "
                       "--out/<method>/seed<N>, finished ones reused) and write table.md/.csv/.json/.png with the "
                       "mean and std over seeds. --out must not be a run's folder.")
    c.add_argument("--config", help="a TOML config file shared by every run of the table")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    c.add_argument("--methods", help="comma-separated; each METHOD or HOST:METHOD, e.g. "
                   "local,lada,fedmkt:host,fedmkt:host-random,fedmkt:lada (default: local,all,random,lada-sft,lada)")
    c.add_argument("--seeds", type=int, default=3,
                   help="number of seeds (the config's seed, default 0, and the N-1 after it; default 3)")
    c.add_argument("--out", type=_folder, default="runs/compare", help="table directory; each run lives below it")
    c.add_argument("--title", default="", help="the table's title (default: names --out)")
    c.add_argument("--finished-only", action="store_true",
                   help="run nothing: tabulate the runs already finished under --out (each row says over how many "
                        "seeds)")
    c.set_defaults(func=cmd_compare, interrupted="interrupted; every finished run of the table is kept and the "
                                                  "same command goes on from there")

    rep = sub.add_parser("report", help="(re)write the HTML report of a run directory",
                         description="Write report.html and plots/ of a run folder again from its metrics.jsonl, "
                         "selections.jsonl and summary, and print its summary table.")
    rep.add_argument("run_dir", help="a run folder (fedlada run --out)")
    rep.set_defaults(func=cmd_report, interrupted="interrupted; the same command writes the report again")

    ex = sub.add_parser("export", help="write a trained model of a run as a Hugging Face model folder (LoRA merged)",
                        description="Write a model of a run, as trained after a round, as a Hugging Face model "
                        "folder (weights with LoRA merged, tokenizer, fedlada_export.json), loadable with "
                        "AutoModelForCausalLM.from_pretrained. Needs the run's folder and its data files.")
    ex.add_argument("run_dir", help="a run folder (fedlada run --out)")
    ex.add_argument("--model", required=True,
                    help="llm, client<K> (e.g. client0), or slm: a FedCoLLM run's aggregated SLM")
    ex.add_argument("--out", type=_folder, required=True, help="a new or empty folder")
    ex.add_argument("--round", type=int, help="after which round (default: the last completed one)")
    ex.set_defaults(func=cmd_export, interrupted="interrupted; nothing was exported (the same command starts over)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_bars()  # before any library that reads them is imported
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _signalled.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up as Ctrl-C does
        previous = signal.signal(signal.SIGTERM, _on_sigterm), signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _main(args)
    finally:
        # called with arguments from Python (a notebook, a test): the caller gets its handlers back; as the command
        # (no arguments) ours stay, so a second Ctrl-C while the interpreter shuts down is only counted
        if previous is not None and argv is not None:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])


def _drop_unstarted_run(out: Path) -> None:
    """Remove the folder of a new run that never finished its set-up (no setup line, no completed round), as the
    in-process runner's set-up does on an interrupt."""
    import shutil

    metrics = out / "metrics.jsonl"
    started = (metrics.is_file() and metrics.stat().st_size > 0) or any(out.glob("checkpoints/round_*/COMPLETE"))
    if out.is_dir() and not started:
        shutil.rmtree(out, ignore_errors=True)


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, torch's (CUDA/MPS) OutOfMemoryError, or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower())


def _main(args) -> int:
    from fedlada.errors import FedLadaError

    interrupted = getattr(args, "interrupted", "interrupted")
    try:
        status = args.func(args)
    except KeyboardInterrupt as e:
        print(interrupted, file=sys.stderr)
        return _interrupted_status(e)
    except Exception as e:
        if _signalled:  # the interrupt surfaced as another exception (raised inside an import, say)
            print(interrupted, file=sys.stderr)
            return _interrupted_status(None)
        if isinstance(e, FedLadaError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if _out_of_memory(e) and not args.verbose:  # models or batches too big for this machine: a config matter
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"error: out of memory ({first[:300]}); use smaller models (hidden_size, num_layers, lora_r), "
                  "train.batch_size or train.max_length, or a machine with more memory; fedlada run resumes from its "
                  "last completed round (--verbose shows where it failed)", file=sys.stderr)
            return 1
        if isinstance(e, OSError) and not args.verbose:  # a path the user gave is a file, unwritable, ...
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            print(f"error: {e.strerror or e}{where}", file=sys.stderr)
            return 2
        raise
    if _signalled:  # swallowed on its way out (Python ignores an exception raised inside a finaliser)
        print(interrupted, file=sys.stderr)
        return _interrupted_status(None)
    return status


if __name__ == "__main__":
    sys.exit(main())
