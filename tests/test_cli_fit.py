"""Human tables fit 80 columns without splitting a token; --wide shows every column; --json is
unchanged (issue 16, part 2)."""

from __future__ import annotations

import json
import re

import pytest

from adapters_mgr.cli import render
from tests.test_cli import run
from tests.test_lineage_glance import demo_shaped


@pytest.fixture(autouse=True)
def _eighty_columns(monkeypatch, capsys):
    monkeypatch.setattr(render.console, "_width", 80)
    capsys.readouterr()


def _fits(out: str, width: int = 80) -> list[str]:
    lines = out.splitlines()
    assert lines and max(len(line) for line in lines) <= width, out
    return lines


def _cells(lines: list[str]) -> set[str]:
    return {cell.strip() for line in lines for cell in re.split(r"[│┃]", line)}


def test_ls_fits_80_columns_with_key_cells_whole(capsys, root, mgr, base_id):
    ids = demo_shaped(mgr)
    code, out, err = run(capsys, root, "ls")
    assert code == 0, err
    cells = _cells(_fits(out))
    for node in mgr.list():
        assert {str(node.id), node.ref} <= cells, node.ref  # ids and refs never split
        assert render.primary_metric_text(node.metrics) in cells  # nor metrics
    assert {"production", "retrieval"} <= cells
    assert "hidden at this width:" in out and "--wide" in out
    code, out, err = run(capsys, root, "ls", "--wide")  # every column, at full width
    assert code == 0, err
    header = next(line for line in out.splitlines() if "adapter" in line and "id" in line)
    assert all(col in header for col in ("kind", "task", "status", "created"))
    assert "hidden" not in out
    # --json: unchanged (every field), --fields picks some
    rows = json.loads(run(capsys, root, "ls", "--json")[1])
    assert len(rows) == len(mgr.list()) and "peft_config" in rows[0]
    picked = json.loads(run(capsys, root, "ls", "--json", "--fields", "id,name,aliases")[1])
    assert picked[0] == {"id": ids["stack3"], "name": "ml-ranker-stack", "aliases": ["production"]}
    code, out, err = run(capsys, root, "ls", "--json", "--fields", "id,nme")
    assert code == 2 and err.startswith("error: invalid --fields 'id,nme'") and err.count("\n") == 1
    code, out, err = run(capsys, root, "ls", "--fields", "id")
    assert code == 2 and "--json" in err


def test_show_history_events_fit_80_columns(capsys, root, mgr, base_id):
    ids = demo_shaped(mgr)
    for args in (("show", "production"), ("history",), ("events",), ("alias",), ("bases",)):
        code, out, err = run(capsys, root, *args)
        assert code == 0, (args, err)
        _fits(out)
    out = run(capsys, root, "show", "production")[1]
    assert "b000001–b000003, b000005–b000023 (22), rows=220" in out  # batches as runs
    assert str(ids["stack3"]) in _cells(out.splitlines())


def test_data_tables_fit_80_columns(capsys, tmp_path):
    from adapters_mgr import AdapterManager
    from adapters_mgr.data import synthetic

    root = tmp_path / "root"
    mgr = AdapterManager(root)
    mgr.init()
    synthetic.generate(root / "synthetic", rows=1200, users=30, items=20, seed=0).register(mgr.data)
    code, out, err = run(capsys, root, "data", "sync", "--window", "15m")
    assert code == 0, err
    lines = _fits(out)
    cells = _cells(lines)
    batches = mgr.data.batches()
    for b in batches:
        assert {b["id"], str(b["rows_in"]), str(b["rows_kept"])} <= cells
        assert b["ts_min"].strftime("%Y-%m-%d %H:%M") in cells  # times whole, to the minute
    for args in (("data", "batches"), ("data", "sources"), ("data", "quarantine")):
        code, out, err = run(capsys, root, *args)
        assert code == 0, (args, err)
        _fits(out)
    out = run(capsys, root, "data", "batches", "--wide")[1]
    assert "window" in out and "sources" in out and "hidden" not in out
    assert json.loads(run(capsys, root, "data", "batches", "--json")[1]) == json.loads(
        json.dumps(batches, default=render.json_default))


def test_sync_says_when_a_source_matches_no_file(capsys, tmp_path):
    root = tmp_path / "root"
    pattern = str(tmp_path / "landing" / "*.csv")
    code, out, err = run(capsys, root, "data", "add-source", "land", pattern, "--ts-format", "epoch_s")
    assert code == 0 and "no file matches" in out, err
    code, out, err = run(capsys, root, "data", "sync")
    assert code == 0, err
    assert f"source land: 0 files matched '{pattern}'" in " ".join(out.split())
    report = json.loads(run(capsys, root, "data", "sync", "--json")[1])
    assert report["sources_without_files"] == ["land"]
