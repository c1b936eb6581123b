"""The demo's --quick mode end to end (tiny BERT, synthetic stream): its report agrees with the catalog."""

from __future__ import annotations

import json

from adapters_mgr import AdapterManager
from adapters_mgr.cli.main import main


def test_demo_quick_report_is_consistent_with_the_catalog(tmp_path, capsys):
    root = tmp_path / "demo"
    try:
        main(["--root", str(root), "demo", "--quick"])
    except SystemExit as exc:  # pragma: no cover - main only exits on errors
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    assert "demo finished" in out and "promotion gate" in out
    report_dir = root / "report"
    figures = json.loads((report_dir / "figures.json").read_text())
    assert (report_dir / "metrics.png").stat().st_size > 1000
    assert (report_dir / "lineage.mmd").read_text().startswith("graph TD")
    assert "| week |" in (report_dir / "summary.md").read_text()

    mgr = AdapterManager(root)
    assert figures["production"] == mgr.alias_target("production")
    batches = mgr.data.batches()
    assert len(figures["batches"]) == len(batches)
    assert sum(b["kept"] for b in figures["batches"]) == sum(b["rows_kept"] for b in batches)
    for b in figures["batches"]:
        assert b["rows_in"] == b["kept"] + b["quarantined"] + b["duplicates"]
    assert len(figures["weeks"]) == 3
    for week in figures["weeks"]:
        node = mgr.get(week["node_id"])
        assert node.metrics[week["metric"]] == week["new"]
        gate = node.metrics.get("baseline", {})
        assert week["production"] == gate.get(week["metric"])
        assert 0.0 <= week["stale_initial"] <= 1.0
        # the prior alone on the same rows, as the node's evaluation recorded it (a residual ranker)
        assert isinstance(week["prior_alone"], float) and week["prior_alone"] == node.metrics["prior_auc"]
        assert f"vs prior alone {week['prior_alone']:.4f}" in " ".join(out.split())  # wrapped at 80 columns
    # one figure per node and rows: every figure names its rows; the gate's baseline next week is the
    # demo's "the week after" figure of the node it chose (read back, not evaluated again), and the
    # compaction's stack figure is the gate's figure of that stack on the same rows
    weeks = figures["weeks"]
    for week in weeks:
        assert week["eval_rows"].endswith(f"rows of {week['eval_batch']}")
    for week, nxt in zip(weeks, weeks[1:], strict=False):
        after = week["following"]
        assert after is not None and after["batch"] == nxt["eval_batch"]
        assert after["chosen"] == (week["node_id"] if week["decision"] == "promote" else
                                   mgr.get(week["node_id"]).metrics["baseline"]["node_id"])
        assert nxt["production"] == after["chosen_metric"]
        assert after["gain"] == after["chosen_metric"] - after["other_metric"]
    compaction = figures["compaction"]
    if compaction.get("compacted"):
        last = weeks[-1]
        assert compaction["eval_batches"] == [last["eval_batch"]]
        assert compaction["eval_label"] == last["eval_rows"]
        assert compaction["stack_metric"] == (last["new"] if last["decision"] == "promote" else last["production"])
    twice = mgr.catalog.query("SELECT node_id, examples_sha, max_length, count(*) AS n FROM evaluations "
                              "GROUP BY ALL HAVING n > 1")
    assert twice == [] and mgr.catalog.query("SELECT count(*) AS n FROM evaluations")[0]["n"] >= 6
    assert "the week after" in (report_dir / "summary.md").read_text()
    assert figures["rollback"]["scorer_followed"] is True and figures["rollback"]["outputs_equal"] is True
    recs = figures["recommendations"]
    assert recs["after"]["node_id"] == mgr.alias_target("retrieval") == recs["retriever_update"]
    assert len(mgr.recommendations(alias="retrieval")) == recs["after"]["rows"]
    assert mgr.verify()["ok"]
    # a rerun continues: nothing is trained twice
    before = len(mgr.list(status="all"))
    main(["--root", str(root), "demo", "--quick"])
    assert "already" in capsys.readouterr().out
    rerun = json.loads((report_dir / "figures.json").read_text())
    assert [w["node_id"] for w in rerun["weeks"]] == [w["node_id"] for w in figures["weeks"]]
    assert [w["new"] for w in rerun["weeks"]] == [w["new"] for w in figures["weeks"]]
    ranker_adapters = [a for a in mgr.list(status="all", name="ml-ranker") if a.kind == "trained"]
    assert len(ranker_adapters) == len([a for a in mgr.list(status="all") if a.name == "ml-ranker"]) == 4
    assert len(mgr.list(status="all")) >= before
