"""Bad adapter folders are refused before the store is touched; gc leaves young folders alone; clear
one-line errors for wrong paths and bases."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest

from adapters_mgr.errors import IntegrityError, InvalidInput, NotFound
from adapters_mgr.store import GC_GRACE_SECONDS
from adapters_mgr.workflows.register import store_adapter
from tests.conftest import lora_model, tiny_bert

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One good safetensors PEFT folder and one pickle (.bin) save of the same adapter, written once."""
    root = tmp_path_factory.mktemp("saved")
    model = lora_model(tiny_bert(0), seed=5)
    model.save_pretrained(str(root / "good"))
    model.save_pretrained(str(root / "pickled"), safe_serialization=False)
    return {"good": root / "good", "pickled": root / "pickled"}


def _copy(saved: dict[str, Path], tmp_path: Path, name: str = "adapter") -> Path:
    folder = tmp_path / name
    shutil.copytree(saved["good"], folder)
    return folder


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def _store_is_clean(mgr) -> None:
    """Nothing was written: no orphan folder, no staging leftover, no catalog row."""
    assert mgr.verify()["problems"] == []
    assert mgr.store.keys() == [] and mgr.store.tmp_dirs() == []
    assert mgr.list(status="all") == []


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def _last_error(mgr, operation: str) -> dict:
    rows = [e for e in mgr.events(limit=20, operation=operation) if e["outcome"] == "error"]
    assert rows, f"no failed {operation} in the event log"
    return json.loads(rows[0]["detail"])


# ----------------------------------------------------------------------------- 1. validation first
@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_pickle_named_safetensors_is_refused_before_the_store_is_touched(mgr, base_id, saved, tmp_path, kind):
    folder = _copy(saved, tmp_path)
    if kind == "torch_zip":
        shutil.copyfile(saved["pickled"] / "adapter_model.bin", folder / WEIGHTS)
    else:
        (folder / WEIGHTS).write_bytes(pickle.dumps({"lora_A": [1.0, 2.0]}, protocol=4))
    with pytest.raises(InvalidInput) as err:
        mgr.register(folder, name="ranker", base=base_id)
    msg = _one_line(err.value)
    assert str(folder / WEIGHTS) in msg
    assert "is not a safetensors file (pickle .bin adapters are refused" in msg
    _store_is_clean(mgr)
    assert _last_error(mgr, "register") == {"error": "InvalidInput", "message": msg}


@pytest.mark.parametrize(
    "content",
    [b"", b"not a safetensors file at all", "truncated"],
    ids=["empty", "garbage", "truncated"],
)
def test_broken_safetensors_is_refused_naming_the_file(mgr, base_id, saved, tmp_path, content):
    folder = _copy(saved, tmp_path)
    if content == "truncated":
        data = (folder / WEIGHTS).read_bytes()
        content = data[: len(data) - 16]
    (folder / WEIGHTS).write_bytes(content)
    with pytest.raises(InvalidInput, match="is not a valid safetensors file") as err:
        mgr.register(folder, name="ranker", base=base_id)
    assert str(folder / WEIGHTS) in _one_line(err.value)
    _store_is_clean(mgr)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("[]", "must hold a JSON object"),
        ("42", "must hold a JSON object"),
        ("{not json", "is not valid JSON"),
        (b"\x80\x04\x95binary", "holds binary data"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"peft_type": None}, "has no peft_type"),
        ({"r": 0}, "rank r must be a positive integer"),
        ({"r": "four"}, "rank r must be a positive integer"),
        ({"target_modules": 7}, "target_modules"),
        ({"lora_alpha": "big"}, "lora_alpha"),
    ],
    ids=["list", "number", "bad-json", "binary", "ia3", "no-type", "rank0", "rank-str", "targets", "alpha"],
)
def test_bad_config_is_refused_naming_the_file(mgr, base_id, saved, tmp_path, config, expected):
    folder = _copy(saved, tmp_path)
    if isinstance(config, dict):
        _edit_config(folder, **config)
    elif isinstance(config, bytes):
        (folder / CONFIG).write_bytes(config)
    else:
        (folder / CONFIG).write_text(config)
    with pytest.raises(InvalidInput, match=expected) as err:
        mgr.register(folder, name="ranker", base=base_id)
    assert str(folder / CONFIG) in _one_line(err.value)
    _store_is_clean(mgr)
    assert _last_error(mgr, "register")["error"] == "InvalidInput"


def test_import_refuses_a_bad_folder_and_logs_it(mgr, base_id, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / CONFIG).write_text("[]")
    with pytest.raises(InvalidInput, match="must hold a JSON object"):
        mgr.import_peft(folder, base=base_id)
    _store_is_clean(mgr)
    assert _last_error(mgr, "import")["error"] == "InvalidInput"


def test_bad_provenance_file_is_a_clear_error(mgr, base_id, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "adapters_mgr.json").write_text("[]")
    with pytest.raises(InvalidInput, match="adapters_mgr.json is not an adapters_mgr provenance file"):
        mgr.import_peft(folder)
    _store_is_clean(mgr)


def test_a_good_folder_still_registers_with_its_parameter_count(mgr, base_id, saved, tmp_path):
    model = lora_model(tiny_bert(0), seed=5)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    aid = mgr.register(_copy(saved, tmp_path), name="ranker", base=base_id)
    assert mgr.get(aid).trainable_params == expected
    assert mgr.verify()["ok"]


def test_a_non_lora_model_is_refused(mgr, base_id):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(tiny_bert(0), IA3Config(target_modules=["key", "value"], feedforward_modules=[],
                                                   task_type="SEQ_CLS"))
    with pytest.raises(InvalidInput, match="only LoRA adapters"):
        mgr.register(model, name="ia3")
    _store_is_clean(mgr)


# ----------------------------------------------------------------------------- 2. gc grace period
def _age(path: Path, seconds: float) -> None:
    """Make a folder and everything in it look ``seconds`` old."""
    then = time.time() - seconds
    for p in [path, *path.iterdir()]:
        os.utime(p, (then, then))


def test_gc_keeps_a_folder_that_register_just_stored(mgr, base_id):
    prepared = store_adapter(mgr.workspace, lora_model(tiny_bert(0), seed=5))  # renamed into the store, not cataloged
    key = prepared.columns["store_key"]
    folder = mgr.store.path(key)
    assert [p["kind"] for p in mgr.verify()["problems"]] == ["orphan_folder"]  # verify still reports it

    report = mgr.gc(grace=GC_GRACE_SECONDS)
    assert folder.exists()
    assert report["skipped"] == [{"action": "skip", "kind": "orphan_folder", "store_key": key,
                                  "age_s": report["skipped"][0]["age_s"], "reason": "skipped (younger than grace)"}]
    assert report["skipped"][0] in report["actions"]
    assert not any(a["action"] == "remove_folder" for a in report["actions"])

    mgr.gc(grace=0)
    assert not folder.exists() and mgr.verify()["ok"]


def test_gc_by_default_and_from_the_cli_keeps_young_folders(capsys, root, mgr, base_id):
    from tests.test_cli import run_json

    folder = mgr.store.path(store_adapter(mgr.workspace, lora_model(tiny_bert(0), seed=6)).columns["store_key"])
    assert [a["action"] for a in mgr.gc()["actions"]] == ["skip"] and folder.exists()  # the default: an hour
    assert [a["action"] for a in run_json(capsys, root, "gc")["actions"]] == ["skip"] and folder.exists()
    assert "remove_folder" in [a["action"] for a in run_json(capsys, root, "gc", "--grace", "0")["actions"]]
    assert not folder.exists() and mgr.verify()["ok"]


def test_gc_removes_orphans_and_staging_older_than_grace(mgr, base_id):
    key = store_adapter(mgr.workspace, lora_model(tiny_bert(0), seed=5)).columns["store_key"]
    old_tmp, young_tmp = mgr.store.new_tmp_dir(), mgr.store.new_tmp_dir()
    (old_tmp / WEIGHTS).write_bytes(b"partial")
    _age(mgr.store.path(key), 2 * GC_GRACE_SECONDS)
    _age(old_tmp, 2 * GC_GRACE_SECONDS)

    dry = mgr.gc(dry_run=True, grace=GC_GRACE_SECONDS)
    assert {a["action"] for a in dry["actions"]} == {"remove_folder", "remove_staging", "skip"}
    assert mgr.store.path(key).exists() and old_tmp.exists()

    report = mgr.gc(grace=GC_GRACE_SECONDS)
    assert not mgr.store.path(key).exists() and not old_tmp.exists()
    assert young_tmp.exists()
    assert [(s["kind"], s["path"]) for s in report["skipped"]] == [("staging_leftover", str(young_tmp))]


def test_commit_makes_a_reused_old_folder_young_again(mgr, base_id):
    model = lora_model(tiny_bert(0), seed=5)
    key = store_adapter(mgr.workspace, model).columns["store_key"]  # a crash left this orphan long ago...
    _age(mgr.store.path(key), 2 * GC_GRACE_SECONDS)
    assert store_adapter(mgr.workspace, model).columns["store_key"] == key  # ...and a new register reuses it now
    mgr.gc(grace=GC_GRACE_SECONDS)
    assert mgr.store.path(key).exists()


def test_commit_sets_the_mtime_at_the_rename(mgr, base_id, saved):
    staged = mgr.store.stage_folder(saved["good"])
    _age(staged.path, 2 * GC_GRACE_SECONDS)
    key = mgr.store.commit(staged)
    assert time.time() - mgr.store.path(key).stat().st_mtime < 60


@pytest.mark.parametrize("grace", [-1, float("nan"), "1h", True])
def test_gc_grace_must_be_seconds(mgr, grace):
    with pytest.raises(InvalidInput, match="grace"):
        mgr.gc(grace=grace)


# ----------------------------------------------------------------------------- 3. clear path / base errors
def test_export_onto_a_file_is_a_clear_error(mgr, base_id, tmp_path):
    aid = mgr.register(lora_model(tiny_bert(0), seed=5), name="ranker")
    target = tmp_path / "existing.txt"
    target.write_text("keep me")
    with pytest.raises(InvalidInput, match="is a file, not a folder") as err:
        mgr.export(aid, target)
    assert str(target) in _one_line(err.value)
    assert target.read_text() == "keep me"
    with pytest.raises(InvalidInput, match="existing.txt is a file"):
        mgr.export(aid, target / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt", "root"]  # no temp folder left
    assert _last_error(mgr, "export")["error"] == "InvalidInput"


@pytest.mark.parametrize("how", ["import", "register"])
def test_a_file_instead_of_a_folder_is_named_as_such(mgr, base_id, saved, tmp_path, how):
    weights = _copy(saved, tmp_path) / WEIGHTS
    with pytest.raises(InvalidInput, match="is a file, not a PEFT adapter folder") as err:
        if how == "import":
            mgr.import_peft(weights)
        else:
            mgr.register(weights, name="ranker", base=base_id)
    assert "does not exist" not in _one_line(err.value)
    with pytest.raises(NotFound, match="does not exist; pass the folder that holds"):
        mgr.import_peft(tmp_path / "nowhere")
    _store_is_clean(mgr)


def test_unregistered_base_named_in_config_says_what_to_do(mgr, base_id, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, base_model_name_or_path="some-org/unknown-bert")
    with pytest.raises(NotFound) as err:
        mgr.register(folder, name="ranker")
    msg = _one_line(err.value)
    assert "'some-org/unknown-bert'" in msg and "not registered" in msg
    assert "register-base" in msg and "--base" in msg and "None" not in msg
    _store_is_clean(mgr)


def test_config_naming_no_base_says_so(mgr, base_id, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, base_model_name_or_path=None)
    with pytest.raises(NotFound, match="names no base_model_name_or_path") as err:
        mgr.import_peft(folder)
    assert "None" not in _one_line(err.value) and "--base" in str(err.value)
    _store_is_clean(mgr)
    assert mgr.import_peft(folder, base=base_id) > 0  # and the fix it names works


# ----------------------------------------------------------------------------- 4. wrong-base message
def test_wrong_base_message_names_the_real_override(mgr, base_id):
    aid = mgr.register(lora_model(tiny_bert(0), seed=5), name="ranker")
    with pytest.raises(IntegrityError) as err:
        mgr.load(aid, base_model=tiny_bert(seed=99))
    msg = _one_line(err.value)
    assert "--force" not in msg
    assert "load(..., force=True)" in msg

