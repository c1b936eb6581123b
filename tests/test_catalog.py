from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from adapters_mgr import AdapterManager, Conflict, IntegrityError, InvalidInput, NotFound
from tests.conftest import lora_model, sample_inputs, tiny_bert
from tests.helpers import add_batch, chain


def test_same_bytes_stored_once_and_retry_is_idempotent(mgr, base_id):
    model = lora_model(tiny_bert(0), seed=5)
    a = mgr.register(model, name="ranker")
    assert mgr.register(model, name="ranker") == a  # a retry returns the same node
    b = mgr.register(model, name="other")  # another name: new node, same folder
    assert b != a
    assert mgr.get(a).store_key == mgr.get(b).store_key
    assert len(mgr.store.keys()) == 1
    c = mgr.register(lora_model(tiny_bert(0), seed=6), name="ranker")
    assert mgr.get(c).version == 2 and len(mgr.store.keys()) == 2


def test_tampered_weights_are_refused_with_adapter_and_file_named(mgr, base_id):
    aid = mgr.register(lora_model(tiny_bert(0), seed=5), name="ranker")
    weights = mgr.store.path(mgr.get(aid).store_key) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        mgr.load(aid)
    assert f"adapter {aid}" in str(err.value) and "adapter_model.safetensors" in str(err.value)
    report = mgr.verify()
    assert not report["ok"] and report["problems"][0]["kind"] == "checksum_mismatch"
    mgr.gc()
    assert mgr.get(aid).status == "corrupt"
    assert mgr.verify()["ok"]


def test_tampered_config_is_refused(mgr, base_id):
    aid = mgr.register(lora_model(tiny_bert(0), seed=5), name="ranker")
    cfg = mgr.store.path(mgr.get(aid).store_key) / "adapter_config.json"
    data = json.loads(cfg.read_text())
    data["lora_alpha"] = 1000
    cfg.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="config"):
        mgr.load(aid)


def test_wrong_base_is_refused_unless_forced(mgr, base_id):
    aid = mgr.register(lora_model(tiny_bert(0), seed=5), name="ranker")
    other = tiny_bert(seed=99)
    with pytest.raises(IntegrityError, match="differ"):
        mgr.load(aid, base_model=other)
    model = mgr.load(aid, base_model=tiny_bert(seed=99), force=True)
    assert model is not None
    forced = [e for e in mgr.events(limit=10) if e["outcome"] == "forced"]
    assert forced and forced[0]["operation"] == "load"


def test_registering_on_an_unregistered_base_is_refused(mgr, base_id):
    with pytest.raises(NotFound, match="register_base"):
        mgr.register(lora_model(tiny_bert(seed=42), seed=5), name="ranker")


def test_pickle_adapter_is_refused(mgr, base_id, tmp_path):
    folder = tmp_path / "pickled"
    lora_model(tiny_bert(0), seed=5).save_pretrained(str(folder), safe_serialization=False)
    assert (folder / "adapter_model.bin").exists()
    with pytest.raises(InvalidInput, match="pickle"):
        mgr.register(folder, name="ranker", base=base_id)
    assert mgr.list() == [] and mgr.store.tmp_dirs() == []


def test_register_from_folder_infers_base_and_equals_original(mgr, base_id, tmp_path):
    model = lora_model(tiny_bert(0), seed=7)
    folder = tmp_path / "mine"
    model.save_pretrained(str(folder))
    aid = mgr.register(folder, name="mine", base="tiny-bert", metrics={"auc": 0.5})
    x = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(mgr.load(aid)(**x).logits, model(**x).logits)


def test_shared_base_switches_between_adapters(mgr, base_id):
    m1, m2 = lora_model(tiny_bert(0), seed=1), lora_model(tiny_bert(0), seed=2)
    a1, a2 = mgr.register(m1, name="a"), mgr.register(m2, name="b")
    x = sample_inputs()
    with torch.no_grad():
        e1, e2 = m1(**x).logits, m2(**x).logits
        l1 = mgr.load(a1)(**x).logits
        shared = mgr.load(a2)
        l2 = shared(**x).logits
        assert mgr.load(a1) is shared  # one base, several adapters
        l1_again = shared(**x).logits
    torch.testing.assert_close(l1, e1)
    torch.testing.assert_close(l2, e2)
    torch.testing.assert_close(l1_again, e1)
    assert not torch.allclose(e1, e2)


def test_lineage_depth_relations_and_batches(mgr, base_id):
    add_batch(mgr, "b1")
    add_batch(mgr, "b2")
    ids = chain(mgr, 5)
    m = lora_model(tiny_bert(0), seed=50)
    leaf = mgr.register(m, name="ranker", parents=[(ids[-1], "warm_start")], batches=["b1"], eval_batches=["b2"])
    st = mgr.stack([ids[1], leaf], [0.5, 1.5], "ensemble")
    lin = mgr.lineage(leaf)
    assert lin.ancestors == {ids[4]: 1, ids[3]: 2, ids[2]: 3, ids[1]: 4, ids[0]: 5}
    assert lin.descendants == {st: 1}
    assert {(b["batch_id"], b["role"]) for b in lin.batches[leaf]} == {("b1", "train"), ("b2", "eval")}
    assert all(e.relation == "warm_start" for e in lin.edges if e.child_id != st)
    stack_edges = sorted((e.parent_id, e.relation, e.weight, e.ord) for e in lin.edges if e.child_id == st)
    assert stack_edges == [(leaf, "stacked_on", 1.5, 1)]
    # From the middle: both directions, depth-limited.
    mid = mgr.lineage(ids[2], depth=1)
    assert set(mid.ancestors) == {ids[1]} and set(mid.descendants) == {ids[3]}
    full = mgr.lineage(ids[1])
    assert set(full.descendants) == {ids[2], ids[3], ids[4], leaf, st}
    assert full.descendants[st] == 1  # stack uses ids[1] directly
    mermaid = lin.to_mermaid()
    assert f"n{ids[4]} -->|warm_start| n{leaf}" in mermaid and "batch b1" in mermaid
    assert mgr.get(st).stack_mode == "ensemble"


def test_unknown_parent_or_batch_fails_before_anything_is_stored(mgr, base_id):
    model = lora_model(tiny_bert(0), seed=5)
    with pytest.raises(NotFound, match="999"):
        mgr.register(model, name="x", parents=[999])
    with pytest.raises(NotFound, match="nope"):
        mgr.register(model, name="x", batches=["nope"])
    with pytest.raises(InvalidInput, match="relation"):
        mgr.register(model, name="x", parents=[(1, "cousin")]) if mgr.list() else mgr.register(
            model, name="x", parents=[(mgr.register(model, name="p"), "cousin")])
    assert mgr.store.tmp_dirs() == []
    assert [a.name for a in mgr.list()] == ["p"]


def test_invalid_names_and_aliases(mgr, base_id):
    model = lora_model(tiny_bert(0), seed=5)
    with pytest.raises(InvalidInput, match="name"):
        mgr.register(model, name="bad name")
    aid = mgr.register(model, name="ok")
    for bad in ("Prod", "1x", "has space", ""):
        with pytest.raises(InvalidInput, match="alias"):
            mgr.promote(aid, bad)


def test_rollback_walks_back_through_history(mgr, base_id):
    a, b, c = chain(mgr, 3)
    for node in (a, b, c):
        mgr.promote(node, "production")
    assert mgr.get("production").id == c
    assert mgr.rollback("production") == b
    assert mgr.rollback("production") == a
    with pytest.raises(Conflict, match="no earlier target"):
        mgr.rollback("production")
    assert mgr.rollback("production", to=c) == c
    assert mgr.get("production").id == c
    hist = mgr.alias_history("production")
    assert [(h["action"], h["from_id"], h["to_id"]) for h in hist] == [
        ("promote", None, a), ("promote", a, b), ("promote", b, c),
        ("rollback", c, b), ("rollback", b, a), ("rollback", a, c),
    ]
    # nothing was deleted along the way
    assert {x.id for x in mgr.list()} == {a, b, c}
    ops = [e["operation"] for e in mgr.events(limit=20)]
    assert ops.count("rollback") >= 3 and "promote" in ops
    assert any(e["outcome"] == "error" and e["operation"] == "rollback" for e in mgr.events(limit=20))


def test_rollback_after_a_removed_alias_starts_a_fresh_history(mgr, base_id):
    a, b, c = chain(mgr, 3)
    mgr.promote(a, "staging")
    mgr.promote(b, "staging")
    mgr.remove_alias("staging")
    with pytest.raises(NotFound, match="staging"):
        mgr.rollback("staging")  # removed: no current target, even though it has history
    mgr.set_alias("staging", c)
    with pytest.raises(Conflict, match="no earlier target"):
        mgr.rollback("staging")  # the moves before the removal do not count
    mgr.promote(a, "staging")
    assert mgr.rollback("staging") == c and mgr.get("staging").id == c


def test_rollback_of_unknown_alias(mgr, base_id):
    with pytest.raises(NotFound, match="staging"):
        mgr.rollback("staging")


def test_soft_delete_rules(mgr, base_id):
    a, b = chain(mgr, 2)
    mgr.promote(b, "production")
    with pytest.raises(Conflict, match="descendants"):
        mgr.delete(a)
    with pytest.raises(Conflict, match="alias production"):
        mgr.delete(b)
    mgr.promote(a, "production")
    mgr.delete(b)
    assert mgr.get(b).status == "deleted"
    assert [x.id for x in mgr.list()] == [a]
    assert {x.id for x in mgr.list(status="all")} == {a, b}
    with pytest.raises(Conflict, match="deleted"):
        mgr.load(b)
    with pytest.raises(Conflict):
        mgr.promote(b, "staging")
    mgr.delete(a, force=True)
    assert mgr.get(a).status == "deleted"
    assert mgr.events(limit=1)[0]["outcome"] == "forced"
    mgr.restore(b)
    assert mgr.get(b).status == "active"
    assert mgr.store.path(mgr.get(a).store_key).exists()  # soft: files stay


def test_list_filters(mgr, base_id):
    a, b = chain(mgr, 2, name="r")
    c = mgr.register(lora_model(tiny_bert(0), seed=77), name="s")
    mgr.promote(b, "production")
    assert [x.id for x in mgr.list(name="r")] == [b, a]
    assert [x.id for x in mgr.list(alias="production")] == [b]
    assert [x.id for x in mgr.list(base="tiny-bert")] == [c, b, a]
    assert mgr.list(kind="merged") == []
    assert mgr.get("r@1").id == a and mgr.get("r@latest").id == b and mgr.get("r").id == b
    with pytest.raises(NotFound):
        mgr.list(base="nope")
    with pytest.raises(InvalidInput):
        mgr.list(kind="weird")


def test_export_import_round_trip(mgr, base_id, tmp_path, root):
    model = lora_model(tiny_bert(0), seed=8)
    aid = mgr.register(model, name="ranker", metrics={"auc": 0.66})
    out = mgr.export(aid, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "adapters_mgr.json"]
    with pytest.raises(InvalidInput, match="not empty"):
        mgr.export(aid, tmp_path / "exported")
    # into a second catalog sharing nothing but the base
    other = AdapterManager(tmp_path / "other")
    other.register_base(tiny_bert(0))
    iid = other.import_peft(out)
    node = other.get(iid)
    assert node.kind == "imported" and node.name == "ranker" and node.metrics == {"auc": 0.66}
    x = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(other.load(iid)(**x).logits, model(**x).logits)
    # importing into the same catalog links to the original
    same = mgr.import_peft(out, name="ranker-copy")
    assert [(e.parent_id, e.relation) for e in mgr.lineage(same).parents_of(same)] == [(aid, "imported")]


def test_verify_and_gc_find_orphans_and_missing_rows(mgr, base_id):
    aid = mgr.register(lora_model(tiny_bert(0), seed=5), name="ranker")
    orphan = mgr.store.path("f" * 64)
    orphan.mkdir(parents=True)
    (orphan / "adapter_model.safetensors").write_bytes(b"x")
    leftover = mgr.store.new_tmp_dir()
    report = mgr.verify()
    assert {p["kind"] for p in report["problems"]} == {"orphan_folder", "staging_leftover"}
    dry = mgr.gc(dry_run=True)
    assert orphan.exists() and len(dry["actions"]) == 2
    mgr.gc(grace=0)  # right after: no other writer
    assert not orphan.exists() and not leftover.exists()
    assert mgr.verify()["ok"]
    import shutil

    shutil.rmtree(mgr.store.path(mgr.get(aid).store_key))
    assert mgr.verify()["problems"][0]["kind"] == "missing"
    mgr.gc()
    assert mgr.get(aid).status == "missing" and mgr.verify()["ok"]


def test_stack_validation(mgr, base_id):
    a, b = chain(mgr, 2)
    with pytest.raises(InvalidInput, match="mode"):
        mgr.stack([a, b], mode="sum")
    with pytest.raises(InvalidInput, match="weights"):
        mgr.stack([a, b], [1.0])
    with pytest.raises(InvalidInput, match="stack node"):
        mgr.adapter_folder(mgr.stack([a, b]))


def test_migrations_recorded_once(mgr, root):
    info = AdapterManager(root).init()
    assert info["migrations"][0] == "m001_core"
    assert len(info["migrations"]) == len(set(info["migrations"]))


def test_base_hash_stable_across_resave(tmp_path):
    from adapters_mgr.lora.base_model import weights_sha256

    model = tiny_bert(0)
    model.save_pretrained(str(tmp_path / "b"))
    from transformers import BertModel

    reloaded = BertModel.from_pretrained(str(tmp_path / "b"))
    assert weights_sha256(model) == weights_sha256(reloaded)
    assert weights_sha256(model) != weights_sha256(tiny_bert(1))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unused.safetensors"))


def test_list_json_matches_python_objects(mgr, base_id):
    a, b = chain(mgr, 2, name="r")
    mgr.promote(b, "production")
    mgr.stack([a, b], [0.3, 0.7])
    for filters in ({}, {"name": "r"}, {"alias": "production"}, {"kind": "stack"}, {"limit": 1}):
        assert json.loads(mgr.list_json(**filters)) == [x.to_dict() for x in mgr.list(**filters)], filters
    assert json.loads(mgr.list_json(name="nobody")) == []
