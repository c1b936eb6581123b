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
