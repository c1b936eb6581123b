"""Bad input to `adapters-mgr data ...`: one error line, a non-zero exit, no traceback, nothing stored.

Each case runs the real entry point (``adapters_mgr.cli.main``) on a catalog holding one synced
source, and checks that ``data sources --json`` and the quarantine are the same afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from adapters_mgr.data.classify import RULES
from tests.test_cli import run

EVENTS = "user_id,item_id,rating,ts\nu1,i1,5,1000\nu2,i2,9,2000\nu3,i3,4,3000\n"


@pytest.fixture
def setup(capsys, tmp_path):
    """(root, folder): a catalog with source 'ev' synced once (one row quarantined), and a data folder."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ev.csv").write_text(EVENTS)
    root = tmp_path / "root"
    ok(capsys, root, "data", "add-source", "ev", str(data / "ev.csv"), "--ts-format", "epoch_s")
    ok(capsys, root, "data", "sync")
    return root, data


def ok(capsys, root: Path, *args: str) -> str:
    code, out, err = run(capsys, root, *args)
    assert code == 0, (args, out, err)
    return out


def stored(capsys, root: Path) -> tuple[list, list]:
    """What a failing command must leave alone: the sources and the quarantine."""
    return (json.loads(ok(capsys, root, "data", "sources", "--json")),
            json.loads(ok(capsys, root, "data", "quarantine", "--json")))


def fails(capsys, root: Path, *args: str, mentions: str | list[str]) -> str:
    """Run a command that must fail cleanly; return its one error line."""
    before = stored(capsys, root)
    code, out, err = run(capsys, root, *args)
    assert code != 0, (args, out)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, (args, err)
    line = lines[0]
    assert line.startswith("error: "), line
    for text in [mentions] if isinstance(mentions, str) else mentions:
        assert text in line, (text, line)
    assert stored(capsys, root) == before, args
    return line


# 1. strptime patterns are tried when the source is added, not at the first sync

@pytest.mark.parametrize("pattern", ["%Q%Q", "%Y-%m-%d %", "%d/%m/%Y %s"])
def test_bad_strptime_pattern_refused_at_add_source(capsys, setup, pattern):
    root, data = setup
    fails(capsys, root, "data", "add-source", "new", str(data / "ev.csv"), "--ts-format", pattern,
          mentions=[repr(pattern), "strptime"])
    # replacing an existing source with a bad pattern leaves the stored one as it was
    fails(capsys, root, "data", "add-source", "ev", str(data / "ev.csv"), "--ts-format", pattern, "--replace",
          mentions=repr(pattern))


def test_good_strptime_pattern_still_accepted_and_synced(capsys, setup):
    root, data = setup
    (data / "dm.csv").write_text("user_id,item_id,rating,ts\nu9,i9,4,31/01/2024 12:30\n")
    ok(capsys, root, "data", "add-source", "dm", str(data / "dm.csv"), "--ts-format", "%d/%m/%Y %H:%M")
    out = json.loads(ok(capsys, root, "data", "sync", "--source", "dm", "--json"))
    assert [d["rows_kept"] for d in out["details"]] == [1]


# 2. --mapping must be an object of canonical field -> column name

@pytest.mark.parametrize(("kind", "mapping", "mentions"), [
    ("interactions", '["x"]', "['x']"),
    ("interactions", '"user_id"', "'user_id'"),
    ("interactions", "5", "mapping 5"),
    ("interactions", '{"user_id": 5}', "got 5"),
    ("interactions", '{"user_id": ["uid"]}', "['uid']"),
    ("interactions", '{"nonsense": "user_id"}', "'nonsense'"),
    ("users", '{"": "user_id"}', "''"),
])
def test_bad_mapping_is_one_line(capsys, setup, kind, mapping, mentions):
    root, data = setup
    line = fails(capsys, root, "data", "add-source", "new", str(data / "ev.csv"), "--kind", kind,
                 "--mapping", mapping, mentions=mentions)
    assert "mapping" in line and "ValueError" not in line


def test_bad_list_attrs_is_one_line(capsys, setup):
    root, data = setup
    (data / "items.csv").write_text("item_id,title,genres\ni1,A,x|y\n")
    fails(capsys, root, "data", "add-source", "items", str(data / "items.csv"), "--kind", "items",
          "--list-attrs", '["genres"]', mentions="['genres']")


# 3. a plain path must exist; a glob may match nothing yet

def test_missing_plain_path_refused(capsys, setup, tmp_path):
    root, _ = setup
    missing = str(tmp_path / "nonexistent" / "missing.csv")
    fails(capsys, root, "data", "add-source", "a", missing, mentions=[repr(missing), "does not exist"])


def test_folder_as_path_refused(capsys, setup):
    root, data = setup
    fails(capsys, root, "data", "add-source", "a", str(data), "--format", "csv", mentions=[repr(str(data)), "glob"])


def test_glob_matching_nothing_allowed_with_a_note(capsys, setup):
    root, data = setup
    pattern = str(data / "landing" / "*.csv")
    out = ok(capsys, root, "data", "add-source", "land", pattern, "--ts-format", "epoch_s")
    assert "no file matches" in out and pattern in out.replace("\n", "")
    added = json.loads(ok(capsys, root, "data", "add-source", "land2", pattern, "--json"))
    assert added["name"] == "land2" and added["files_matched"] == 0
    assert {"land", "land2"} <= {s["name"] for s in json.loads(ok(capsys, root, "data", "sources", "--json"))}
    # its mapping keys are still checked, files or not
    fails(capsys, root, "data", "add-source", "land3", pattern, "--mapping", '{"who": "uid"}', mentions="'who'")


# 4. unreadable files and DuckDB errors in general: one line, no "LINE 1: ... ^^^"

@pytest.mark.parametrize("name", ["x.parquet", "x.jsonl", "x.json"])
def test_unreadable_file_is_one_line(capsys, setup, name):
    root, data = setup
    (data / name).write_text("this is not the format the name says\n")
    line = fails(capsys, root, "data", "add-source", "x", str(data / name), mentions=[str(data / name), "cannot read"])
    assert "LINE 1" not in line and "^" not in line


def test_duckdb_error_reaching_the_cli_is_one_line(capsys, setup, monkeypatch):
    from adapters_mgr.data.api import DataAPI

    root, _ = setup
    before = stored(capsys, root)
    message = ("Binder Error: Referenced column \"nope\" not found in FROM clause!\n\n"
               "LINE 1: SELECT nope FROM '/data/x.csv'\n               ^^^^")

    def boom(self):
        raise duckdb.BinderException(message)

    monkeypatch.setattr(DataAPI, "sources", boom)
    code, out, err = run(capsys, root, "data", "sources")
    assert code != 0 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and '"nope" not found' in lines[0] and "^" not in lines[0], err
    with pytest.raises(duckdb.BinderException):  # --debug: the original error, traceback and all
        run(capsys, root, "--debug", "data", "sources")
    monkeypatch.undo()
    assert stored(capsys, root) == before


# 5. --limit must be >= 0

@pytest.mark.parametrize("extra", [[], ["--json"], ["--all"]])
def test_negative_limit_refused(capsys, setup, extra):
    root, _ = setup
    fails(capsys, root, "data", "quarantine", "--limit", "-1", *extra, mentions=["--limit -1", ">= 0"])


def test_zero_and_positive_limits_still_work(capsys, setup):
    root, _ = setup
    assert json.loads(ok(capsys, root, "data", "quarantine", "--limit", "0", "--json")) == []
    assert len(json.loads(ok(capsys, root, "data", "quarantine", "--limit", "5", "--json"))) == 1


# 6. --rule must be a rule

@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_unknown_rule_refused_with_the_valid_ones(capsys, setup, extra):
    root, _ = setup
    fails(capsys, root, "data", "quarantine", "--rule", "nonsense", *extra, mentions=["'nonsense'", *RULES])


def test_known_rule_still_filters(capsys, setup):
    root, _ = setup
    rows = json.loads(ok(capsys, root, "data", "quarantine", "--rule", "rating_out_of_range", "--json"))
    assert [r["row"]["rating"] for r in rows] == ["9"]
    assert json.loads(ok(capsys, root, "data", "quarantine", "--rule", "bad_timestamp", "--json")) == []
