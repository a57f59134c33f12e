"""Selection rules of your own (fedlada.selection): registration, loading plug-ins, the decision's shape and
errors, and a whole run under a plug-in rule."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest

from fedlada import selection
from fedlada.config import load_config
from fedlada.errors import ConfigError
from fedlada.selection import Candidates, apply_rule, check_method, load_plugins, register_rule

RULES = """
from fedlada.selection import register_rule

@register_rule("gap-first")
def gap_first(c):
    return c.scalars.get("learnability_gap", c.scalars.get("novelty_gap"))

@register_rule("first-half")
def first_half(c):
    return [i < len(c) // 2 for i in range(len(c))]
"""


@pytest.fixture
def rules_file(tmp_path, monkeypatch):
    path = tmp_path / "my_rules.py"
    path.write_text(RULES)
    monkeypatch.chdir(tmp_path)  # relative plug-in paths are taken from the working directory
    yield path
    for name in ("gap-first", "first-half"):
        selection._RULES.pop(name, None)
    selection._LOADED.clear()


def _cand(rule, n=6, cap=2, **scalars):
    ids = [f"q{i}" for i in range(n)]
    return Candidates(ids, np.zeros((n, 3)), {k: np.asarray(v, float) for k, v in scalars.items()}, round=1,
                      pair="llm->client0", cap=cap, seed=0, rule=rule)


def test_score_rules_keep_the_cap_highest_and_masks_exactly_their_picks():
    try:
        register_rule("by-gap", lambda c: c.scalars["learnability_gap"])
        register_rule("mask", lambda c: np.array([True, False, True, False, False, False]))
        sel = apply_rule(_cand("by-gap", learnability_gap=[0.1, 0.9, 0.5, 0.9, -1.0, 0.0]))
        assert sel.selected_ids == ["q1", "q3"]  # ties kept in candidate order
        assert sel.scores.tolist() == [0.1, 0.9, 0.5, 0.9, -1.0, 0.0]
        assert sel.reasons[1] == "by-gap selected: top 2 by score"
        assert sel.reasons[0] == "by-gap over cap: not in the top 2"
        assert np.isnan(sel.exploit).all() and sel.round == 1
        sel = apply_rule(_cand("mask", cap=1))  # a mask is taken as given, whatever the cap
        assert sel.selected_ids == ["q0", "q2"] and np.isnan(sel.scores).all()
        assert sel.reasons[:2] == ["mask selected", "mask not selected"]
        assert apply_rule(_cand("by-gap", n=0, learnability_gap=[])).selected_ids == []
    finally:
        selection._RULES.pop("by-gap", None)
        selection._RULES.pop("mask", None)


@pytest.mark.parametrize("out, match", [
    ([1.0, 2.0], r"shape \(2,\); expected .* shape \(6,\)"),
    ([float("nan")] * 6, "non-finite score for q0"),
    (["a"] * 6, r"expected a boolean mask or numeric scores, one per candidate in cand.ids order \(not the selected"),
    (None, "shape \\(\\)"),
])
def test_a_rule_returning_the_wrong_thing_is_named(out, match):
    try:
        register_rule("bad", lambda c: out)
        with pytest.raises(ConfigError, match=r"selection rule 'bad' \(round 1, pair llm->client0\) \(registered by "
                                              r"tests?[._]\w+\).*" + match):
            apply_rule(_cand("bad"))
    finally:
        selection._RULES.pop("bad", None)


def test_a_rule_that_raises_is_named_with_where_it_failed(tmp_path, monkeypatch):
    path = tmp_path / "broken_rules.py"
    path.write_text("from fedlada.selection import register_rule\n\n@register_rule('oops')\ndef oops(c):\n"
                    "    return c.scalars['no_such_gap']\n")
    monkeypatch.chdir(tmp_path)
    try:
        load_plugins(["broken_rules.py"])
        with pytest.raises(ConfigError, match=r"'oops' .* raised KeyError: 'no_such_gap' \(at .*broken_rules.py:5\)"):
            apply_rule(_cand("oops"))
    finally:
        selection._RULES.pop("oops", None)
        selection._LOADED.clear()


def test_a_rule_cannot_change_what_is_recorded_and_systemexit_is_named():
    from fedlada import rounds
    from fedlada.filter import LearnabilityFilter

    def vandal(c):
        c.scalars["learnability_gap"][:] = 123.0
        c.features[:] = 0.0
        c.ids[:] = ["bogus"] * len(c.ids)
        return c.scalars["learnability_gap"]

    try:
        register_rule("vandal", vandal)
        register_rule("quits", lambda c: exec("raise SystemExit(3)"))
        feats, gap = np.ones((4, 2)), np.array([0.1, 0.2, 0.3, 0.4])
        flt = LearnabilityFilter(2, min_count=1)
        sel = rounds._select("vandal", flt, ["a", "b", "c", "d"], feats, round=1, budget=0.5, seed=0,
                             scalars={"learnability_gap": gap}, pair="llm->client0")
        assert sel.ids == ["a", "b", "c", "d"]  # recorded: the real ids
        assert gap.tolist() == [0.1, 0.2, 0.3, 0.4] and feats.min() == 1.0  # the caller's arrays, untouched
        with pytest.raises(ConfigError, match="'quits' .* raised SystemExit: 3"):
            apply_rule(_cand("quits"))
    finally:
        selection._RULES.pop("vandal", None)
        selection._RULES.pop("quits", None)


def test_a_plugin_edited_in_a_running_process_is_imported_again(tmp_path, monkeypatch):
    """A notebook edits a rule's file (or a sibling it imports) between two runs: the second run gets the edited
    rule, and the digests recorded for it are of the code that ran; a rule the edit removed is gone."""
    path, helper = tmp_path / "nb_rules.py", tmp_path / "nb_helper.py"
    helper.write_text("SIGN = 1.0\n")
    code = ("from fedlada.selection import register_rule\nfrom nb_helper import SIGN\n\n"
            "@register_rule('nb-rule')\ndef nb(c):\n    return SIGN * c.scalars['learnability_gap']\n")
    path.write_text(code + "\n@register_rule('nb-extra')\ndef extra(c):\n    return c.scalars['learnability_gap']\n")
    monkeypatch.chdir(tmp_path)
    gap = [0.1, 0.9, 0.5, 0.3, -1.0, 0.0]
    try:
        load_plugins(["nb_rules.py"])
        first = selection.plugin_fingerprints(["nb_rules.py"])["nb_rules.py"]
        assert apply_rule(_cand("nb-rule", learnability_gap=gap)).selected_ids == ["q1", "q2"]
        load_plugins(["nb_rules.py"])  # unchanged: kept
        assert selection.plugin_fingerprints(["nb_rules.py"])["nb_rules.py"] == first
        path.write_text(code)  # nb-extra removed
        helper.write_text("SIGN = -1.0\n")
        load_plugins(["nb_rules.py"])
        assert apply_rule(_cand("nb-rule", learnability_gap=gap)).selected_ids == ["q4", "q5"]
        assert "nb-extra" not in selection.registered_rules()
        now = selection.plugin_fingerprints(["nb_rules.py"])["nb_rules.py"]
        assert now["sha256"] != first["sha256"] and set(now["files"]) == {"nb_rules.py", "nb_helper.py"}
    finally:
        for name in ("nb-rule", "nb-extra"):
            selection._RULES.pop(name, None)
        selection._LOADED.clear()
        sys.modules.pop("nb_helper", None)


def test_an_edit_within_the_same_second_is_not_hidden_by_the_bytecode_cache(tmp_path, monkeypatch):
    """Python trusts a .pyc whose recorded source mtime (in seconds) and size match: an edit of the same size in the
    same second re-imported the old code. The cache of a changed plug-in is dropped before it is imported again."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    path = tmp_path / "fast_rules.py"
    code = ("from fedlada.selection import register_rule\n\n@register_rule('fast')\ndef fast(c):\n"
            "    return {} * c.scalars['learnability_gap']\n")
    monkeypatch.chdir(tmp_path)
    gap = [0.1, 0.9, 0.5, 0.3, -1.0, 0.0]
    try:
        path.write_text(code.format("+1.0"))
        load_plugins(["fast_rules.py"])
        assert apply_rule(_cand("fast", learnability_gap=gap)).selected_ids == ["q1", "q2"]
        stat = path.stat()
        path.write_text(code.format("-1.0"))  # same size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
        load_plugins(["fast_rules.py"])
        assert apply_rule(_cand("fast", learnability_gap=gap)).selected_ids == ["q4", "q5"]
    finally:
        selection._RULES.pop("fast", None)
        selection._LOADED.clear()


def test_two_plugins_cannot_share_a_rule_name_and_siblings_import(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.py").write_text("from fedlada.selection import register_rule\n"
                                           "from helper import score\n"  # a sibling file of the plug-in
                                           "register_rule('twin', score)\n")
    (tmp_path / "a" / "helper.py").write_text("def score(c):\n    return [0.0] * len(c)\n")
    (tmp_path / "two.py").write_text("from fedlada.selection import register_rule\n"
                                     "register_rule('twin', lambda c: [1.0] * len(c))\n")
    (tmp_path / "inner.py").write_text("import no_such_dependency_x\n")
    monkeypatch.chdir(tmp_path)
    try:
        load_plugins(["a/one.py"])  # from another folder: its sibling helper.py is found
        with pytest.raises(ConfigError, match=r"plug-in two.py failed to import: ValueError: register_rule: 'twin' is "
                                              r"already registered by .*a/one.py; two plug-ins cannot share"):
            load_plugins(["two.py"])
        load_plugins(["a/one.py"])  # loaded once: no clash with itself
        with pytest.raises(ConfigError, match=r"plug-in inner.py failed to import: ModuleNotFoundError: .*"
                                              r"no_such_dependency_x.* \(at .*inner.py:1\)"):
            load_plugins(["inner.py"])
        # another plug-in with a sibling of the same name would silently get the first one's: refused
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "helper.py").write_text("def score(c):\n    return [2.0] * len(c)\n")
        (tmp_path / "b" / "three.py").write_text("from fedlada.selection import register_rule\n"
                                                 "import helper\nregister_rule('third', helper.score)\n")
        with pytest.raises(ConfigError, match=r"plug-in b/three.py imports its sibling .*b/helper.py, but a module "
                                              r"named 'helper' is already imported elsewhere \(.*a/helper.py\)"):
            load_plugins(["b/three.py"])
        # the digest covers the files under the plug-in's folder that importing it loaded
        before = selection.plugin_fingerprints(["a/one.py"])["a/one.py"]
        assert sorted(before["files"]) == ["helper.py", "one.py"]
        (tmp_path / "a" / "helper.py").write_text("def score(c):\n    return [5.0] * len(c)\n")
        assert selection.plugin_fingerprints(["a/one.py"])["a/one.py"]["sha256"] != before["sha256"]
        # a helper package's submodule counts too
        (tmp_path / "c" / "scorelib").mkdir(parents=True)
        (tmp_path / "c" / "scorelib" / "__init__.py").write_text("")
        (tmp_path / "c" / "scorelib" / "gap.py").write_text("def score(c):\n    return [0.0] * len(c)\n")
        (tmp_path / "c" / "pk.py").write_text("from fedlada.selection import register_rule\n"
                                              "from scorelib.gap import score\nregister_rule('pk', score)\n")
        load_plugins(["c/pk.py"])
        assert sorted(selection.plugin_fingerprints(["c/pk.py"])["c/pk.py"]["files"]) == [
            "pk.py", "scorelib/__init__.py", "scorelib/gap.py"]
        # a sibling named like an installed module (not imported yet) would be that module: refused
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "tomllib.py").write_text("score = None\n")
        (tmp_path / "d" / "sh.py").write_text("import tomllib\n")
        sys.modules.pop("tomllib", None)
        with pytest.raises(ConfigError, match=r"imports its sibling .*d/tomllib.py, but a module named 'tomllib' is "
                                              r"found elsewhere"):
            load_plugins(["d/sh.py"])
    finally:
        for name in ("twin", "pk"):
            selection._RULES.pop(name, None)
        selection._LOADED.clear()
        for name in ("helper", "scorelib", "scorelib.gap"):
            sys.modules.pop(name, None)


def test_names_and_plugins_are_checked(rules_file, tmp_path):
    with pytest.raises(ValueError, match="built-in"):
        register_rule("random", lambda c: c)
    with pytest.raises(ValueError, match="not a rule name"):
        register_rule("fedmkt:mine", lambda c: c)
    with pytest.raises(ConfigError, match="lada.method.*registered by lada.plugins"):
        load_config(overrides=["lada.method=gap-first"])  # a rule name needs a plug-in to come from
    with pytest.raises(ConfigError, match=r"lada.plugins.*plug-in file nope.py not found"):
        check_method("gap-first", ["nope.py"])
    with pytest.raises(ConfigError, match="no module 'no_such_module_x'"):
        check_method("gap-first", ["no_such_module_x"])
    (tmp_path / "raises.py").write_text("x = 1\nraise RuntimeError('half-written plug-in')\n")
    with pytest.raises(ConfigError, match=r"plug-in raises.py failed to import: RuntimeError: half-written plug-in "
                                          r"\(at .*raises.py:2\)"):
        check_method("gap-first", ["raises.py"])
    with pytest.raises(ConfigError, match=r"'gap-frist' is neither .* \(registered: .*gap-first"):
        check_method("gap-frist", ["my_rules.py"])
    check_method("gap-first", ["my_rules.py"])
    check_method("lada", ["my_rules.py"])


def test_a_run_under_a_plugin_rule(rules_file, tiny_overrides, gold_sampler, tmp_path):
    from fedlada.compare import parse_method
    from fedlada.prepare import load_data
    from fedlada.runner import run

    cfg = load_config(overrides=tiny_overrides + ['lada.plugins=["my_rules.py"]', "lada.method=gap-first"])
    gold_sampler(load_data(cfg).public)
    res = run(cfg)
    rows = [json.loads(x) for x in (res.run_dir / "selections.jsonl").read_text().splitlines()]
    assert rows and {r["pair"] for r in rows} >= {"llm->client0", "llm->client1"}
    assert all(r["reason"].startswith(("gap-first selected", "gap-first over cap")) for r in rows)
    for (rnd, pair) in {(r["round"], r["pair"]) for r in rows}:
        group = [r for r in rows if (r["round"], r["pair"]) == (rnd, pair)]
        gap = "learnability_gap" if pair.startswith("llm->") else "novelty_gap"
        assert all(r["score"] == r[gap] for r in group)  # the rule's scores are recorded
        chosen = [r for r in group if r["selected"]]
        assert chosen and min(r["score"] for r in chosen) >= max(
            [r["score"] for r in group if not r["selected"]], default=-np.inf)
    saved = load_config(res.run_dir / "config.toml")
    assert (saved.lada.method, saved.lada.plugins) == ("gap-first", ("my_rules.py",))
    assert res.summary["rounds_done"] == 2
    assert parse_method("fedmkt:gap-first", "none", ("my_rules.py",)) == ("fedmkt", "gap-first", "fedmkt-gap-first")
    with pytest.raises(ConfigError, match="--methods"):
        parse_method("gap-first", "none")
    # a table of finished runs only reads their files: no plug-in needed
    assert parse_method("gap-first", "none", ("gone.py",), load=False) == ("none", "gap-first", "gap-first")
    setup = next(r for r in (json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines())
                 if r["event"] == "setup")
    assert setup["plugins"]["my_rules.py"]["file"] == str(rules_file)
    # the rule's code edited: resuming (here, extending) the run is refused, as reusing it in a table would be
    rules_file.write_text(RULES.replace("return c.scalars", "return -c.scalars"))
    selection._LOADED.clear()
    more = load_config(overrides=tiny_overrides + ['lada.plugins=["my_rules.py"]', "lada.method=gap-first",
                                                   "rounds=3"])
    with pytest.raises(ConfigError, match=r"the plug-in code of this run changed since it started: my_rules.py: "
                                          r"my_rules.py changed \(in "):
        run(more)
    rules_file.write_text(RULES)
    selection._LOADED.clear()
    assert load_config(res.run_dir / "config.toml").rounds == 2  # the refused start changed nothing


def test_a_missing_plugin_fails_before_any_work(tiny_overrides, tmp_path, monkeypatch):
    from fedlada.runner import run

    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=tiny_overrides + ['lada.plugins=["gone.py"]', "lada.method=gap-first"])
    with pytest.raises(ConfigError, match="plug-in file gone.py not found"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_flower_settings_make_plugin_files_absolute(tmp_path):
    from fedlada_app.settings import absolute_paths

    (tmp_path / "r.py").write_text(textwrap.dedent(RULES))
    cfg = load_config(overrides=['lada.plugins=["r.py", "some.module"]', "lada.method=gap-first"])
    fixed, changed = absolute_paths(cfg, tmp_path)
    assert fixed.lada.plugins == (str(tmp_path / "r.py"), "some.module") and "lada.plugins.0" in changed
