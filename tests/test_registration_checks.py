"""Issue 15, part 2: registration refuses adapters that cannot load, and aliases never move onto
weights that are gone or changed.

- an adapter saved from a 48-wide BERT is refused on a 32-wide base (shapes from the safetensors
  headers; nothing written), by ``register``, the CLI (exit 2, one line) and ``stack``;
- the same bytes on another base are another node (a node is bytes + base + lineage);
- ``promote`` / ``set_alias`` / ``rollback`` (default and ``--to``) check the target's files first
  and refuse with ``IntegrityError`` (exit 5, one line), the alias unchanged, the failure logged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapters_mgr import AdapterManager, Conflict, IntegrityError, InvalidInput
from adapters_mgr.lora.testing import tiny_base, tiny_config
from adapters_mgr.store import WEIGHTS_FILE
from adapters_mgr.workflows import register as register_flow
from tests.conftest import lora_model, tiny_bert
from tests.test_cli import run


def _adapter_folder(folder: Path, hidden: int, seed: int = 1) -> Path:
    """A LoRA (query, value; rank 4) with its classifier head, saved from a ``hidden``-wide tiny BERT."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    config = tiny_config(hidden=hidden)
    config.num_labels = 2
    torch.manual_seed(seed)
    model = get_peft_model(BertForSequenceClassification(config).eval(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                      init_lora_weights=False))
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture
def narrow(mgr) -> str:
    """A 32-wide base registered from memory (its folder is ``<root>/bases/<id>``)."""
    return mgr.register_base(tiny_base(seed=0), name="narrow")


@pytest.fixture
def wide_folder(tmp_path) -> Path:
    return _adapter_folder(tmp_path / "wide48", hidden=48)


def _assert_nothing_registered(mgr: AdapterManager) -> None:
    assert mgr.list(status=None) == []
    assert mgr.store.keys() == [] and mgr.store.tmp_dirs() == []
    assert not [e for e in mgr.events(operation="register") if e["outcome"] == "ok"]


# ---------------------------------------------------------------- shapes against the base
def test_a_wider_adapter_is_refused_on_a_narrower_base_and_nothing_is_written(mgr, narrow, wide_folder):
    with pytest.raises(InvalidInput) as info:
        mgr.register(wide_folder, name="wide", base=narrow)
    message = str(info.value)
    assert "\n" not in message
    assert "encoder.layer.0.attention.self.query.lora_A.weight [4, 48]" in message
    assert "[32, 32]" in message and narrow in message and "--base" in message
    _assert_nothing_registered(mgr)
    failed = mgr.events(operation="register")
    assert failed and failed[0]["outcome"] == "error"  # logged as every failure is


def test_the_same_adapter_fits_the_base_it_was_trained_on(mgr, narrow, tmp_path):
    fitting = _adapter_folder(tmp_path / "fits32", hidden=32)
    aid = mgr.register(fitting, name="fits", base=narrow)
    assert mgr.get(aid).base_id == narrow
    detail = json.loads(mgr.events(operation="register")[0]["detail"])
    assert detail["shape_check"].startswith("checked against header of ")


def test_cli_register_refuses_with_exit_2_and_one_line(capsys, root, mgr, narrow, wide_folder):
    capsys.readouterr()
    code, out, err = run(capsys, root, "register", str(wide_folder), "--name", "wide", "--base", narrow)
    assert code == 2, (out, err)
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: adapter tensor "), lines
    assert "[4, 48]" in lines[0] and "Traceback" not in out + err
    _assert_nothing_registered(mgr)


def test_without_the_base_header_the_recorded_config_is_checked(mgr, narrow, wide_folder, tmp_path):
    (Path(mgr.base(narrow)["source"]) / "model.safetensors").unlink()  # e.g. a .bin-only checkpoint
    with pytest.raises(InvalidInput, match=r"\[4, 48\].*the base's config gives .*query a \[32, 32\] weight"):
        mgr.register(wide_folder, name="wide", base=narrow)
    _assert_nothing_registered(mgr)
    aid = mgr.register(_adapter_folder(tmp_path / "fits32", hidden=32), name="fits", base=narrow)
    detail = json.loads(mgr.events(operation="register")[0]["detail"])
    assert detail["id"] == aid and detail["shape_check"].startswith("checked against the base's config")


def test_a_base_that_cannot_be_read_is_not_checked_and_the_event_says_so(mgr, narrow, wide_folder):
    with mgr.catalog.transaction() as con:  # a hub id that is not in the local cache, with no config recorded
        con.execute("UPDATE base_models SET source = 'nobody/not-cached-model', config = '{}' WHERE id = ?", [narrow])
    aid = mgr.register(wide_folder, name="wide", base=narrow)
    detail = json.loads(mgr.events(operation="register")[0]["detail"])
    assert detail["id"] == aid and detail["shape_check"].startswith("not checked: ")


def test_stack_refuses_a_member_registered_before_the_check(mgr, narrow, wide_folder, tmp_path, monkeypatch):
    fitting = mgr.register(_adapter_folder(tmp_path / "fits32", hidden=32), name="fits", base=narrow)
    with monkeypatch.context() as patch:  # a catalog filled before registration checked shapes
        patch.setattr(register_flow, "check_fits_base", lambda row, shapes: "not checked: legacy")
        legacy = mgr.register(wide_folder, name="wide", base=narrow)
    with pytest.raises(InvalidInput, match=rf"cannot stack adapter {legacy} \(wide@1\): adapter tensor .*\[4, 48\]"):
        mgr.stack([fitting, legacy])
    assert mgr.list(kind="stack") == []
    assert mgr.stack([fitting]) > 0  # members that fit stack as before


# ---------------------------------------------------------------- same bytes, another base
@pytest.mark.parametrize("order", ["a_then_b", "b_then_a"])
def test_same_bytes_on_another_base_is_another_node(mgr, tmp_path, order):
    base_a = mgr.register_base(tiny_base(seed=0), name="a")
    base_b = mgr.register_base(tiny_base(seed=5), name="b")  # same shapes, other weights
    assert base_a != base_b
    folder = _adapter_folder(tmp_path / "ad", hidden=32)
    first, second = (base_a, base_b) if order == "a_then_b" else (base_b, base_a)
    id_first = mgr.register(folder, name="ranker", base=first)
    assert mgr.register(folder, name="ranker", base=first) == id_first  # a retry: the same node
    id_second = mgr.register(folder, name="ranker", base=second)
    assert id_second != id_first
    assert mgr.get(id_first).base_id == first and mgr.get(id_second).base_id == second
    assert [mgr.get(i).version for i in (id_first, id_second)] == [1, 2]
    assert mgr.register(folder, name="ranker", base=second) == id_second
    assert mgr.register(folder, name="ranker", base=first) == id_first
    assert len(mgr.store.keys()) == 1  # the bytes are stored once all the same
    assert mgr.verify()["ok"]


# ---------------------------------------------------------------- aliases only onto loadable weights
@pytest.fixture
def three(mgr, base_id) -> list[int]:
    return [mgr.register(lora_model(tiny_bert(0), seed=s), name="ranker") for s in (1, 2, 3)]


def _break(mgr: AdapterManager, node_id: int, how: str) -> None:
    folder = mgr.store.path(mgr.get(node_id).store_key)
    if how == "folder_gone":
        shutil.rmtree(folder)
    elif how == "weights_gone":
        (folder / WEIGHTS_FILE).unlink()
    else:  # changed bytes
        data = bytearray((folder / WEIGHTS_FILE).read_bytes())
        data[-1] ^= 0xFF
        (folder / WEIGHTS_FILE).write_bytes(bytes(data))


def _alias_state(mgr: AdapterManager, alias: str) -> tuple[int | None, int]:
    return mgr.alias_target(alias), len(mgr.alias_history(alias))


@pytest.mark.parametrize("how", ["folder_gone", "weights_gone", "bytes_changed"])
def test_promote_refuses_a_target_whose_files_do_not_check_out(mgr, three, how):
    a, b, _ = three
    mgr.promote(a, "production")
    _break(mgr, b, how)
    before = _alias_state(mgr, "production")
    with pytest.raises(IntegrityError) as info:
        mgr.promote(b, "production")
    message = str(info.value)
    assert "\n" not in message and f"adapter {b}" in message and "alias unchanged" in message
    assert "adapters-mgr verify" in message and "adapters-mgr gc" in message
    assert _alias_state(mgr, "production") == before == (a, 1)
    failed = mgr.events(operation="set_alias")[0]
    assert failed["outcome"] == "error" and json.loads(failed["detail"])["error"] == "IntegrityError"


def test_set_alias_and_rollback_to_refuse_too(mgr, three):
    a, b, c = three
    mgr.set_alias("staging", a)
    _break(mgr, c, "folder_gone")
    with pytest.raises(IntegrityError, match=f"cannot set 'staging' to adapter {c}"):
        mgr.set_alias("staging", c)
    with pytest.raises(IntegrityError, match=f"cannot roll back 'staging' to adapter {c}"):
        mgr.rollback("staging", to=c)
    assert _alias_state(mgr, "staging") == (a, 1)
    assert mgr.rollback("staging", to=b) == b  # a sound target still works


def test_default_rollback_refuses_a_previous_target_that_is_gone(mgr, three):
    a, b, _ = three
    mgr.promote(a, "production")
    mgr.promote(b, "production")
    _break(mgr, a, "bytes_changed")
    with pytest.raises(IntegrityError, match=f"cannot roll back 'production' to adapter {a}"):
        mgr.rollback("production")
    assert _alias_state(mgr, "production") == (b, 2)
    assert mgr.events(operation="rollback")[0]["outcome"] == "error"


def test_a_stack_is_checked_member_by_member(mgr, three):
    a, b, _ = three
    stack = mgr.stack([a, b])
    _break(mgr, b, "weights_gone")
    with pytest.raises(IntegrityError, match=f"to adapter {stack} .*adapter {b} "):
        mgr.promote(stack, "production")
    assert mgr.alias_target("production") is None


def test_a_node_marked_missing_by_gc_is_refused_as_inactive(mgr, three):
    a, b, _ = three
    _break(mgr, b, "folder_gone")
    mgr.gc(grace=0)
    assert mgr.get(b).status == "missing"
    with pytest.raises(Conflict, match="missing"):
        mgr.promote(b, "production")
    assert mgr.alias_target("production") is None


def test_cli_promote_refuses_with_exit_5_and_one_line(capsys, root, mgr, three):
    a, b, _ = three
    mgr.promote(a, "production")
    _break(mgr, b, "folder_gone")
    capsys.readouterr()
    code, out, err = run(capsys, root, "promote", str(b))
    assert code == 5, (out, err)
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot promote 'production' to adapter {b}"), lines
    code, out, err = run(capsys, root, "rollback", "--to", str(b))
    assert code == 5 and len([ln for ln in (out + err).splitlines() if ln.strip()]) == 1, (out, err)
    assert mgr.alias_target("production") == a
