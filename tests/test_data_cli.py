"""The `data` CLI app, driven through a stand-in CliState whose manager exposes `.data`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from typer.testing import CliRunner

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.cli.data import data_app
from adapters_mgr.data.api import DataAPI


def _obj(root: Path) -> SimpleNamespace:
    data = DataAPI(Catalog(root / "catalog.duckdb"), root)
    manager = SimpleNamespace(data=data)
    return SimpleNamespace(manager=lambda: manager)


def _cli(root: Path):
    """``run(*args) -> output`` for the data app on a catalog under ``root``; asserts exit code 0."""
    runner, obj = CliRunner(), _obj(root)

    def run(*args: str) -> str:
        result = runner.invoke(data_app, list(args), obj=obj, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    return run


def test_cli_add_sync_batches_show_quarantine(tmp_path):
    f = tmp_path / "ev.csv"
    f.write_text("uid,movie,stars,time\nu1,i1,5,1000\nu2,i2,9,2000\nu3,i3,4,900000\n")
    run = _cli(tmp_path / "root")
    run("add-source", "ev", str(f), "--mapping", '{"user_id": "uid", "item_id": "movie", "rating": "stars", '
        '"ts": "time"}', "--ts-format", "epoch_s")
    assert json.loads(run("sources", "--json"))[0]["name"] == "ev"
    out = json.loads(run("sync", "--window", "7d", "--json"))
    assert len(out["batches"]) == 2
    batches = json.loads(run("batches", "--json"))
    assert [b["rows_kept"] for b in batches] == [1, 1]
    shown = json.loads(run("show", batches[0]["id"], "--json"))
    assert shown["quarantined_by_rule"] == {"rating_out_of_range": 1}
    q = json.loads(run("quarantine", "--rule", "rating_out_of_range", "--json"))
    assert q[0]["row"]["stars"] == "9"
    assert "nothing new" in run("sync")
    assert "ev" in run("sources")


def test_quarantine_table_is_capped_json_and_all_are_not(tmp_path):
    from adapters_mgr.cli.render import TABLE_ROWS

    n_bad = TABLE_ROWS + 7
    f = tmp_path / "ev.csv"
    f.write_text("uid,movie,stars,time\nu0,i0,4,1000\n" + "".join(f"u{i},i{i},9,{1000 + i}\n" for i in range(n_bad)))
    run = _cli(tmp_path / "root")
    run("add-source", "ev", str(f), "--mapping", '{"user_id": "uid", "item_id": "movie", "rating": "stars", '
        '"ts": "time"}', "--ts-format", "epoch_s")
    run("sync")
    assert len(json.loads(run("quarantine", "--json"))) == n_bad
    assert len(json.loads(run("quarantine", "--json", "--limit", "3"))) == 3
    capped = run("quarantine")
    assert f"quarantine ({TABLE_ROWS} rows; first {TABLE_ROWS} shown; more exist" in capped
    assert f"quarantine ({n_bad} rows)" in run("quarantine", "--all")
    assert "quarantine (5 rows)" in run("quarantine", "--limit", "5")


def test_templates_cli_show_set_reset_and_bad_input(capsys, tmp_path):
    from adapters_mgr.data.texts import DEFAULT_TEMPLATES
    from tests.test_cli import run as run_main

    root = tmp_path / "root"

    def shown() -> dict:
        code, out, err = run_main(capsys, root, "data", "templates", "--json")
        assert code == 0, err
        return {r["kind"]: r for r in json.loads(out)}

    assert {k: r["template"] for k, r in shown().items()} == DEFAULT_TEMPLATES
    assert all(r["default"] for r in shown().values())
    custom = "{item_stats} Film {title}."
    code, out, err = run_main(capsys, root, "data", "set-template", "item", custom)
    assert code == 0, err
    assert shown()["item"] == {"kind": "item", "template": custom, "default": False}
    assert shown()["user"]["default"]
    code, out, err = run_main(capsys, root, "data", "set-template", "item", "--reset")
    assert code == 0, err
    assert shown()["item"]["template"] == DEFAULT_TEMPLATES["item"]
    for args in (["item", "{title"], ["movie", "x"], ["item"], ["item", "x", "--reset"]):
        code, out, err = run_main(capsys, root, "data", "set-template", *args)
        assert code != 0 and len(err.strip().splitlines()) == 1, (args, err)
    assert shown()["item"]["template"] == DEFAULT_TEMPLATES["item"]  # nothing stored by the failures
