"""SASRec: its causal mask, and that it learns a planted next-item rule far above chance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from layerviz import metrics
from layerviz.data import CandidateConfig, PrepConfig, build_candidates, prepare
from layerviz.data.formats import RawData
from layerviz.sasrec import SASRec, SASRecConfig, candidate_scores, train_sasrec


def test_causal_mask_hides_later_items():
    torch.manual_seed(0)
    model = SASRec(20, SASRecConfig(max_len=6, hidden=16, heads=2)).eval()
    seq = torch.tensor([[0, 3, 4, 5, 6, 7]])
    other = seq.clone()
    other[0, 4:] = torch.tensor([9, 11])  # change the last two items only
    a, b = model(seq), model(other)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)  # earlier positions never see later items
    assert not torch.allclose(a[0, 4:], b[0, 4:])
    assert torch.all(a[0, 0] == 0)  # padding stays zero


def planted(users: int = 300, items: int = 30, length: int = 12) -> RawData:
    """SYNTHETIC: every user walks the item cycle i -> i+1 from a random start, all ratings 5."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(users):
        start = int(rng.integers(items))
        rows += [(f"u{u}", str((start + t) % items), 5.0, 1000 + t) for t in range(length)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    inter["rating"] = inter["rating"].astype(np.float32)
    its = pd.DataFrame({"item_id": [str(i) for i in range(items)], "title": [f"T{i}" for i in range(items)],
                        "categories": ""})
    return RawData("planted", "test", "items", inter, its)


def test_learns_a_planted_next_item_rule(tmp_path):
    prep = prepare(planted(), PrepConfig(kcore=2, history_len=10), report=None)
    cfg = SASRecConfig(max_len=10, hidden=32, lr=5e-3, max_epochs=60, eval_every=5, patience=3, valid_users=60,
                       negatives=9, max_seconds=60)
    trained = train_sasrec(prep, cfg, candidates_dir=str(tmp_path), report=None)
    cands = build_candidates(prep, CandidateConfig(negatives=9, users=100, split="test"))
    scores = np.stack(candidate_scores(trained, prep, cands, "test"))
    ndcg = metrics.per_user(metrics.pessimistic_ranks(scores, cands["pos_index"].to_numpy()))["ndcg@10"].mean()
    assert ndcg > 0.9 > metrics.chance(10)["ndcg@10"] + 0.4  # chance is 0.39 with 1 + 9
    assert trained.record["best_epoch"] <= trained.record["epochs"] and trained.record["valid_ndcg@10"] > 0.9
    again = train_sasrec(prep, cfg, candidates_dir=str(tmp_path), report=None)  # seeded
    assert np.allclose(np.stack(candidate_scores(again, prep, cands, "test")), scores, atol=1e-5)
