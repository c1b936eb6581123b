"""Bad arguments are refused before any model loads, and silent acceptances now say something
(issue 16, part 2): merge method / train task, a merge of one adapter, an unknown user, --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapters_mgr.manager import AdapterManager
from tests.conftest import lora_model, tiny_bert
from tests.test_cli import run


@pytest.fixture(autouse=True)
def _clear(capsys):
    capsys.readouterr()


def _no_model(monkeypatch):
    """Any model load (or scorer) fails the test: the refusal must come before."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("base_model", "tokenizer", "scorer", "train_update"):
        monkeypatch.setattr(AdapterManager, name, boom)


def _one_line(code: int, err: str, expected: int, *needles: str) -> None:
    assert code == expected, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.mark.parametrize("args, needles", [
    (["merge", "1", "--method", "foo"], ["unknown merge method 'foo'", "cat"]),
    (["merge", "1", "--method", "cat", "--target-rank", "4"], ["target_rank does not apply to cat"]),
    (["compact", "--method", "magic"], ["unknown merge method 'magic'"]),
    (["train", "--task", "rankr"], ["invalid --task 'rankr'", "ranker, retriever"]),
    (["train", "--policy", "stak"], ["invalid --policy 'stak'", "warm_start"]),
    (["train", "--promote", "sometimes"], ["invalid --promote 'sometimes'", "if_better"]),
])
def test_bad_choices_are_refused_before_any_model_loads(capsys, root, mgr, monkeypatch, args, needles):
    _no_model(monkeypatch)
    code, _, err = run(capsys, root, *args)
    _one_line(code, err, 2, *needles)


@pytest.mark.parametrize("args", [["merge", "1", "--method", "foo"], ["train", "--task", "rankr"]])
def test_bad_choices_are_refused_without_even_importing_torch(root, mgr, args):
    code = ("import sys; from adapters_mgr.cli.main import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "--root", str(root), *args], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)


def test_the_train_choices_match_the_registries():
    from adapters_mgr.cli.main import TRAIN_POLICIES, TRAIN_TASKS
    from adapters_mgr.lora.merge import METHODS
    from adapters_mgr.lora.merge_methods import METHODS as LIGHT_METHODS
    from adapters_mgr.lora.policies import POLICIES
    from adapters_mgr.lora.tasks import task_names

    assert set(TRAIN_TASKS) == set(task_names()) and set(TRAIN_POLICIES) == set(POLICIES)
    assert METHODS is LIGHT_METHODS


def test_a_cat_merge_of_one_plain_adapter_is_refused(capsys, root, mgr, base_id, monkeypatch):
    plain = mgr.register(lora_model(tiny_bert(0), seed=3), name="solo")
    mgr.promote(plain, "production")
    monkeypatch.setattr(AdapterManager, "base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    before = len(mgr.list())
    for method in ("cat", "linear"):
        code, _, err = run(capsys, root, "merge", "production", "--method", method)
        _one_line(code, err, 2, "nothing to merge", f"#{plain} solo@1", "a stack node")
    assert len(mgr.list()) == before
    assert [e["outcome"] for e in mgr.events(operation="merge")][:2] == ["error", "error"]


def test_recommend_for_an_unknown_user_exits_3_before_loading_a_model(capsys, root, mgr, monkeypatch):
    _no_model(monkeypatch)
    code, _, err = run(capsys, root, "recommend", "99999")
    _one_line(code, err, 3, "no user '99999'")


def test_recommend_table_shows_titles_with_years_and_the_nodes_in_words(capsys, root, mgr, monkeypatch):
    films = (("1", "That Darn Cat!", 1965), ("2", "That Darn Cat!", 1997), ("3", "Untitled", None))
    with mgr.catalog.transaction() as con:
        for item, title, year in films:
            attrs = f'{{"title": "{title}"' + (f', "year": {year}' if year else "") + "}"
            con.execute("INSERT INTO items (item_id, valid_from, attrs, source, sync_id) "
                        "VALUES (?, TIMESTAMPTZ '2000-01-01', ?, 'test', 's0')", [item, attrs])
        con.execute("INSERT INTO users (user_id, valid_from, attrs, source, sync_id) "
                    "VALUES ('42', TIMESTAMPTZ '2000-01-01', '{}', 'test', 's0')")

    class FakeScorer:
        active_nodes = {"retriever": 5, "ranker": 7}

        def recommend(self, user, k, **kwargs):
            return [{"item_id": i, "score": 1.0 - int(i) / 10} for i in ("1", "2", "3")]

        def close(self):
            pass

    monkeypatch.setattr(AdapterManager, "scorer", lambda self, *a, **k: FakeScorer())
    code, out, err = run(capsys, root, "recommend", "42")
    assert code == 0, err
    assert "That Darn Cat! (1965)" in out and "That Darn Cat! (1997)" in out and "Untitled " in out
    assert "user 42: retriever #5, ranker #7" in out and "{" not in out


def test_debug_and_other_flags_show_no_value_in_help(capsys, root):
    code, out, _ = run(capsys, root, "--help")
    assert code == 0
    debug = next(line for line in out.splitlines() if "--debug" in line)
    assert "<bool>" not in debug
    for command in (["ls"], ["data", "batches"], ["recommend"]):
        code, out, _ = run(capsys, root, *command, "--help")
        for flag in ("--json", "--wide", "--all", "--include-seen"):
            line = next((line for line in out.splitlines() if flag in line), None)
            assert line is None or "<bool>" not in line, (command, line)
