"""Everything a run needs before round 1: its data and its models, with a cache for the slow parts.

Data: the built-in benchmark (generated once per parameter set into the cache) or the user's files named in the
config. Every file is validated before any work starts; all problems of all files are reported together.

Models: a ``ModelSpec`` names a Hugging Face id, a local directory, a ``.gguf`` file, or ``"tiny"``. Tiny models
are built from a Llama config and pretrained on what the *server* may see -- the general corpus if one is given,
else the public pool -- never on a client's private files. The tokenizer shared by tiny models is trained on the
same server-side text. Pretrained tiny models are cached under ``models.cache_dir``, else ``$FEDLADA_CACHE``, else
``$XDG_CACHE_HOME/fedlada`` (``~/.cache/fedlada`` without it), keyed by everything that determines their weights, so
a second run skips pretraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from fedlada import reasoning
from fedlada.config import ModelSpec, RunConfig
from fedlada.data import Record, make_benchmark, read_records, validate_files
from fedlada.data.benchmark import warn_shared_domains
from fedlada.errors import ConfigError, DataError, FedLadaError, ModelError, is_write_failure

log = logging.getLogger(__name__)


@contextmanager
def quiet_data_warnings():
    """Data read again after a run said its warnings (overlaps, small test splits): errors only, meanwhile."""
    quiet = [logging.getLogger(name) for name in ("fedlada.prepare", "fedlada.data")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)

PREPARE_VERSION = 1  # bump when pretraining or tokenizer training changes: invalidates cached models


@dataclass
class ClientFiles:
    train: list[Record]
    test: list[Record]


@dataclass
class FederatedData:
    clients: list[ClientFiles]
    public: list[Record]
    general: list[Record]
    source: dict  # where it came from (paths, benchmark manifest)


def data_source(cfg: RunConfig, data: FederatedData, client: int | None = None, split: str = "train") -> str:
    """Where a run's records come from, for messages: the config key and its file (``client=None``: the public
    pool), or the file of the built-in benchmark."""
    if cfg.data.builtin:
        rel = "public.jsonl" if client is None else f"client_{client}/{split}.jsonl"
        return f"the built-in benchmark's {Path(data.source.get('benchmark', '')) / rel}"
    if client is None:
        return f"data.public ({cfg.data.public})"
    return f"data.clients.{client}.{split} ({getattr(cfg.data.clients[client], split)})"


def eval_split(test: list[Record], cfg: RunConfig) -> list[Record]:
    """The test records evaluated each round: the first ``data.eval_limit`` of a client's test split (0: all)."""
    return test[: cfg.data.eval_limit] if cfg.data.eval_limit else test


def cache_root(cfg: RunConfig) -> Path:
    """models.cache_dir, else $FEDLADA_CACHE, else $XDG_CACHE_HOME/fedlada (~/.cache/fedlada); ConfigError where
    that path is a file."""
    if cfg.models.cache_dir:
        root, named = Path(cfg.models.cache_dir).expanduser(), "models.cache_dir"
    elif os.environ.get("FEDLADA_CACHE"):
        root, named = Path(os.environ["FEDLADA_CACHE"]).expanduser(), "$FEDLADA_CACHE"
    else:
        root, named = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedlada", "the default cache"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"the cache {root} ({named}) is a file, not a folder; point $FEDLADA_CACHE or "
                          "models.cache_dir at a folder")
    return root


@contextmanager
def _writing_cache(root: Path, tmp: Path | None = None):
    """An OSError while filling the cache (or a writer's own error for one, e.g. safetensors' "No space left on
    device") names the cache and how to choose another one; the entry's temporary folder ``tmp`` goes, whatever
    stopped the writing (an interrupt too). Temporary folders that processes no longer running left behind (a kill)
    are removed first."""
    _sweep_stale(root)
    try:
        yield
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(e):
            raise ConfigError(f"cannot write the cache {root}: {getattr(e, 'strerror', None) or e}"
                              f"{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}; make it writable "
                              "(or free space), or point $FEDLADA_CACHE or models.cache_dir at a writable folder"
                              ) from None
        raise


_TMP_RE = re.compile(r"\.tmp(\d+)$")


STALE_AFTER_S = 6 * 3600  # a temporary cache folder untouched this long, by a process not running here, is stale


def _sweep_stale(root: Path) -> None:
    """Remove ``<entry>.tmp<pid>`` folders under the cache left by a process killed while writing: its pid is not
    running here and the folder was last changed hours ago (a process in another container or on another host
    sharing the cache has a pid this one cannot see, and writes its entry within minutes)."""
    now = time.time()
    for sub in (root / "models", root / "tokenizers", root / "data"):
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            m = _TMP_RE.search(p.name)
            try:
                old = now - p.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
            if m and old and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)


def _drop_incomplete(path: Path, what: str) -> None:
    """A cache entry that lacks what marks it complete (a file deleted by hand, a partial copy) is removed before
    it is built again; otherwise the new copy would lose to it when published."""
    if path.exists():
        log.warning("the cache entry %s (%s) is incomplete; it is built again", path, what)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


_digest_memo: dict | None = None  # set inside ``same_data``


@contextmanager
def same_data():
    """Within this block, the digest of one records list is computed once (a set-up prepares a model per client,
    each keyed by the server corpus' digest). The lists must not change meanwhile; the memo holds them."""
    global _digest_memo
    outer = _digest_memo
    _digest_memo = {} if outer is None else outer
    try:
        yield
    finally:
        _digest_memo = outer


def _records_digest(records: list[Record]) -> str:
    if _digest_memo is not None:
        hit = _digest_memo.get(id(records))
        if hit is not None and hit[0] is records:
            return hit[1]
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.to_json(), sort_keys=True).encode())
    digest = h.hexdigest()[:16]
    if _digest_memo is not None:
        _digest_memo[id(records)] = (records, digest)
    return digest


def client_digest(files: "ClientFiles") -> str:
    """A fingerprint of one client's train and test records (what its node reads), for resuming on Flower."""
    return _digest([_records_digest(files.train), _records_digest(files.test)])


def public_digest(public: list[Record]) -> str:
    """A fingerprint of the public pool's records: on Flower every node reads its own copy, and the server's
    question ids mean something on a client only if both read the same records."""
    return _records_digest(public)


def data_digest(data: "FederatedData") -> str:
    """A fingerprint of every record a run uses (clients' splits, public pool, general corpus), in order."""
    parts = [_records_digest(data.public), _records_digest(data.general)]
    parts += [_records_digest(c.train) + _records_digest(c.test) for c in data.clients]
    return _digest(parts)


# ------------------------------------------------------------------------------------------------------ data


def benchmark_kwargs(cfg: RunConfig) -> dict:
    d = cfg.data
    return dict(seed=d.seed, num_clients=d.num_clients, train_per_client=d.train_per_client,
                test_per_client=d.test_per_client, public_size=d.public_size, general_size=d.general_size,
                max_steps=d.max_steps, max_value=d.max_value)


def _benchmark_damage(out: Path) -> str | None:
    """What differs between a cached benchmark's files and its manifest (their sha256), or None (intact or absent)."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        for rel, entry in sorted(entries.items()):
            f = out / rel
            if not f.is_file():
                return f"{rel} is missing"
            if hashlib.sha256(f.read_bytes()).hexdigest() != entry["sha256"]:
                return f"{rel} differs from its manifest"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"manifest.json unreadable: {type(e).__name__}"
    return None


def load_data(cfg: RunConfig) -> FederatedData:
    """The run's data: user files (validated up front) or the cached built-in benchmark."""
    d = cfg.data
    if d.builtin:
        kw = benchmark_kwargs(cfg)
        out = cache_root(cfg) / "data" / f"benchmark-{_digest(kw)}"
        damaged = _benchmark_damage(out)
        if damaged:  # generated data: make it again rather than run on a changed copy
            log.warning("the cached built-in benchmark in %s was changed or damaged (%s); it is generated again",
                        out, damaged)
            shutil.rmtree(out, ignore_errors=True)
        if not (out / "manifest.json").is_file():
            _drop_incomplete(out, "the built-in benchmark")
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            with _writing_cache(cache_root(cfg), tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                make_benchmark(tmp, **kw)
                _publish(tmp, out)
        else:  # (make_benchmark says it when it generates the files)
            warn_shared_domains(d.num_clients)
        clients = [ClientFiles(read_records(out / f"client_{k}" / "train.jsonl"),
                               read_records(out / f"client_{k}" / "test.jsonl")) for k in range(d.num_clients)]
        general = read_records(out / "general.jsonl") if d.general_size else []
        return FederatedData(clients, read_records(out / "public.jsonl"), general, {"benchmark": str(out), **kw})
    unused = d.unused_builtin_keys()
    if unused:
        log.warning("%s: these keys shape the built-in benchmark, which is not made when data.clients names your "
                    "files; they are ignored (the run has %d client(s))", ", ".join(unused), len(d.clients))
    files = {f"data.clients.{k}.{split}": (getattr(c, split), c.format)
             for k, c in enumerate(d.clients) for split in ("train", "test")}
    return _user_data(cfg, files, what="the run's data files")


def _user_data(cfg: RunConfig, files: dict[str, tuple[str, str]], *, what: str) -> FederatedData:
    """The run's data from the client files in ``files`` (``{config key: (path, format)}``; a client split not
    named there is empty) plus the public pool and general corpus, validated and read together."""
    d = cfg.data
    files = {**files, "data.public": (d.public, d.public_format)}
    if d.general:
        files["data.general"] = (d.general, d.general_format)
    for key, (path, _fmt) in files.items():
        if Path(path).is_dir():
            raise ConfigError(f"config key '{key}': expected a data file, found the directory {path!r}")
    check_server_files_are_not_private(files)
    got = read_data_files(files, max_record_bytes=d.max_record_bytes, what=what)
    clients = [ClientFiles(got.get(f"data.clients.{k}.train", []), got.get(f"data.clients.{k}.test", []))
               for k in range(len(d.clients))]
    warn_test_overlap(clients, got["data.public"], got.get("data.general", []))
    warn_small_tests(cfg, clients)
    warn_choice_names(got)
    return FederatedData(clients, got["data.public"], got.get("data.general", []),
                         {"clients": [asdict(c) for c in d.clients], "public": d.public, "general": d.general})


def load_server_data(cfg: RunConfig) -> FederatedData:
    """What the server of a federated deployment reads: the public pool, the general corpus and, for the LLM's
    evaluation on the clients' domains, each client's test file where it is on this machine (a warning names the
    clients it is not evaluated on). Never a client's train file: every ``ClientFiles.train`` is empty. The built-in
    benchmark is generated from its seed, as on every node."""
    d = cfg.data
    if d.builtin:
        return load_data(cfg)
    files = {f"data.clients.{k}.test": (c.test, c.format) for k, c in enumerate(d.clients) if Path(c.test).is_file()}
    missing = [f"client {k} ({c.test})" for k, c in enumerate(d.clients) if f"data.clients.{k}.test" not in files]
    data = _user_data(cfg, files, what="the server's data files")
    if missing:
        log.warning("the LLM is not evaluated on the domain of %s: the test file is not on this machine",
                    ", ".join(missing))
    return data


_CHOICE_NAME_RE = re.compile(r"[A-Z][.:][ \t]+\S")  # "B. Paris", "B: Paris": graded as a name, not choice B


def warn_choice_names(files: dict[str, list[Record]]) -> list[str]:
    """Warn (and return the warnings) for each file most of whose gold answers read like a multiple-choice letter
    with its option after a full stop or colon (``B. Paris``): grading takes such a gold answer as a name (as in
    ``C. elegans``), so a prediction ``B`` or ``(B)`` is wrong."""
    out = []
    for key, records in files.items():
        like = [r for r in records if _CHOICE_NAME_RE.match(r.answer.strip())]
        if len(like) >= 3 and 2 * len(like) >= len(records):
            out.append(f"{key}: {len(like)} of {len(records)} gold answers look like a choice with its option "
                       f"({like[0].answer.strip()!r}, record {like[0].id!r}), but are graded as names (like "
                       "'C. elegans'): a prediction naming the letter alone is wrong; for multiple-choice answers "
                       "write 'B' or '(B) Paris'")
    for line in out:
        log.warning(line)
    return out


SMALL_TEST = 20  # fewer evaluated test questions than this: a client's accuracy is warned to be coarse


def warn_small_tests(cfg: RunConfig, clients: list[ClientFiles]) -> list[str]:
    """Warn (and return the warnings) for each client evaluated on fewer than ``SMALL_TEST`` questions: its accuracy
    moves in coarse steps, yet it counts as much as any other client's in the mean SLM accuracy."""
    out = []
    for k, c in enumerate(clients):
        n = len(eval_split(c.test, cfg))
        if 0 < n < SMALL_TEST:
            out.append(f"data.clients.{k}.test: client {k} is evaluated on {n} question(s) only: its accuracy moves "
                       f"in steps of {100 / n:.0f} points, and it counts as much as every other client's in the mean "
                       "SLM accuracy")
    for line in out:
        log.warning(line)
    return out


SAID_PER_CLIENT = 6  # per-client data warnings said one by one before they are summed up in one line


def check_server_files_are_not_private(files: dict[str, tuple[str, str]]) -> None:
    """The public pool and the general corpus are the server's: one that is a client's train or test file (the same
    file, by any path) would make that client's private records public, or pretrain on its test set. Refused."""
    clients = {key: Path(path) for key, (path, _fmt) in files.items() if key.startswith("data.clients.")}
    for key in ("data.public", "data.general"):
        if key not in files:
            continue
        mine = Path(files[key][0])
        for other, path in clients.items():
            try:
                same = mine.exists() and path.exists() and os.path.samefile(mine, path)
            except OSError:
                same = False
            if same:
                raise ConfigError(f"config key '{key}': {files[key][0]} is the file of {other}, a client's private "
                                  "data; the public pool and the general corpus are the server's and must be other "
                                  "files")


def warn_test_overlap(clients: list[ClientFiles], public: list[Record], general: list[Record] = ()) -> list[str]:
    """Warn (and return the warnings) when a client's test questions also appear in its train split, the public
    pool or the general corpus: the accuracy on those is then not a held-out measurement. Questions match after
    whitespace and case folding."""
    def key(r: Record) -> str:
        return " ".join(r.question.split()).casefold()

    pool = {key(r) for r in public}
    corpus = {key(r) for r in general}
    out = []
    for k, c in enumerate(clients):
        for name, other in (("its train split", {key(r) for r in c.train}), ("the public pool", pool),
                            ("the general corpus (data.general)", corpus)):
            n = sum(key(r) in other for r in c.test)
            if n:
                out.append(f"data.clients.{k}.test: {n} of its {len(c.test)} records ask a question that is also in "
                           f"{name}; their accuracy is not held out")
    for line in out[:SAID_PER_CLIENT]:
        log.warning(line)
    if len(out) > SAID_PER_CLIENT:  # a federation of many clients: the first few, then one line for the rest
        rest = out[SAID_PER_CLIENT:]
        log.warning("... and %d more such warning(s), for %s", len(rest),
                    ", ".join(dict.fromkeys(line.split(":", 1)[0] for line in rest)))
    return out


def read_data_files(files: dict[str, tuple[str, str]], *, max_record_bytes: int, what: str) -> dict[str, list[Record]]:
    """Validate every ``{key: (path, format)}`` file first (a DataError listing every problem of all of them, named
    ``what``), then read them: ``{key: records}``. Nothing is read from a set of files that has a problem."""
    problems = [p for path, fmt in files.values()
                for p in validate_files([path], format=fmt, max_record_bytes=max_record_bytes)]
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {what}", problems)
    return {key: read_records(path, format=fmt, max_record_bytes=max_record_bytes)
            for key, (path, fmt) in files.items()}


def split_holdout(train: list[Record], *, size: int, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded held-out slice of a client's train split (for its reward), at most a fifth of it."""
    if size < 1:
        raise ValueError(f"split_holdout: size must be >= 1, got {size!r}")
    idx = list(range(len(train)))
    random.Random(seed).shuffle(idx)
    n = min(size, max(1, len(train) // 5)) if len(train) >= 2 else 0  # a lone record is trained on, not held out
    hold = set(idx[:n])
    return [r for i, r in enumerate(train) if i not in hold], [train[i] for i in sorted(hold)]


# ---------------------------------------------------------------------------------------------------- models


def server_corpus(data: FederatedData) -> list[Record]:
    """Text the server may see for tokenizer training and tiny-model pretraining."""
    return data.general if data.general else data.public


def _corpus_texts(records: list[Record]) -> list[str]:
    return [reasoning.format_prompt(r.question) + reasoning.format_path(r.rationale, r.answer) for r in records]


def prepare_tokenizer(cfg: RunConfig, data: FederatedData, *, vocab_size: int, salt: str = "shared"):
    from fedlada.models import train_tokenizer

    corpus = server_corpus(data)
    key = _digest({"v": PREPARE_VERSION, "corpus": _records_digest(corpus), "public": _records_digest(data.public),
                   "vocab": vocab_size, "salt": salt})
    path = cache_root(cfg) / "tokenizers" / key
    if (path / "tokenizer.json").is_file():
        return _cached_tokenizer(path), key
    texts = _corpus_texts(corpus) + [reasoning.format_prompt(r.question) for r in data.public]
    if salt != "shared":  # a different tokenizer: trained on a different sample of the same text
        rng = random.Random(salt)
        texts = rng.sample(texts, len(texts) // 2)
    _drop_incomplete(path, "a tokenizer")
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with _writing_cache(cache_root(cfg), tmp):
        tok.save_pretrained(tmp)
        _publish(tmp, path)
    return _cached_tokenizer(path), key


def _cached_tokenizer(path: Path):
    """A cached tokenizer; a damaged entry is named with the way out."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"the cached tokenizer {path} cannot be read ({type(e).__name__}: {e}); delete that folder "
                         f"and it is trained again") from None


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place; another process that published the same entry first wins (both
    made the same thing), and this one's copy is dropped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        try:
            tmp.replace(final)
            return
        except OSError:
            if not final.exists():  # a real failure, not the other process's entry appearing in between
                raise
    shutil.rmtree(tmp, ignore_errors=True)


def _compute_key(spec: ModelSpec) -> list:
    """What besides the recipe changes pretrained weights: the device type and, on a CPU, the thread count (float
    sums are split differently across threads, so 1 and 2 threads train bit-different models)."""
    import torch

    from fedlada.models import resolve_device

    device = resolve_device(spec.device).type
    return [device, torch.get_num_threads() if device == "cpu" else 0]


_said: set[str] = set()


def _fitting(corpus: list[Record], formatter, tokenizer, max_length: int) -> list[Record]:
    """The records whose prompt leaves room for a path within ``max_length`` tokens (a warning counts the rest)."""
    from fedlada.rounds import Side, prompt_lengths

    lengths = prompt_lengths(Side(None, tokenizer, formatter), corpus)
    kept = [r for r, n in zip(corpus, lengths) if n < max_length]
    if len(kept) < len(corpus):
        message = (f"pretraining leaves out {len(corpus) - len(kept)} of {len(corpus)} corpus record(s) whose "
                   f"question is too long for train.max_length={max_length} (e.g. "
                   f"{next(r.id for r, n in zip(corpus, lengths) if n >= max_length)!r})")
        if message not in _said:  # models sharing a tokenizer leave out the same records: say it once
            _said.add(message)
            log.warning("%s", message)
    return kept


def _pretrain_examples(formatter, corpus: list[Record], tokenizer, *, tokens: int, seed: int):
    from fedlada.train import SFTExample

    recs = list(corpus)
    random.Random(seed).shuffle(recs)
    ex = [SFTExample(formatter(r.question), reasoning.format_path(r.rationale, r.answer)) for r in recs]
    sample = ex[:200]
    per = sum(len(tokenizer(e.prompt + e.path, add_special_tokens=False)["input_ids"]) + 1 for e in sample)
    per = max(per / max(len(sample), 1), 1.0)
    n = int(tokens / per)
    epochs = max(1, math.ceil(n / max(len(ex), 1)))
    return ex[: min(n, len(ex))] if epochs == 1 else ex, epochs


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight file of a saved model, by file name."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.suffix in WEIGHT_SUFFIXES}


def _check_cached_weights(path: Path, stored: dict, role: str) -> None:
    """A cache entry records its weight files' sha256 when it is made: bytes changed since then (a damaged disk, a
    partial copy) are named instead of loaded. Entries made before the record existed are not checked."""
    expected = stored.get("weights_sha256")
    if not isinstance(expected, dict):
        return
    found = _weight_hashes(path)
    for name, digest in expected.items():
        if found.get(name) != digest:
            state = "is missing" if name not in found else "differs from the checksum recorded when it was made"
            raise ModelError(f"the cached tiny model '{role}': {path / name} {state}: the cache entry is damaged; "
                             f"delete {path} and it is built again")


def _check_cached_shape(config: dict, spec: ModelSpec, path: Path, role: str) -> None:
    """A cache entry is keyed by its shape, so a model of another shape there was changed by hand or damaged.
    ``config``: the entry's config.json, read before the weights (whose loader would name only a symptom)."""
    found = (config.get("hidden_size"), config.get("num_hidden_layers"), config.get("num_attention_heads"))
    wanted = (spec.hidden_size, spec.num_layers, spec.num_heads)
    if found != wanted:
        raise ModelError(f"the cached tiny model '{role}' in {path} has hidden_size, num_layers, num_heads = {found}, "
                         f"but its spec asks for {wanted}: the cache entry was changed or damaged; delete {path} and "
                         "it is built again")


def prepare_model(spec: ModelSpec, *, role: str, cfg: RunConfig, data: FederatedData,
                  progress: Callable[[int, int], None] | None = None):
    """Return ``(model, tokenizer, info)`` for ``spec`` (built+pretrained+cached if tiny, else loaded)."""
    from fedlada.models import (apply_lora, build_tiny_model, count_parameters, load_model, resolve_device,
                                save_model, weights_fingerprint)

    info: dict = {"role": role, "source": spec.source}
    if spec.is_tiny:
        salt = "shared" if spec.tokenizer == "shared" else f"own-{role}"
        tok, tok_key = prepare_tokenizer(cfg, data, vocab_size=spec.tokenizer_vocab, salt=salt)
        corpus = server_corpus(data)
        mc = cfg.models
        key = _digest({"v": PREPARE_VERSION, "tok": tok_key, "corpus": _records_digest(corpus),
                       "shape": [spec.hidden_size, spec.num_layers, spec.num_heads], "tokens": spec.pretrain_tokens,
                       "lr": mc.pretrain_lr, "bs": mc.pretrain_batch_size, "seed": mc.pretrain_seed,
                       "sched": [mc.pretrain_schedule, mc.pretrain_warmup, mc.pretrain_bf16],
                       "len": cfg.train.max_length, "compute": _compute_key(spec)})
        path = cache_root(cfg) / "models" / key
        info["cache"] = str(path)
        if (path / "config.json").is_file():
            stored_file = path / "fedlada_pretrain.json"
            try:
                stored = json.loads(stored_file.read_text()) if stored_file.is_file() else {}
            except (OSError, ValueError) as e:
                raise ModelError(f"the cached tiny model '{role}': {stored_file} is unreadable ({e}): the cache entry "
                                 f"is damaged; delete {path} and it is built again") from None
            _check_cached_weights(path, stored if isinstance(stored, dict) else {}, role)
            try:
                conf = json.loads((path / "config.json").read_text())
            except (OSError, ValueError) as e:
                raise ModelError(f"the cached tiny model '{role}': {path / 'config.json'} is unreadable ({e}): the "
                                 f"cache entry is damaged; delete {path} and it is built again") from None
            _check_cached_shape(conf if isinstance(conf, dict) else {}, spec, path, role)
            try:
                model, tok = load_model(path, dtype=spec.dtype, device=spec.device)
            except ModelError as e:
                raise ModelError(f"{e}; {path} is a cache entry of the tiny model '{role}': delete it and it is built "
                                 "again") from None
            if isinstance(stored, dict):
                # the stored record says how the weights were made; where they are now is this cache (a copied or
                # moved cache keeps its records)
                info.update({k: v for k, v in stored.items() if k not in ("role", "cache", "weights_sha256")})
            info["cached"] = True
        else:
            from fedlada.models import PromptFormatter
            from fedlada.rounds import Side, check_prompts_fit
            from fedlada.train import train

            _drop_incomplete(path, f"the tiny model '{role}'")

            fmt = PromptFormatter(tok, use_chat_template="off")
            # a public question too long for train.max_length stops the run anyway: say which before pretraining;
            # a general-corpus record that long is only left out of pretraining
            check_prompts_fit(Side(None, tok, fmt), {data_source(cfg, data): data.public},
                              max_length=cfg.train.max_length, who=f"the tiny model '{role}'")
            if corpus is not data.public:  # the public pool was just checked
                corpus = _fitting(corpus, fmt, tok, cfg.train.max_length)
            model = build_tiny_model(tok, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                                     num_heads=spec.num_heads, max_position_embeddings=max(512, cfg.train.max_length),
                                     seed=mc.pretrain_seed)
            model.to(resolve_device(spec.device))
            ex, epochs = _pretrain_examples(fmt, corpus, tok, tokens=spec.pretrain_tokens, seed=mc.pretrain_seed)
            if ex and spec.pretrain_tokens > 0:
                stats = train(model, tok, sft=ex, lr=mc.pretrain_lr, epochs=epochs,
                              batch_size=mc.pretrain_batch_size, max_length=cfg.train.max_length,
                              seed=mc.pretrain_seed, bf16=mc.pretrain_bf16, lr_schedule=mc.pretrain_schedule,
                              warmup=mc.pretrain_warmup, progress=progress)
                info.update(pretrain_tokens=stats.tokens, pretrain_seconds=round(stats.seconds, 1),
                            pretrain_loss=stats.loss)
                (path.parent).mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            with _writing_cache(cache_root(cfg), tmp):
                path.parent.mkdir(parents=True, exist_ok=True)
                save_model(model, tok, tmp)
                (tmp / "fedlada_pretrain.json").write_text(json.dumps({**info, "weights_sha256": _weight_hashes(tmp)},
                                                                      indent=1))
                _publish(tmp, path)
            model, tok = load_model(path, dtype=spec.dtype, device=spec.device)
            info["cached"] = False
    else:
        model, tok = load_model(spec.source, dtype=spec.dtype, device=spec.device, gguf_file=spec.gguf_file or None)
    info["weights_fingerprint"] = weights_fingerprint(model)  # the base weights, checked when a run resumes
    try:  # the BOS text plain prompts start with (models.PromptFormatter), checked when a run resumes
        from fedlada.models import PromptFormatter

        info["prompt_bos"] = PromptFormatter(tok, use_chat_template=spec.chat_template).bos
    except FedLadaError:  # a chat template asked for and missing: said where the prompts are made
        pass
    if spec.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if spec.lora:  # adapter init is seeded: same run, same numbers
        try:
            model = apply_lora(model, r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout,
                               target_modules=spec.lora_target_modules or None,
                               seed=cfg.models.pretrain_seed + sum(role.encode()))
        except ModelError as e:
            key = "models.llm" if role == "llm" else f"models.slms.{role.removeprefix('slm')}"
            raise ModelError(f"config key '{key}.lora_r': {e}") from None
    info["parameters"] = count_parameters(model)
    info["trainable_parameters"] = count_parameters(model, trainable_only=True)
    return model, tok, info
