"""CLI user experience: user text printed literally, one-line errors, root selection, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from adapters_mgr.cli.main import main
from adapters_mgr.manager import AdapterManager
from tests.conftest import lora_model, tiny_bert
from tests.helpers import add_batch, chain
from tests.test_cli import run


@pytest.fixture(autouse=True)
def _clear_setup_output(capsys):
    capsys.readouterr()


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process without ``--root`` (the caller picks the root by env or cwd)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _lines(*texts: str) -> list[str]:
    return [line for text in texts for line in text.splitlines() if line.strip()]


def _one_line_error(code: int, out: str, err: str, expected_code: int, needle: str) -> str:
    assert code == expected_code, (out, err)
    lines = _lines(out, err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0], lines
    assert "Traceback" not in out + err
    return lines[0]


# ---------------------------------------------------------------- user text is never read as markup
def test_lineage_tree_shows_aliases(capsys, root, mgr, base_id):
    a, b = chain(mgr, 2)
    mgr.promote(b, "production")
    code, out, err = run(capsys, root, "lineage", "production")
    assert code == 0, err
    assert "[production]" in out  # rich used to read it as a tag and drop it
    code, out, err = run(capsys, root, "lineage", str(a))
    assert code == 0, err
    assert "ranker@2" in out and "[production]" in out  # on a descendant line too


def test_bracketed_user_text_prints_literally(capsys, root, mgr, base_id):
    add_batch(mgr, "[wk1]")
    parent = mgr.register(lora_model(tiny_bert(0), seed=2), name="p")
    child = mgr.register(lora_model(tiny_bert(0), seed=3), name="c", parents=[parent], task="[exp]",
                         batches=["[wk1]"], metrics={"[hit]": 0.5})
    mgr.promote(child, "prod", reason="[x]")
    with mgr.catalog.transaction() as con:  # names are validated today; rows written before may not be
        con.execute("UPDATE adapters SET name = 'p[old]' WHERE id = ?", [parent])

    code, out, err = run(capsys, root, "lineage", str(child))
    assert code == 0, err
    for text in ("[exp]", "[prod]", "[hit]=0.5", "train [wk1]", "p[old]@1"):
        assert text in out, (text, out)
    code, out, err = run(capsys, root, "lineage", str(child), "--full")
    assert code == 0 and "[wk1](train)" in out, err
    code, out, err = run(capsys, root, "ls")
    assert code == 0, err
    assert "[exp]" in out and "[hit]=0.5" in out and "p[old]@1" in out
    code, out, err = run(capsys, root, "show", str(child))
    assert code == 0, err
    assert "[wk1]" in out and "[exp]" in out
    code, out, err = run(capsys, root, "history", "prod")
    assert code == 0, err
    assert "[x]" in out
    # emoji codes in user text print as typed, not as emoji
    with mgr.catalog.transaction() as con:
        con.execute("UPDATE adapters SET task = ':fire:' WHERE id = ?", [child])
    for args in (("ls",), ("lineage", str(child)), ("show", str(child))):
        code, out, err = run(capsys, root, *args)
        assert code == 0 and ":fire:" in out and "\N{FIRE}" not in out, (args, out)


def test_lineage_tree_shows_data_batches_and_metrics(capsys, root, mgr, base_id):
    for batch in ("b1", "b2", "b3"):
        add_batch(mgr, batch)
    first = mgr.register(lora_model(tiny_bert(0), seed=2), name="ranker", batches=["b1"], eval_batches=["b2"],
                         metrics={"auc": 0.71})
    second = mgr.register(lora_model(tiny_bert(0), seed=3), name="ranker", parents=[first],
                          batches=[("b2", "train"), ("b1", "replay")], eval_batches=["b3"],
                          metrics={"auc": 0.74, "primary_metric": "auc", "baseline": {"auc": 0.71}})
    code, out, err = run(capsys, root, "lineage", str(first))
    assert code == 0, err
    root_line = next(line for line in out.splitlines() if "ranker@1" in line)
    assert "auc=0.71" in root_line and "train b1 · eval b2" in root_line
    child_line = next(line for line in out.splitlines() if "ranker@2" in line)
    assert "warm_start" in child_line and f"#{second}" in child_line
    assert "auc=0.74 (was 0.71)" in out
    assert "train b2 · eval b3 · replay b1" in " ".join(out.split())  # wrapped at 80 columns
    code, out, err = run(capsys, root, "lineage", str(first), "--full")  # --full: every batch with its role
    assert code == 0, err
    assert "b1(train)" in out and "b2(eval)" in out and "b2(train)" in out and "b1(replay)" in out


@pytest.mark.parametrize("auc, warned", [(0.7912, False), (0.7773, True), (0.7701, True)])
def test_train_shows_the_prior_alone_and_warns_when_the_ranker_adds_nothing(capsys, root, mgr, base_id,
                                                                          monkeypatch, auc, warned):
    figures = {"auc": auc, "prior_auc": 0.7773, "primary_metric": "auc", "n_eval": 100}
    monkeypatch.setattr(AdapterManager, "train_update", lambda self, batches, **kw: SimpleNamespace(
        node_id=7, adapter_id=7, train_batches=["b1"], metrics=figures, baseline=None, decision=None,
        promoted=False, extra=None))
    code, out, err = run(capsys, root, "train", "b1")
    assert code == 0, err
    assert f"auc={auc:.4g} (prior alone 0.7773, {auc - 0.7773:+.4f})" in out
    assert ("warning: node 7 ranks its eval rows no better than its prior alone" in err) == warned
    assert "warning" not in out  # stdout stays what scripts parse
    # the catalog's listings say the same where the figures were recorded
    node = mgr.register(lora_model(tiny_bert(0), seed=2), name="ranker", metrics=figures)
    code, out, err = run(capsys, root, "lineage", str(node))
    assert code == 0 and "(prior alone 0.7773" in out, err


# ---------------------------------------------------------------- Click usage errors: one line, exit 2
@pytest.mark.parametrize(
    "args, needle",
    [
        (["ls", "--limit", "abc"], "Invalid value for '--limit'"),
        (["show"], "Missing argument"),
        (["bogus"], "No such command 'bogus'"),
        (["ls", "--nope"], "No such option"),
        (["alias", "set", "canary"], "Missing argument"),
        (["ls", "--limit", "-1"], "'--limit'"),
        (["events", "--limit", "-1"], "'--limit'"),
        (["lineage", "1", "--depth", "-2"], "'--depth'"),
        (["recommend", "42", "--k", "0"], "'--k'"),
        (["train", "b1", "--rank", "0"], "'--rank'"),
        (["data", "add-source", "s", "x.csv", "--max-events-per-minute", "0"], "'--max-events-per-minute'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(capsys, root, mgr, args, needle):
    line = _one_line_error(*run(capsys, root, *args), 2, needle)
    assert "Usage:" not in line and "--help" in line


def test_usage_errors_in_a_subprocess_are_one_line(root, mgr):
    exe = [sys.executable, "-m", "adapters_mgr.cli.main", "--root", str(root)]
    bad = subprocess.run([*exe, "events", "--limit", "-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert len(_lines(bad.stdout, bad.stderr)) == 1 and "BinderException" not in bad.stderr


def test_help_still_works_and_a_zero_limit_is_fine(capsys, root, mgr):
    code, out, _ = run(capsys, root, "ls", "--help")
    assert code == 0 and "Usage" in out and "--limit" in out
    code, out, _ = run(capsys, root, "--help")
    assert code == 0 and "lineage" in out and "history" in out
    code, out, _ = run(capsys, root, "alias", "set", "--help")
    assert code == 0 and "Usage" in out
    assert run(capsys, root, "events", "--limit", "0", "--json")[1].strip() == "[]"
    assert run(capsys, root, "ls", "--limit", "0", "--json")[1].strip() == "[]"


# ---------------------------------------------------------------- history of an unknown alias
def test_history_of_an_alias_that_never_existed_is_not_found(capsys, root, mgr, base_id):
    _one_line_error(*run(capsys, root, "history", "ghost"), 3, "ghost")
    _one_line_error(*run(capsys, root, "history", "ghost", "--json"), 3, "ghost")
    _one_line_error(*run(capsys, root, "history", "Bad Alias"), 2, "invalid alias")
    (a,) = chain(mgr, 1)
    mgr.promote(a, "canary")
    mgr.remove_alias("canary")
    code, out, err = run(capsys, root, "history", "canary", "--json")  # removed, not unknown: its moves stay
    assert code == 0, err
    assert [h["action"] for h in json.loads(out)] == ["promote", "remove"]
    code, out, err = run(capsys, root, "history", "--json")  # no alias given: all of them (none is fine)
    assert code == 0 and len(json.loads(out)) == 2


# ---------------------------------------------------------------- where the root is
def _catalog(info: dict) -> Path:
    return Path(info["catalog"]).resolve()


def test_root_from_the_environment_when_no_option(capsys, tmp_path, monkeypatch):
    env_root, cwd = tmp_path / "envroot", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("ADAPTERS_MGR_ROOT", str(env_root))
    code, out, err = _main(capsys, "init", "--json")
    assert code == 0, err
    assert _catalog(json.loads(out)) == (env_root / "catalog.duckdb").resolve()
    assert (env_root / "catalog.duckdb").is_file()
    code, out, err = _main(capsys, "ls", "--json")
    assert code == 0 and json.loads(out) == [], err
    assert not (cwd / ".adapters").exists()


def test_root_defaults_to_dot_adapters_in_the_current_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTERS_MGR_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, "init", "--json")
    assert code == 0, err
    assert _catalog(json.loads(out)) == (tmp_path / ".adapters" / "catalog.duckdb").resolve()
    assert (tmp_path / ".adapters" / "catalog.duckdb").is_file()
    code, out, err = _main(capsys, "ls", "--json")
    assert code == 0 and json.loads(out) == [], err


def test_root_option_wins_over_the_environment(capsys, tmp_path, monkeypatch):
    env_root, opt_root = tmp_path / "envroot", tmp_path / "optroot"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERS_MGR_ROOT", str(env_root))
    code, out, err = _main(capsys, "--root", str(opt_root), "init", "--json")
    assert code == 0, err
    assert _catalog(json.loads(out)) == (opt_root / "catalog.duckdb").resolve()
    assert (opt_root / "catalog.duckdb").is_file()
    assert not env_root.exists() and not (tmp_path / ".adapters").exists()


# ---------------------------------------------------------------- error exits and --json outputs
def test_alias_errors_exit_with_their_codes(capsys, root, mgr, base_id):
    (a,) = chain(mgr, 1)
    _one_line_error(*run(capsys, root, "alias", "set", "Bad Alias", str(a)), 2, "invalid alias")
    _one_line_error(*run(capsys, root, "alias", "set", "canary", "999"), 3, "999")
    _one_line_error(*run(capsys, root, "alias", "set", "canary", "nobody"), 3, "nobody")
    _one_line_error(*run(capsys, root, "alias", "rm", "ghost"), 3, "no alias 'ghost'")
    _one_line_error(*run(capsys, root, "alias", "rm", "Bad Alias"), 2, "invalid alias")
    code, out, err = run(capsys, root, "alias", "--json")
    assert code == 0 and json.loads(out) == [], err


def test_init_and_gc_json_is_json(capsys, root, mgr):
    code, out, err = run(capsys, root, "init", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert Path(info["root"]).resolve() == root.resolve() and info["migrations"]
    assert Path(info["catalog"]).is_file()
    code, out, err = run(capsys, root, "gc", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert isinstance(report["actions"], list)
    code, out, err = run(capsys, root, "gc", "--dry-run", "--json")
    assert code == 0 and isinstance(json.loads(out)["actions"], list), err


@pytest.mark.parametrize("command", [["import"], ["register", "--name", "pickled"]])
def test_a_pickle_adapter_folder_is_refused(capsys, root, mgr, base_id, tmp_path, command):
    folder = tmp_path / "pickled"
    lora_model(tiny_bert(0), seed=5).save_pretrained(str(folder))
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle of 1: never loaded
    code, out, err = run(capsys, root, *command[:1], str(folder), *command[1:])
    _one_line_error(code, out, err, 2, "pickle")
    assert run(capsys, root, "ls", "--json")[1].strip() == "[]"


def test_a_locked_catalog_exits_6_with_one_line(root, mgr):
    catalog = root / "catalog.duckdb"
    assert catalog.is_file()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, duckdb; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); time.sleep(60)",
         str(catalog)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        env = {**os.environ, "ADAPTERS_MGR_LOCK_TIMEOUT": "0.5"}
        env.pop("ADAPTERS_MGR_DEBUG", None)
        got = subprocess.run([sys.executable, "-m", "adapters_mgr.cli.main", "--root", str(root), "ls", "--json"],
                             capture_output=True, text=True, timeout=120, env=env)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert got.returncode == 6, (got.stdout, got.stderr)
    lines = _lines(got.stdout, got.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "locked" in lines[0], lines
