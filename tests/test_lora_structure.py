"""The lora/ layout: policy records, task heads, tensors vs merge, and atomic folder writes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.lora.policies import POLICIES, Policy, get_policy
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.store import atomic_folder

PACKAGE = Path(__file__).resolve().parents[1] / "adapters_mgr"


# -- policies ------------------------------------------------------------------------------------------
def test_policy_records():
    assert POLICIES == ("fresh", "warm_start", "stack", "long_short")
    fresh, warm, stack, long_short = (get_policy(name) for name in POLICIES)
    assert not fresh.needs_parent and all(p.needs_parent for p in (warm, stack, long_short))
    assert [p.name for p in (fresh, warm, stack, long_short) if p.single_parent] == ["warm_start", "long_short"]
    assert [p.name for p in (fresh, warm, stack, long_short) if p.makes_stack_node] == ["stack", "long_short"]
    assert [p.relation for p in (fresh, warm, stack, long_short)] == [None, "warm_start", "stacked_on", None]
    assert [p.name for p in (fresh, warm, stack, long_short) if p.trains_on_parents] == ["stack"]
    assert [p.name for p in (fresh, warm, stack, long_short) if p.inherits_shape] == ["warm_start"]
    assert get_policy(stack) is stack and isinstance(stack, Policy)


@pytest.mark.parametrize("bad", ["rewind", "", None, 3])
def test_unknown_policy(bad):
    with pytest.raises(InvalidInput, match="unknown policy"):
        get_policy(bad)


@pytest.mark.parametrize(
    ("policy", "kwargs", "needles"),
    [
        ("fresh", dict(parents=1), ["policy 'fresh' trains on the bare base and takes no parent", "needs no parent"]),
        ("warm_start", dict(parents=0), ["needs a parent", "needs exactly one parent"]),
        ("long_short", dict(parents=0), ["needs a parent", "the long-term adapter"]),
        ("stack", dict(parents=0), ["needs a parent", "at least one parent"]),
        ("warm_start", dict(parents=2), ["needs exactly one parent, got 2"]),
        ("long_short", dict(parents=1, parent_is_stack=True, parent_label="'prod'"),
         ["needs a single adapter as parent", "'prod' is a stack node"]),
        ("stack", dict(parents=1, mode="ensemble"), ["needs mode='weights'", "mode must be 'weights'"]),
        ("stack", dict(mode="ensemble"), ["mode must be 'weights'"]),
        ("fresh", dict(mode="average"), ["unknown combination mode 'average'", "use 'weights' or 'ensemble'"]),
    ],
)
def test_policy_check_refuses_with_one_message(policy, kwargs, needles):
    kwargs = {"mode": "weights", **kwargs}
    with pytest.raises(InvalidInput) as err:
        get_policy(policy).check(**kwargs)
    for needle in needles:
        assert needle in str(err.value)


def test_policy_check_accepts():
    get_policy("fresh").check(parents=0, mode="weights")
    get_policy("fresh").check(mode="ensemble")  # parents not known yet: the mode only
    get_policy("warm_start").check(parents=1, mode="ensemble")
    get_policy("stack").check(parents=3, mode="weights", parent_is_stack=True)
    get_policy("long_short").check(parents=1, mode="ensemble", parent_is_stack=False)


# -- tasks -----------------------------------------------------------------------------------------------
def test_task_head():
    assert get_task("ranker").head == HeadSpec("seq_cls", 2)
    assert get_task("retriever").head == HeadSpec("encoder")


# -- tensors / merge split -----------------------------------------------------------------------------------
def test_tensor_maths_lives_in_tensors():
    from adapters_mgr.lora import merge, tensors

    for name in ("LoraTensors", "parse_state_dict", "read_lora", "stacked_factors", "head_of", "check_compatible",
                 "check_fits", "check_weights", "WEIGHTS_FILE", "CONFIG_FILE", "PREFIX", "TASK_OF_PEFT_TYPE"):
        assert name in tensors.__all__
        assert name not in merge.__all__
    kept = {"merge_adapters", "fold", "fold_into", "MergeResult", "METHODS", "reconstruction_error"}
    assert kept <= set(merge.__all__)


def test_store_imports_nothing_from_lora():
    tree = ast.parse((PACKAGE / "store.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith("adapters_mgr.lora") for m in modules)


# -- atomic_folder ------------------------------------------------------------------------------------------
def test_atomic_folder_renames_on_success(tmp_path):
    dest = tmp_path / "a" / "b" / "out"
    with atomic_folder(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "f.txt").write_text("x")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "g.txt").write_text("y")
        assert not dest.exists()
    assert (dest / "f.txt").read_text() == "x" and (dest / "sub" / "g.txt").read_text() == "y"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out"]


def test_atomic_folder_removes_the_temp_folder_on_error(tmp_path):
    dest = tmp_path / "out"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_folder(dest) as tmp:
            (tmp / "f.txt").write_text("x")
            raise exc
        assert list(tmp_path.iterdir()) == []


@pytest.fixture
def occupied(tmp_path):
    (tmp_path / "file").write_text("keep")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    return tmp_path


@pytest.mark.parametrize(
    ("where", "kwargs", "message"),
    [
        ("file", dict(replace_empty=True), "file is a file, not a folder"),
        ("empty", {}, "empty already exists"),
        ("full", dict(replace_empty=True, label="export destination"), "export destination .* exists and is not empty"),
        ("file/sub", {}, "file is a file, not a folder"),
    ],
)
def test_atomic_folder_refuses_before_the_block_runs(occupied, where, kwargs, message):
    ran = []
    with pytest.raises(InvalidInput, match=message), atomic_folder(occupied / where, **kwargs):
        ran.append(1)
    assert not ran
    assert sorted(p.name for p in occupied.iterdir()) == ["empty", "file", "full"]
    assert (occupied / "file").read_text() == "keep" and (occupied / "full" / "x").read_text() == "keep"


def test_atomic_folder_replaces_when_asked(occupied):
    with atomic_folder(occupied / "empty", replace_empty=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in (occupied / "empty").iterdir()] == ["new"]
    with atomic_folder(occupied / "full", replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in (occupied / "full").iterdir()] == ["new"]
    assert sorted(p.name for p in occupied.iterdir()) == ["empty", "file", "full"]


def test_atomic_folder_refuses_a_destination_filled_meanwhile(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(InvalidInput, match="filled by someone else meanwhile"):  # noqa: SIM117 - clearer apart
        with atomic_folder(dest, replace_empty=True) as tmp:
            (tmp / "mine").write_text("mine")
            dest.mkdir()
            (dest / "theirs").write_text("theirs")
    assert [p.name for p in dest.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
