"""Selection rules of your own, next to LaDa's filter and the ``all`` / ``random`` baselines.

A rule decides, for one SLM-LLM pair and direction in one round, which candidate samples the receiver trains on.
Write it as a function of :class:`Candidates` in a Python file (or an importable module), register it under a
name, and name that file in ``lada.plugins`` and the rule in ``lada.method``::

    # my_rules.py
    from fedlada.selection import register_rule

    @register_rule("gap-first")
    def gap_first(c):
        # c.scalars: "learnability_gap" (LLM -> SLM) or "novelty_gap" (SLM -> LLM), plus per-sample NLLs
        gap = c.scalars.get("learnability_gap", c.scalars.get("novelty_gap"))
        return gap  # scores: the c.cap highest are selected

    fedlada run --set 'lada.plugins=["my_rules.py"]' --set lada.method=gap-first

A rule returns either a boolean mask (N,) -- exactly those candidates are selected -- or N finite scores, of which
the ``cap`` highest are selected (``cap`` is LaDa's own cap for these candidates: ``lada.budget`` of them, at least
``lada.min_count``, so a score rule moves as much as LaDa and ``random`` do). Scores are recorded in
``selections.jsonl``. A rule sees what LaDa's filter sees (the candidates' features and gaps) and nothing of the
other side's private data. Like ``random`` and ``all``, a rule is a selection only: the distillation, its loss and
the exchange stay LaDa's; the filter is not trained under it.

Plug-ins are imported when a run starts (by every process that runs a round: under Flower, every SuperNode and the
ServerApp, so the file must be at the same path, or the module importable, on each of them). A relative ``.py``
path is taken from the working directory. Nothing here imports ``flwr``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedlada.config import _RULE_NAME as RULE_NAME_RE  # no ':' (``fedlada compare`` reads "host:method")
from fedlada.config import METHODS
from fedlada.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidates:
    """What a rule decides on: N candidates of one pair in one round.

    ``features`` (N, D) are the filter's inputs (question embedding + scalars); ``scalars`` the per-sample numbers
    also written to ``selections.jsonl`` (LLM -> SLM: learnability_gap, slm_nll, llm_nll, path_tokens, slm_pass;
    SLM -> LLM: novelty_gap, llm_nll, slm_nll, path_tokens, llm_pass); ``pair`` is "llm->client<k>" or
    "client<k>->llm"; ``cap`` LaDa's cap for N candidates; ``seed`` a seed derived from the run's seed, round and pair
    (use it for any randomness, so the run stays reproducible)."""

    ids: list[str]
    features: np.ndarray
    scalars: dict[str, np.ndarray]
    round: int
    pair: str
    cap: int
    seed: int
    rule: str = ""

    def __len__(self) -> int:
        return len(self.ids)


Rule = Callable[[Candidates], Any]
_RULES: dict[str, Rule] = {}
_ORIGINS: dict[str, str] = {}  # rule name -> the plug-in (file or module) that registered it
_LOADED: dict[str, str] = {}  # plug-in spec -> module name
_FILES: dict[str, tuple[Path, list[Path]]] = {}  # plug-in spec -> (its folder, the files under it its import loaded)
_DIGESTS: dict[str, dict[str, str]] = {}  # plug-in spec -> digests of those files when they were imported
_IMPORTING: str | None = None  # the plug-in being imported (what registers a rule)


def register_rule(name: str, fn: Rule | None = None):
    """Register ``fn`` as the selection rule ``name`` (also usable as ``@register_rule(name)``). The name is what
    ``lada.method`` and ``fedlada compare --methods`` take: lower-case letters, digits, ``_ . -``; not a built-in
    method's. Registering a name again from the same plug-in replaces its rule (a re-import); from another one is a
    ValueError."""
    if not isinstance(name, str) or not RULE_NAME_RE.fullmatch(name):
        raise ValueError(f"register_rule: {name!r} is not a rule name (lower-case letters, digits, '_', '.', '-', "
                         "starting with a letter or digit)")
    if name in METHODS:
        raise ValueError(f"register_rule: {name!r} is a built-in lada.method; pick another name")

    def add(f: Rule) -> Rule:
        if not callable(f):
            raise TypeError(f"register_rule({name!r}): expected a function of Candidates, found {type(f).__name__}")
        origin = _IMPORTING or getattr(f, "__module__", None) or repr(f)
        if name in _RULES and _ORIGINS.get(name) != origin:
            raise ValueError(f"register_rule: {name!r} is already registered by {_ORIGINS.get(name)}; two plug-ins "
                             "cannot share a rule name (rename one)")
        _RULES[name] = f
        _ORIGINS[name] = origin
        return f

    return add if fn is None else add(fn)


def registered_rules() -> tuple[str, ...]:
    return tuple(sorted(_RULES))


def _module_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return f"fedlada_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"


def _sibling_imports(path: Path) -> list[Path]:
    """The files of ``path``'s folder that ``path`` imports by top-level name (``import helper``, ``from helper import
    x``): ``helper.py`` or ``helper/__init__.py`` next to it."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []  # the import then says what is wrong
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    found = []
    for n in sorted(names):
        for cand in (path.parent / f"{n}.py", path.parent / n / "__init__.py"):
            if cand.is_file():
                found.append(cand)
                break
    return found


def _check_siblings(path: Path, spec: str, key: str) -> None:
    """Python keeps one module per name: a sibling ``helper.py`` of this plug-in would silently be another plug-in's
    (or a library's) ``helper`` already imported. Refused, naming both files."""
    for sib in _sibling_imports(path):
        name = sib.parent.name if sib.name == "__init__.py" else sib.stem
        loaded = sys.modules.get(name)
        if loaded is not None:
            where = getattr(loaded, "__file__", None)
        else:  # not imported yet: would an installed module (or the standard library's) win over the sibling?
            try:
                found = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                found = None
            if found is None:
                continue  # only the plug-in's folder has it
            where = found.origin if found.origin not in (None, "built-in", "frozen") else None
        if where is None or Path(where).resolve() != sib.resolve():
            raise ConfigError(f"config key '{key}': plug-in {spec} imports its sibling {sib}, but a module named "
                              f"{name!r} is {'already imported' if loaded is not None else 'found'} elsewhere "
                              f"({where or 'a built-in module'}); Python keeps one module per name, so rename "
                              f"{sib.name}")


def _file_digests(spec: str) -> dict[str, str]:
    """``{file relative to the plug-in's folder: 16 hex}`` of the files importing ``spec`` loaded ({} unreadable)."""
    base, files = _FILES.get(spec, (None, []))
    try:
        return {str(f.relative_to(base)): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}
    except OSError:
        return {}


def _forget(spec: str) -> None:
    """Unload plug-in ``spec`` (its modules, the files of its folder they loaded, its rules) so it can be imported
    again: a notebook that edits a rule's file between two runs gets the edited rule, as a new process would."""
    origin = str(Path(spec).expanduser().resolve()) if spec.endswith(".py") else spec
    for rule in [r for r, o in _ORIGINS.items() if o == origin]:
        _RULES.pop(rule, None)
        _ORIGINS.pop(rule, None)
    _, files = _FILES.pop(spec, (None, []))
    paths = {str(f) for f in files}
    for f in files:  # a bytecode cache written in the same second for a file of the same size looks current
        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            os.remove(importlib.util.cache_from_source(str(f)))
    importlib.invalidate_caches()
    for m, module in list(sys.modules.items()):
        f = getattr(module, "__file__", None)
        if m == _LOADED.get(spec) or (f and str(Path(f).resolve()) in paths):
            sys.modules.pop(m, None)
    _LOADED.pop(spec, None)
    _DIGESTS.pop(spec, None)


def load_plugins(specs: tuple[str, ...] | list[str], *, key: str = "lada.plugins") -> None:
    """Import each plug-in (a ``.py`` file path or a module name); each registers its rules. A plug-in already
    imported in this process is imported again when one of its files changed since (its rules as the files now
    say, as the digests a run records say), else kept. A missing file, a module that cannot be imported or that
    raises: ConfigError naming it and where it failed."""
    global _IMPORTING
    for spec in specs:
        if spec in _LOADED:
            if _file_digests(spec) == _DIGESTS.get(spec):
                continue
            logger.info("plug-in %s changed since it was imported: importing it again", spec)
            _forget(spec)
        before = set(sys.modules)
        if spec.endswith(".py"):
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"config key '{key}': plug-in file {spec} not found (from {Path.cwd()}); give a "
                                  "path to a .py file (relative to the working directory) or an importable module")
            name = _module_name(path)
            _check_siblings(path, spec, key)
            if str(path.parent) not in sys.path:  # a plug-in may import its sibling files, wherever it is run from
                sys.path.append(str(path.parent))
            try:
                _IMPORTING = str(path)
                mod_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module
                mod_spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - the user's plug-in failed to import: say where
                sys.modules.pop(name, None)
                raise ConfigError(f"config key '{key}': plug-in {spec} failed to import: "
                                  f"{type(e).__name__}: {e}{_where(e, str(path))}") from None
            finally:
                _IMPORTING = None
        else:
            try:
                _IMPORTING = spec
                importlib.import_module(spec)
            except ModuleNotFoundError as e:
                if e.name and (spec == e.name or spec.startswith(e.name + ".")):  # the plug-in itself is not there
                    raise ConfigError(f"config key '{key}': no module {e.name!r} to import for plug-in {spec!r}; "
                                      "give a path to a .py file or a module on the Python path") from None
                raise ConfigError(f"config key '{key}': plug-in {spec} failed to import: "
                                  f"{type(e).__name__}: {e}{_where(e)}") from None
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"config key '{key}': plug-in {spec} failed to import: "
                                  f"{type(e).__name__}: {e}{_where(e)}") from None
            finally:
                _IMPORTING = None
            name = spec
        _LOADED[spec] = name
        main = getattr(sys.modules.get(name), "__file__", None)
        if main:  # the plug-in's own files: those under its folder that importing it loaded
            base = Path(main).resolve().parent
            files = {Path(main).resolve()}
            for m in set(sys.modules) - before:
                f = getattr(sys.modules.get(m), "__file__", None)
                if f and Path(f).resolve().is_relative_to(base):
                    files.add(Path(f).resolve())
            _FILES[spec] = (base, sorted(files))
        _DIGESTS[spec] = _file_digests(spec)


def plugin_fingerprints(specs: tuple[str, ...] | list[str]) -> dict[str, dict[str, str | None]]:
    """``{spec: {"file": path, "sha256": 16 hex, "files": {name: 16 hex}}}``: the digests of each loaded plug-in's
    files -- its own and every module file under its folder that importing it loaded (siblings, a helper package's
    submodules) -- so a run can tell that a rule's code changed since it started (resume, a reused finished run);
    the same code at another path is the same rule."""
    out = {}
    for spec in specs:
        module = sys.modules.get(_LOADED.get(spec, ""))
        path = getattr(module, "__file__", None)
        each = _file_digests(spec)  # as the files are now (load_plugins imports a changed plug-in again)
        whole = hashlib.sha256(json.dumps(each, sort_keys=True).encode()).hexdigest()[:16] if each else None
        out[spec] = {"file": path, "sha256": whole, "files": each}
    return out


def _where(e: BaseException, path: str | None = None) -> str:
    """" (at file:line)" of the deepest frame of ``e`` in the user's code (``path``, or outside fedlada)."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if (f.filename == path if path else "/fedlada/" not in f.filename.replace("\\", "/"))]
    return f" (at {mine[-1].filename}:{mine[-1].lineno})" if mine else ""


def check_method(method: str, plugins: tuple[str, ...] | list[str], *, key: str = "lada.method") -> None:
    """Load ``plugins`` and make sure ``method`` is built in or registered by them (ConfigError otherwise)."""
    load_plugins(plugins)
    if method in METHODS or method in _RULES:
        return
    known = ", ".join(_RULES) or "none"
    where = key if key.startswith("--") else f"config key '{key}'"
    raise ConfigError(f"{where}: {method!r} is neither a built-in method {METHODS} nor a rule "
                      f"registered by lada.plugins {list(plugins)} (registered: {known})")


def is_custom(method: str) -> bool:
    return method not in METHODS


def apply_rule(cand: Candidates):
    """Run the registered rule ``cand.rule`` and return its decision as a :class:`~fedlada.filter.Selection` (reasons
    "<rule> selected" / "<rule> not selected" for a mask; "<rule> selected: top K by score" / "<rule> over cap: ..."
    for scores). A wrong return value, or an exception in the
    rule: ConfigError naming the rule, the pair and the round."""
    from fedlada.filter import Selection

    name, n = cand.rule, len(cand)
    if name not in _RULES:
        raise ConfigError(f"lada.method {name!r}: no such rule registered (registered: {', '.join(_RULES) or 'none'})")
    where = f"selection rule {name!r} (round {cand.round}, pair {cand.pair})"
    ids = list(cand.ids)  # what is recorded: the rule may change its copy
    try:
        out = _RULES[name](cand)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a bug in the user's rule: name it and where, stop the run
        raise ConfigError(f"{where} raised {type(e).__name__}: {e}{_where(e)}") from None
    try:
        arr = np.asarray(out)
    except Exception:  # noqa: BLE001
        arr = np.asarray(None, dtype=object)
    none = np.full(n, np.nan)
    origin = f" (registered by {_ORIGINS.get(name)})"
    if arr.shape != (n,):
        raise ConfigError(f"{where}{origin} returned {type(out).__name__} of shape {arr.shape}; expected a boolean "
                          f"mask or scores, one per candidate in cand.ids order: shape ({n},)")
    if arr.dtype == bool:
        sel = arr.copy()
        return Selection(ids, sel, none, none.copy(), none.copy(),
                         [f"{name} selected" if s else f"{name} not selected" for s in sel], round=cand.round)
    if arr.dtype.kind not in "iuf":
        raise ConfigError(f"{where}{origin} returned values of type {arr.dtype}; expected a boolean mask or numeric "
                          f"scores, one per candidate in cand.ids order (not the selected ids)")
    scores = arr.astype(np.float64)
    if n and not np.all(np.isfinite(scores)):
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(scores))[:3]]
        raise ConfigError(f"{where}{origin} returned a non-finite score for {', '.join(bad)}; expected finite numbers")
    order = sorted(range(n), key=lambda i: (-scores[i], i))  # ties: candidate order, deterministic
    keep = set(order[: min(cand.cap, n)])
    sel = np.array([i in keep for i in range(n)], bool)
    return Selection(ids, sel, scores, none.copy(), none.copy(),
                     [f"{name} selected: top {cand.cap} by score" if s else f"{name} over cap: not in the top {cand.cap}"
                      for s in sel],
                     round=cand.round)


__all__ = ["Candidates", "RULE_NAME_RE", "apply_rule", "check_method", "is_custom", "load_plugins",
           "plugin_fingerprints", "register_rule", "registered_rules"]
