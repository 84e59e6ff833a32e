"""SASRec (Kang and McAuley 2018): the classical sequential recommender every LLM-recommender paper reports.

Causal self-attention over item-ID embeddings, trained on the training split of the same protocol with
binary cross-entropy against one sampled negative per position, early-stopped on validation users'
NDCG@10 (1 + negatives candidates, the LLM's validation lists), and scored on the very candidate lists
the LLM ranks. A compact PyTorch version: RecBole 1.2.1 pins ray<=2.6.3, colorlog==4.7.2 and
colorama==0.4.4 and pulls tensorboard, which do not install cleanly beside this project's stack.

An item the training split never shows (a cold item) keeps its random initial embedding and is never drawn
as a training negative: an ID model knows nothing of it, which is the point of the cold-start comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from layerviz import metrics
from layerviz.data import CandidateConfig, Prepared, candidates_for
from layerviz.training import BestState, Loop


@dataclass
class SASRecConfig:
    """SASRec's architecture and training (the paper's ML-1M settings, with a shorter maximum length)."""

    max_len: int = 50
    """Most recent training items the model reads (the paper used 200 on ML-1M; 50 trains 4x faster)."""
    hidden: int = 50
    """Item and position embedding width."""
    blocks: int = 2
    """Self-attention blocks."""
    heads: int = 1
    """Attention heads."""
    dropout: float = 0.2
    """Dropout on embeddings, attention and feed-forward."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 128
    """Users per training step."""
    max_epochs: int = 200
    """Upper bound on epochs; early stopping usually ends training first."""
    patience: int = 3
    """Stop after this many validations without a better validation NDCG@10 (the best epoch's weights are kept)."""
    eval_every: int = 2
    """Epochs between validations."""
    valid_users: int = 1000
    """Validation users for early stopping (their candidate lists: 1 + negatives, seeded)."""
    negatives: int = 19
    """Negatives of the validation candidate lists."""
    max_seconds: float | None = None
    """Optional time cap on training (None: none). A cap makes the result depend on the machine's speed and
    load, so two runs of one config can differ: bound the work with max_epochs instead."""
    seed: int = 0
    """Fixes initialization, negatives and batch order."""


class SASRec(nn.Module):
    """Item-ID self-attention: ``forward(seqs)`` -> hidden states; ``score(seqs, items)`` -> logits."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.items = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)  # 0: padding
        self.positions = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, cfg.hidden, cfg.dropout, batch_first=True,
                                           norm_first=True, activation="relu")
        self.encoder = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.register_buffer("causal", torch.triu(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded item codes -> (B, T, hidden); position t sees positions <= t only."""
        t = seqs.shape[1]
        keep = (seqs > 0).unsqueeze(-1)
        x = self.items(seqs) * self.items.embedding_dim ** 0.5 + self.positions.weight[-t:]
        x = self.drop(x) * keep
        x = self.encoder(x, mask=self.causal[:t, :t])
        return self.norm(x) * keep

    def score(self, seqs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, T) histories and (B, C) candidate codes -> (B, C) logits from the last position."""
        return torch.einsum("bh,bch->bc", self(seqs)[:, -1], self.items(items))


@dataclass
class Trained:
    """A trained SASRec with its item codes and training record."""

    model: SASRec
    codes: dict[str, int]
    record: dict
    curve: pd.DataFrame


def _pad(seqs: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[row, length - len(s):] = torch.tensor(s)
    return out


def _training_rows(prep: Prepared, codes: dict[str, int]) -> list[list[int]]:
    ev = prep.events[prep.events["split"] == "train"]
    return [[codes[i] for i in g] for _, g in ev.groupby("user_id", sort=True)["item_id"]]


def encode(prep: Prepared, codes: dict[str, int], users, split: str, max_len: int) -> torch.Tensor:
    """Each user's history before the split's target (codes, left-padded to ``max_len``)."""
    hist = prep.histories(split, n=max_len)
    return _pad([[codes[i] for i in hist[u]] for u in users], max_len)


@torch.no_grad()
def candidate_scores(trained: Trained, prep: Prepared, cands: pd.DataFrame, split: str) -> list[np.ndarray]:
    """SASRec's logits for each candidate list (rows of ``cands``), histories as the split defines them."""
    trained.model.eval()
    max_len = trained.model.positions.num_embeddings
    out = []
    for start in range(0, len(cands), 256):
        part = cands.iloc[start:start + 256]
        seqs = encode(prep, trained.codes, part["user_id"], split, max_len)
        items = torch.tensor([[trained.codes[i] for i in c] for c in part["candidates"]])
        out += list(trained.model.score(seqs, items).double().numpy())
    return out


def _epoch(model, loop: Loop, rows, pool, cfg, gen, epoch: int) -> float:
    """One pass over the users in seeded batches: BCE of each next item against one sampled negative."""
    model.train()
    order, total, n = torch.randperm(len(rows), generator=gen), 0.0, 0
    for start in range(0, len(rows), cfg.batch_size):
        batch = [rows[i] for i in order[start:start + cfg.batch_size].tolist()]
        seq = _pad([r[:-1] for r in batch], cfg.max_len)
        pos = _pad([r[1:] for r in batch], cfg.max_len)
        neg = pool[torch.randint(len(pool), pos.shape, generator=gen)] * (pos > 0)
        h = model(seq)
        lp, ln = (h * model.items(pos)).sum(-1), (h * model.items(neg)).sum(-1)
        mask = pos > 0
        loss = (nn.functional.softplus(-lp[mask]).sum() + nn.functional.softplus(ln[mask]).sum()) / mask.sum()
        loop.step(loss, f"epoch {epoch}, users {start}-{start + len(batch) - 1}")
        total, n = total + loss.item() * len(batch), n + len(batch)
    return total / max(1, n)


def validation_ndcg(trained: Trained, prep: Prepared, cands: pd.DataFrame) -> float:
    """Mean NDCG@10 of the validation users on their candidate lists (pessimistic ranks)."""
    scores = np.stack(candidate_scores(trained, prep, cands, "valid"))
    return float(metrics.per_user(metrics.pessimistic_ranks(scores, cands["pos_index"].to_numpy()))["ndcg@10"].mean())


def train_sasrec(prep: Prepared, cfg: SASRecConfig | None = None, candidates_dir: str = "results/candidates",
                 report=print) -> Trained:
    """Train on the training split; keep the weights of the best validation NDCG@10 (``training.Loop``: the
    untrained state at epoch 0 included, early stopping after ``patience`` validations without improvement)."""
    cfg = cfg or SASRecConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    codes = {it: k + 1 for k, it in enumerate(prep.items["item_id"])}
    rows = [r for r in _training_rows(prep, codes) if len(r) > 1]
    pool = torch.tensor([codes[i] for i in prep.items.loc[prep.items["popularity"] > 0, "item_id"]])
    model = SASRec(len(codes), cfg)
    vc, _ = candidates_for(prep, CandidateConfig(cfg.negatives, "uniform", cfg.valid_users, "valid", cfg.seed),
                           candidates_dir)
    trained = Trained(model, codes, {}, pd.DataFrame())
    best = BestState(list(model.parameters()), patience=cfg.patience, at="epoch")
    loop = Loop(best, torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98)),
                lambda: validation_ndcg(trained, prep, vc), what="SASRec training", hint=f"Lower lr (now {cfg.lr:g}).")
    loop.start({"train_loss": np.nan, "seconds": 0.0})
    stopped = loop.run(range(1, cfg.max_epochs + 1),
                       lambda e: {"train_loss": _epoch(model, loop, rows, pool, cfg, gen, e), "seconds": loop.elapsed()},
                       eval_every=cfg.eval_every, last=cfg.max_epochs, max_seconds=cfg.max_seconds,
                       desc="SASRec epochs", unit="epoch", done="max_epochs")
    trained.curve = loop.finish()
    model.eval()
    trained.record = {"config": asdict(cfg), "epochs": int(trained.curve["epoch"].iloc[-1]), "best_epoch": best.at,
                      "valid_ndcg@10": best.value, "valid_users": len(vc), "train_users": len(rows), "stopped": stopped,
                      "seconds": loop.elapsed(), "items": len(codes)}
    if report:
        report(f"SASRec: {trained.record['epochs']} epochs ({stopped}), best validation NDCG@10 {best.value:.4f} at "
               f"epoch {best.at}, {trained.record['seconds']:.0f}s")
    return trained
