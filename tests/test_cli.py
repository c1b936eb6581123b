from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from adapters_mgr.cli.main import main
from adapters_mgr.manager import AdapterManager
from adapters_mgr.workflows.config import UpdateConfig
from tests.conftest import lora_model, tiny_bert
from tests.helpers import add_batch, chain


def run(capsys, root, *args: str) -> tuple[int, str, str]:
    """Invoke the CLI in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(["--root", str(root), *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, root, *args: str):
    code, out, err = run(capsys, root, *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def populated(mgr, base_id):
    add_batch(mgr, "b1", rows=123)
    ids = chain(mgr, 3)
    mgr.promote(ids[0], "production")
    mgr.promote(ids[2], "production")
    return ids


@pytest.fixture(autouse=True)
def _clear_setup_output(capsys):
    capsys.readouterr()


def test_init_ls_show(capsys, root, populated):
    a, b, c = populated
    assert run(capsys, root, "init")[0] == 0
    rows = run_json(capsys, root, "ls")
    assert [r["id"] for r in rows] == [c, b, a]
    assert rows[0]["aliases"] == ["production"]
    code, out, _ = run(capsys, root, "ls")
    assert code == 0 and "ranker" in out and "production" in out
    shown = run_json(capsys, root, "show", "production")
    assert shown["id"] == c and shown["parents"][0]["parent_id"] == b
    assert run_json(capsys, root, "ls", "--name", "nobody") == []
    code, out, _ = run(capsys, root, "show", "ranker@1")
    assert code == 0 and "weights_sha256" in out


def test_lineage_tree_json_mermaid(capsys, root, populated):
    a, b, c = populated
    code, out, _ = run(capsys, root, "lineage", "production")
    assert code == 0 and "ancestors" in out and "warm_start" in out and "ranker@1" in out
    data = run_json(capsys, root, "lineage", str(b))
    assert data["ancestors"] == [{"id": a, "depth": 1}] and data["descendants"] == [{"id": c, "depth": 1}]
    code, out, _ = run(capsys, root, "lineage", str(c), "--format", "mermaid")
    assert code == 0 and out.startswith("graph TD") and f"n{b} -->|warm_start| n{c}" in out
    code, _, err = run(capsys, root, "lineage", str(c), "--format", "dot")
    assert code == 2 and "--format" in err


def test_alias_promote_rollback_history(capsys, root, populated):
    a, b, c = populated
    assert run_json(capsys, root, "rollback")["adapter_id"] == a
    assert run_json(capsys, root, "promote", str(b), "--alias", "staging")["adapter_id"] == b
    assert run_json(capsys, root, "alias", "set", "canary", str(c))["adapter_id"] == c
    aliases = run_json(capsys, root, "alias")
    assert {r["alias"]: r["adapter_id"] for r in aliases} == {"production": a, "staging": b, "canary": c}
    hist = run_json(capsys, root, "history", "production")
    assert [h["action"] for h in hist] == ["promote", "promote", "rollback"]
    assert run_json(capsys, root, "rollback", "production", "--to", str(c))["adapter_id"] == c
    assert run_json(capsys, root, "alias", "rm", "canary")["removed"] is True
    code, out, _ = run(capsys, root, "history")
    assert code == 0 and "staging" in out
    events = run_json(capsys, root, "events", "--limit", "5")
    assert events[0]["operation"] == "remove_alias"


def test_delete_restore_verify_gc_export_import(capsys, root, populated, tmp_path):
    a, b, c = populated
    code, _, err = run(capsys, root, "delete", str(a))
    assert code == 4 and "descendants" in err and err[-1] == "\n" and err.count("\n") == 1
    assert run_json(capsys, root, "delete", str(a), "--force")["status"] == "deleted"
    assert run_json(capsys, root, "restore", str(a))["status"] == "active"
    assert run_json(capsys, root, "verify")["ok"] is True
    assert run(capsys, root, "verify")[0] == 0
    assert run_json(capsys, root, "gc", "--dry-run")["actions"] == []
    out_dir = tmp_path / "exp"
    assert run_json(capsys, root, "export", str(c), str(out_dir))["folder"] == str(out_dir)
    imported = run_json(capsys, root, "import", str(out_dir), "--name", "again")
    assert imported["kind"] == "imported" and imported["name"] == "again"
    reg = run_json(capsys, root, "register", str(out_dir), "--name", "viacli", "--parent", f"{c}:warm_start",
                   "--batch", "b1", "--metrics", '{"auc": 0.7}')
    assert reg["metrics"] == {"auc": 0.7}
    stacked = run_json(capsys, root, "stack", str(a), str(c), "--weights", "0.5,0.5", "--mode", "ensemble")
    assert stacked["kind"] == "stack" and stacked["stack_mode"] == "ensemble"
    # break a file: verify exits 1, gc repairs the catalog view
    weights = next((root / "store" / "objects").iterdir()) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, _ = run(capsys, root, "verify")
    assert code == 1 and "checksum_mismatch" in out
    assert run_json(capsys, root, "gc")["actions"]


def test_bases_and_register_base(capsys, root, mgr, tmp_path):
    folder = tmp_path / "tinybase"
    tiny_bert(3).save_pretrained(str(folder))
    out = run_json(capsys, root, "register-base", str(folder), "--name", "tb")
    assert out["name"] == "tb" and out["id"].startswith("base-")
    assert [b["name"] for b in run_json(capsys, root, "bases")] == ["tb"]


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["show", "999"], 3, "no adapter with id 999"),
        (["show", "nope"], 3, "no adapter, alias or name 'nope'"),
        (["promote", "1", "--alias", "Bad Alias"], 2, "invalid alias"),
        (["rollback", "ghost"], 3, "no alias 'ghost'"),
        (["import", "/definitely/missing"], 3, "does not exist"),
        (["export", "1", "/tmp/x"], 3, "no adapter with id 1"),
        (["ls", "--kind", "weird"], 2, "invalid kind"),
        (["register", "/definitely/missing", "--name", "x"], 3, "does not exist"),
        (["register", ".", "--name", "x", "--metrics", "{bad"], 2, "not valid JSON"),
        (["ls", "--nope"], 2, "No such option"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(capsys, root, mgr, args, code, needle):
    got, out, err = run(capsys, root, *args)
    assert got == code, (out, err)
    assert needle in err
    assert "Traceback" not in err and "Traceback" not in out


def test_console_script_runs_and_debug_shows_traceback(root, mgr):
    exe = [sys.executable, "-m", "adapters_mgr.cli.main", "--root", str(root)]
    ok = subprocess.run([*exe, "ls", "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout) == []
    bad = subprocess.run([*exe, "show", "42"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3
    assert bad.stderr.strip() == "error: no adapter with id 42; list them with `adapters-mgr ls`"
    dbg = subprocess.run([*exe, "--debug", "show", "42"], capture_output=True, text=True, timeout=120)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


def test_model_registered_in_python_is_visible_in_cli(capsys, root, mgr, base_id):
    aid = mgr.register(lora_model(tiny_bert(0), seed=4), name="py", metrics={"auc": 0.61})
    row = run_json(capsys, root, "show", "py")
    assert row["id"] == aid and row["metrics"]["auc"] == 0.61


def test_train_has_an_option_per_update_config_field_and_passes_it_on(capsys, root, mgr, monkeypatch):
    code, out, err = run(capsys, root, "train", "--help")
    assert code == 0, err
    names = [f.name for f in dataclasses.fields(UpdateConfig)]
    assert [n for n in names if f"--{n.replace('_', '-')}" not in out] == []
    assert "…" not in out  # no option name cut to an ellipsis (help is rendered 80 columns wide here)

    seen: list[dict] = []

    def fake_train_update(self, batches="latest", **kwargs):
        seen.append({"batches": batches, **kwargs})
        return SimpleNamespace(node_id=1, adapter_id=1)

    monkeypatch.setattr(AdapterManager, "train_update", fake_train_update)
    code, out, err = run(capsys, root, "train", "b1", "--dropout", "0.1", "--target-modules", "query",
                         "--replay-recency", "4", "--rank", "4", "--json")
    assert code == 0, err
    (call,) = seen
    assert call["batches"] == ["b1"] and call["dropout"] == 0.1 and call["target_modules"] == ("query",)
    assert call["replay_recency"] == 4 and call["rank"] == 4
    defaults = UpdateConfig()
    untouched = set(names) - {"dropout", "target_modules", "replay_recency", "rank"}
    assert {n: call[n] for n in untouched} == {n: getattr(defaults, n) for n in untouched}
    assert run(capsys, root, "train", "--replay-recency", "28d", "--json")[0] == 0
    assert seen[-1]["batches"] == "latest" and seen[-1]["replay_recency"] == "28d"
    assert seen[-1]["target_modules"] == ("query", "value")
    code, _, err = run(capsys, root, "train", "--dropout", "-0.5")
    assert code == 2 and "--dropout" in err and len(seen) == 2
