"""Three LLM scorers with one interface: score(model, tokenizer, requests, config) -> scores.

* ``likelihood``: mean log-prob of the candidate title's tokens given the history prompt;
  by default calibrated (``calibration='pmi'``) by subtracting the same quantity with an
  empty history, so that titles which are merely easy to spell out (long templated
  accessory names) do not win: measured on the demo data with SmolLM2, the raw mean
  log-prob ranks *below* chance, the calibrated one well above it.
* ``yesno``: TALLRec-style log P(Yes) - log P(No) at the answer position.
* ``embedding``: cosine between mean-pooled final hidden states of user prompt and item title.

Speed: each user's candidates are packed behind one copy of its history in one sequence,
under a block attention mask (``arch.packed_masks``: a candidate sees the history and its own
earlier tokens; positions restart after the history), several users per forward pass. Models
whose attention takes no custom mask fall back to encoding the history once and running the
candidates in right-padded batches behind a copy of its KV cache. Only the rows of the LM head
that are needed are computed: Yes/No rows for ``yesno``; for ``likelihood`` the full vocabulary
only at title positions, in bounded chunks.

The model can be any HF causal LM that ``layerviz.arch`` understands; everything goes
through ``arch.parts(model)``, so compact models built on the same parts work unchanged.
"""

from __future__ import annotations

import copy
import logging
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from layerviz import arch, passes
from layerviz.data.prompts import Prompt, yes_no_ids
from layerviz.progress import progress

log = logging.getLogger(__name__)

SCORERS = ("likelihood", "yesno", "embedding")

@dataclass
class ScoringConfig:
    """How candidates are scored."""

    scorer: str = "likelihood"
    """'likelihood', 'yesno' or 'embedding'."""
    domain: str = "products"
    """The item noun of the prompts: 'products' and 'movies' have their own wording, any other plural
    ('games', 'artists', or 'game/games') a generic one (``prompt_text``)."""
    max_title_tokens: int = 32
    """Each title is cut to at most this many tokens, in the history and as a candidate."""
    batch_size: int | None = None
    """Candidates per forward pass; None: 64 on CPU, 256 on CUDA, halved on CUDA OOM."""
    calibration: str = "pmi"
    """likelihood only: 'pmi' subtracts log p(title | no history); 'none' keeps the raw mean log-prob."""
    packed: bool | None = None
    """Pack each user's candidates behind its history in one sequence with a block attention mask.
    None: wherever the model's attention takes the mask (else the KV-cache batches, with a debug log line)."""
    row_tokens: int | None = None
    """Longest packed sequence; a user whose prompt is longer is split into rows that repeat the history.
    None: 1024 on CPU (benchmarks/bench_scoring.py --sweep; README), 4096 on CUDA (not measured)."""


@dataclass
class Request:
    """One user's history titles (oldest first) and candidate titles to score."""

    history: list[str]
    candidates: list[str]


def _device(model) -> torch.device:
    return arch.input_device(model)


def _batch_size(cfg: ScoringConfig, device: torch.device) -> int:
    return cfg.batch_size or (256 if device.type == "cuda" else 64)


def pad_right(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, (n, max_len) each: real tokens keep positions 0..len-1."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _batched(run, items: list, batch: int, device: torch.device, lengths: list[int] | None = None,
             max_tokens: int | None = None) -> list:
    """``run(chunk)`` over items, results in input order.

    With ``lengths``, items are sorted by length and batches are cut at ``max_tokens``
    padded tokens too, so little compute goes to padding. On CUDA out-of-memory the
    batch is halved and retried.
    """
    order = sorted(range(len(items)), key=lambda i: lengths[i]) if lengths else list(range(len(items)))
    out: list = [None] * len(items)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and j - i < batch and (
            not (lengths and max_tokens) or (j + 1 - i) * lengths[order[j]] <= max_tokens
        ):
            j += 1
        try:
            for k, r in zip(order[i:j], run([items[k] for k in order[i:j]]), strict=True):
                out[k] = r
            i = j
        except torch.OutOfMemoryError:
            if device.type != "cuda" or batch == 1:
                raise
            torch.cuda.empty_cache()
            batch = max(1, min(batch, j - i) // 2)
            max_tokens = max_tokens // 2 if max_tokens else None
    return out


def _max_tokens(device: torch.device) -> int:
    # CPU is compute-bound: small length-sorted batches waste least on padding
    return 1 << 15 if device.type == "cuda" else 256


class _Prefix:
    """A history prefix encoded once; suffix batches run behind a copy of its KV cache."""

    def __init__(self, model, prefix: list[int]):
        self.model, self.dev = model, _device(model)
        self.head, self.last = prefix[:-1], prefix[-1]  # the last token is re-fed with each suffix
        ids = torch.tensor([self.head], device=self.dev)
        _, self.cache = arch.run_decoder(model, ids, torch.ones_like(ids), use_cache=True)

    def hidden(self, suffixes: list[list[int]], pad: int, reuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (post-norm) hidden states of [last prefix token] + suffix, and the suffix mask.

        ``reuse=False`` consumes the prefix cache instead of copying it (one suffix batch per
        prefix, as in training: the cache then carries gradients, which deepcopy refuses).
        """
        seqs = [[self.last, *s] for s in suffixes]
        ids, mask = pad_right(seqs, pad, self.dev)
        cache = copy.deepcopy(self.cache) if reuse else self.cache
        cache.batch_repeat_interleave(len(seqs))
        full_mask = torch.cat([torch.ones((len(seqs), len(self.head)), dtype=mask.dtype, device=self.dev), mask], 1)
        hidden, _ = arch.run_decoder(self.model, ids, full_mask, cache=cache, use_cache=True)
        return hidden, mask


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, vocab_block: int | None = None,
                   max_rows: int = 4096, rows: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets), (n,): post-norm hidden states through the LM head, one block of vocabulary rows at a time.

    ``rows`` (n,) names the row of ``hidden`` that predicts each target (default: row i predicts target i),
    so a state that predicts several targets (every candidate's first title token after a shared history)
    goes through the head once. The log-normalizer is accumulated over blocks of ``vocab_block`` head rows
    (online logsumexp): each head row is read once per ``max_rows`` hidden rows rather than once per small
    chunk of rows, and no (rows, vocab) matrix is held. Measured on this 2-core CPU
    (``benchmarks/bench_scoring.py --head``): Gemma-3-270M's 262144 x 640 head runs 1.8-2.6x faster than
    64-row chunks through the full vocabulary, SmolLM2's 1.5-1.6x; 1024-row blocks were within 10% of the
    best of 512-4096 everywhere. Differentiable.
    """
    head = arch.lm_head(model)
    with arch.materialized(head):  # an offloaded head is loaded once, not once per block
        return _token_logprobs(model, hidden.to(head.weight.device), targets.to(head.weight.device), vocab_block,
                               max_rows, rows).to(hidden.device)


def _token_logprobs(model, hidden, targets, vocab_block, max_rows, rows):
    vocab = arch.lm_head(model).out_features
    block = vocab_block or (1024 if hidden.device.type == "cpu" else 32768)  # CUDA: not measured
    rows = torch.arange(len(targets), device=hidden.device) if rows is None else rows.to(hidden.device)
    norm = []
    for i in range(0, len(hidden), max_rows):
        h = hidden[i : i + max_rows]
        top = torch.full((len(h),), -torch.inf, device=h.device)
        total = torch.zeros(len(h), device=h.device)
        for j in range(0, vocab, block):
            logits = arch.logits(model, h, slice(j, j + block)).float()
            new_top = torch.maximum(top, logits.amax(1))
            total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(1)
            top = new_top
        norm.append(top + total.log())
    if not norm:
        return hidden.new_zeros(0)
    return arch.target_logits(model, hidden[rows], targets).float() - torch.cat(norm)[rows]


def suffix_scores(model, text: Prompt, prefix: _Prefix, titles: list[str], scorer: str,
                  reuse: bool = True) -> torch.Tensor:
    """Raw scores of ``titles`` behind one encoded prefix, (n,) float: differentiable.

    likelihood: mean log-prob of the title tokens; yesno: log P(Yes) - log P(No) at the answer.
    """
    pad = text.tok.pad_token_id
    suffixes = [text.block(t, scorer) for t in titles]
    hidden, mask = prefix.hidden(suffixes, pad, reuse)
    ids, _ = pad_right([[prefix.last, *x] for x in suffixes], pad, prefix.dev)
    return _suffix_scores_from_hidden(model, text, hidden, ids, mask, scorer)


def _suffix_scores_from_hidden(model, text: Prompt, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                               scorer: str) -> torch.Tensor:
    """Scores (rows,) from the hidden states of right-padded [last prefix token] + suffix rows."""
    if scorer == "likelihood":
        # position j predicts suffix token j + 1 (position 0 is the re-fed last prefix token)
        valid = mask[:, 1:].bool()
        lp = token_logprobs(model, hidden[:, :-1][valid], ids[:, 1:][valid])
        per = torch.zeros(valid.shape, dtype=lp.dtype, device=lp.device)
        per[valid] = lp
        return per.sum(1) / valid.sum(1)
    last = hidden[torch.arange(len(hidden), device=hidden.device), mask.sum(1) - 1]  # answer position
    two = arch.logits(model, last, list(yes_no_ids(text.tok))).float()
    return two[:, 0] - two[:, 1]  # = log P(Yes) - log P(No)


def shared_prefix_scores(model, text: Prompt, history: list[str], titles: list[str],
                         scorer: str = "likelihood") -> torch.Tensor:
    """Raw scores of one user's candidates, (n,) float, with gradients when enabled.

    The history is encoded once and its KV cache expanded over the candidates, so a
    training step pays for the history once, not once per candidate.
    """
    ids = text.prefix(history, scorer)
    return suffix_scores(model, text, _Prefix(model, ids), titles, scorer, reuse=False)


def batched_prefix_scores(model, text: Prompt, histories: list[list[str]], candidates: list[list[str]],
                          scorer: str = "likelihood") -> torch.Tensor:
    """Raw scores (B, n) of n candidates for each of B histories in two passes, with gradients when enabled.

    The B history prefixes run in one left-padded pass (position ids follow the real tokens); the
    cache is expanded n times per row and all B*n suffixes run in a second pass behind it. Same
    numbers as ``shared_prefix_scores`` per user (tested), with larger matrix products: what makes
    a CPU training step fast.
    """
    n = len(candidates[0])
    if any(len(c) != n for c in candidates):
        raise ValueError("batched_prefix_scores needs the same number of candidates for every history")
    dev, pad = _device(model), text.tok.pad_token_id
    prefixes = [text.prefix(h, scorer) for h in histories]
    heads = [p[:-1] for p in prefixes]
    width = max(len(h) for h in heads)
    ids = torch.full((len(heads), width), pad, dtype=torch.long)
    mask, pos = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, h in enumerate(heads):  # left padding: every prefix ends where the suffixes start
        ids[b, width - len(h):], mask[b, width - len(h):] = torch.tensor(h), 1
        pos[b, width - len(h):] = torch.arange(len(h))
    _, cache = arch.run_decoder(model, ids.to(dev), mask.to(dev), use_cache=True, position_ids=pos.to(dev))
    cache.batch_repeat_interleave(n)
    suffixes = [[p[-1], *text.block(t, scorer)]
                for p, cands in zip(prefixes, candidates, strict=True) for t in cands]
    s_ids, s_mask = pad_right(suffixes, pad, dev)
    full_mask = torch.cat([mask.to(dev).repeat_interleave(n, 0), s_mask], 1)
    s_pos = torch.tensor([len(h) for h in heads], device=dev).repeat_interleave(n)[:, None] + torch.arange(
        s_ids.shape[1], device=dev)[None]
    hidden, _ = arch.run_decoder(model, s_ids, full_mask, cache=cache, use_cache=True, position_ids=s_pos)
    return _suffix_scores_from_hidden(model, text, hidden, s_ids, s_mask, scorer).view(len(histories), n)


@dataclass
class _Row:
    """One packed sequence: a user's prefix, then some of its candidates' blocks back to back."""

    user: int
    ids: list[int]
    segment: list[int]  # 0: prefix, b: the b-th block of this row
    position: list[int]  # position in the block's own prompt (prefix, then block)
    blocks: list[tuple[int, int, int]]  # (candidate index, first slot, length)


def pack_rows(user: int, prefix: list[int], blocks: list[list[int]], row_tokens: int) -> list[_Row]:
    """Blocks behind one copy of ``prefix`` per row, a new row when ``row_tokens`` would be exceeded."""
    rows: list[_Row] = []
    for c, block in enumerate(blocks):
        if not rows or (len(rows[-1].ids) + len(block) > row_tokens and rows[-1].blocks):
            rows.append(_Row(user, list(prefix), [0] * len(prefix), list(range(len(prefix))), []))
        row = rows[-1]
        row.blocks.append((c, len(row.ids), len(block)))
        row.ids += block
        row.segment += [len(row.blocks)] * len(block)
        row.position += range(len(prefix), len(prefix) + len(block))
    return rows


def _run_rows(model, rows: list[_Row], pad: int) -> torch.Tensor:
    """Final hidden states (B, T, hidden) of right-padded packed rows under their block masks."""
    dev, width = _device(model), max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n], seg[i, :n], pos[i, :n] = torch.tensor(r.ids), torch.tensor(r.segment), torch.tensor(r.position)
    dtype = arch.embedding(model).weight.dtype
    mask = arch.packed_masks(model, seg.to(dev), pos.to(dev), dtype)
    return arch.run_decoder(model, ids.to(dev), mask, position_ids=pos.to(dev))[0]


def _packed_scores(model, text: Prompt, rows: list[_Row], scorer: str) -> list[tuple[int, int, float]]:
    """(user, candidate, score) for every block of ``rows``, from one forward pass."""
    hidden = _run_rows(model, rows, text.tok.pad_token_id)
    where = [(i, r.user, c, start, n) for i, r in enumerate(rows) for c, start, n in r.blocks]
    dev = hidden.device
    if scorer == "likelihood":
        # the prefix's last token predicts each title's first token, then title token j predicts j + 1
        # (each row's prefix end predicts every block's first token: one head pass for all of them)
        prefix_end = {i: r.segment.index(1) - 1 for i, r in enumerate(rows)}
        states: dict[tuple[int, int], int] = {}  # (row, position) -> index among the distinct states
        of = [states.setdefault((i, p), len(states))
              for i, _, _, start, n in where for p in (prefix_end[i], *range(start, start + n - 1))]
        row_idx, at = zip(*states, strict=True)
        target = [rows[i].ids[start + j] for i, _, _, start, n in where for j in range(n)]
        lp = token_logprobs(model, hidden[torch.tensor(row_idx, device=dev), torch.tensor(at, device=dev)],
                            torch.tensor(target, device=dev), rows=torch.tensor(of, device=dev))
        block = torch.tensor([b for b, (*_, n) in enumerate(where) for _ in range(n)], device=dev)
        sums = torch.zeros(len(where), dtype=lp.dtype, device=dev).index_add_(0, block, lp)
        vals = sums / torch.tensor([n for *_, n in where], dtype=lp.dtype, device=dev)
    else:
        last = hidden[torch.tensor([i for i, *_ in where], device=dev),
                      torch.tensor([start + n - 1 for *_, start, n in where], device=dev)]
        two = arch.logits(model, last, list(yes_no_ids(text.tok))).float()
        vals = two[:, 0] - two[:, 1]
    return [(u, c, v) for (_, u, c, _, _), v in zip(where, vals.tolist(), strict=True)]


def _score_packed(model, text: Prompt, requests: list[Request], scorer: str, row_tokens: int,
                  bar=None) -> list[np.ndarray]:
    """Every request's raw scores through packed rows, several rows per forward pass."""
    rows: list[_Row] = []
    for u, req in enumerate(requests):
        blocks = [text.block(t, scorer) for t in req.candidates]
        rows += pack_rows(u, text.prefix(req.history, scorer), blocks, row_tokens)
    out = [np.zeros(len(r.candidates)) for r in requests]
    left = Counter(r.user for r in rows)  # rows still to run per user
    rows.sort(key=lambda r: len(r.ids))
    i = 0
    while i < len(rows):  # forwards of at most row_tokens padded tokens (at least one row)
        j = i + 1
        while j < len(rows) and (j + 1 - i) * len(rows[j].ids) <= row_tokens:
            j += 1
        for u, c, v in _packed_scores(model, text, rows[i:j], scorer):
            out[u][c] = v
        for r in rows[i:j]:
            left[r.user] -= 1
            if bar is not None and left[r.user] == 0:
                bar.update(1)
        i = j
    return out


def _score_request(model, text: Prompt, req: Request, batch: int, scorer: str) -> np.ndarray:
    prefix = _Prefix(model, text.prefix(req.history, scorer))
    lengths = [len(text.title_ids(t)) for t in req.candidates]
    return np.array(_batched(lambda titles: suffix_scores(model, text, prefix, titles, scorer).tolist(),
                             req.candidates, batch, prefix.dev, lengths, _max_tokens(prefix.dev)))


def _likelihood(model, text: Prompt, req: Request, batch: int) -> np.ndarray:
    return _score_request(model, text, req, batch, "likelihood")


def _embed(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    """Mean-pooled final hidden states, L2-normalized: (len(seqs), hidden)."""
    ids, mask = pad_right(seqs, pad, _device(model))
    h = arch.run_decoder(model, ids, mask)[0].float()
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1)


# item embeddings / title priors per model, dropped with the model: computed once per model
_ITEM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PRIOR_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def title_priors(model, tokenizer, titles: list[str], cfg: ScoringConfig, batch: int) -> np.ndarray:
    """Mean log p(title | prompt with an empty history), cached per (model, title)."""
    cache = _PRIOR_CACHE.setdefault(model, {})
    key = (cfg.domain, cfg.max_title_tokens, arch.layer_signature(model))
    todo = [t for t in dict.fromkeys(titles) if (key, t) not in cache]
    passes.count("prior", len(todo))
    if todo:
        text = Prompt(tokenizer, cfg)
        if use_packed(model, cfg):
            vals = _score_packed(model, text, [Request([], todo)], "likelihood", row_tokens(cfg, _device(model)))[0]
        else:
            vals = _likelihood(model, text, Request([], todo), batch)
        cache.update({(key, t): v for t, v in zip(todo, vals, strict=True)})
    return np.array([cache[(key, t)] for t in titles])


def embed_items(model, tokenizer, titles: list[str], cfg: ScoringConfig | None = None) -> torch.Tensor:
    """Embeddings of item titles, (n, hidden), computed once per (model, title) and cached."""
    cfg = cfg or ScoringConfig(scorer="embedding")
    text = Prompt(tokenizer, cfg)
    cache = _ITEM_CACHE.setdefault(model, {})
    key = (cfg.max_title_tokens, arch.layer_signature(model))  # surgery changes embeddings
    todo = [t for t in dict.fromkeys(titles) if (key, t) not in cache]
    dev = _device(model)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def run(chunk):
        vecs = _embed(model, [bos + text.title_ids(t) for t in chunk], tokenizer.pad_token_id)
        return list(zip(chunk, vecs.cpu(), strict=True))

    lengths = [len(text.title_ids(t)) for t in todo]
    with torch.no_grad():
        for t, v in _batched(run, todo, _batch_size(cfg, dev), dev, lengths, _max_tokens(dev)):
            cache[(key, t)] = v
    return torch.stack([cache[(key, t)] for t in titles]) if titles else torch.zeros(0)


def embed_users(model, tokenizer, histories: list[list[str]], cfg: ScoringConfig | None = None) -> torch.Tensor:
    """Embeddings of user history prompts, (n, hidden)."""
    cfg = cfg or ScoringConfig(scorer="embedding")
    text, dev = Prompt(tokenizer, cfg), _device(model)
    seqs = [text.prefix_ids(h, "") for h in histories]
    with torch.no_grad():
        vecs = _batched(lambda c: list(_embed(model, c, tokenizer.pad_token_id).cpu()), seqs,
                        max(1, _batch_size(cfg, dev) // 8), dev)
        return torch.stack(vecs) if seqs else torch.zeros(0)


def use_packed(model, cfg: ScoringConfig) -> bool:
    """Whether ``score`` packs candidates (``cfg.packed``, or where the attention takes the block mask)."""
    why = arch.packed_mask_unsupported(model)
    if cfg.packed and why:
        raise ValueError(f"packed scoring is not possible for this model: {why}; use packed=None or False")
    if cfg.packed is None and why:
        log.debug("packed scoring off (%s): scoring in KV-cache batches", why)
    return cfg.packed is not False and why is None


def row_tokens(cfg: ScoringConfig, device: torch.device) -> int:
    return cfg.row_tokens or (4096 if device.type == "cuda" else 1024)


def fit_context(model, text: Prompt, requests: list[Request], scorer: str) -> list[Request]:
    """Requests whose prompts fit the model's context: too long histories lose their oldest items (warned, counted)."""
    context = getattr(arch.text_config(model), "max_position_embeddings", None)
    if not context:
        return requests
    out, cut = [], 0
    for req in requests:
        block = max(len(text.block(t, scorer)) for t in req.candidates)
        history = list(req.history)
        while history and len(text.prefix(history, scorer)) + block + 8 > context:
            history.pop(0)
        cut += len(history) < len(req.history)
        out.append(Request(history, req.candidates) if len(history) < len(req.history) else req)
    if cut:
        warnings.warn(f"{cut} of {len(requests)} histories were longer than the model's context ({context} tokens) "
                      "and lost their oldest items; lower history_len or max_title_tokens to avoid this", stacklevel=3)
    return out


def check_requests(requests: list[Request]) -> None:
    empty = [i for i, r in enumerate(requests) if not r.candidates]
    if empty:
        raise ValueError(f"{len(empty)} request(s) have no candidates (first: #{empty[0]}); every user needs at "
                         "least one candidate to rank: check the candidate table (positive plus negatives)")


def score(model, tokenizer, requests: list[Request], config: ScoringConfig | None = None,
          desc: str = "scoring") -> list[np.ndarray]:
    """Score every request's candidates -> one float array per request (higher = better).

    A request without candidates is refused; a history too long for the model's context loses
    its oldest items (with a warning that counts them); an empty title scores as ' ?'.
    """
    cfg = config or ScoringConfig()
    if cfg.scorer not in SCORERS:
        raise ValueError(f"unknown scorer {cfg.scorer!r}; use one of {', '.join(SCORERS)}")
    if cfg.max_title_tokens < 1:
        raise ValueError(f"max_title_tokens must be at least 1, got {cfg.max_title_tokens}")
    check_requests(requests)
    passes.count("prefix", len(requests))
    passes.count("candidate", sum(len(r.candidates) for r in requests))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dev = _device(model)
    batch = _batch_size(cfg, dev)
    text = Prompt(tokenizer, cfg)
    out = []
    with torch.no_grad():
        if cfg.scorer == "embedding":
            all_titles = sorted({t for r in requests for t in r.candidates})
            embed_items(model, tokenizer, all_titles, cfg)
            for r in progress(requests, desc=desc, unit="user"):
                u = embed_users(model, tokenizer, [r.history], cfg)[0]
                out.append((embed_items(model, tokenizer, r.candidates, cfg) @ u).numpy().astype(np.float64))
            return out
        if cfg.calibration not in ("pmi", "none"):
            raise ValueError(f"unknown calibration {cfg.calibration!r}; use 'pmi' or 'none'")
        requests = fit_context(model, text, requests, cfg.scorer)
        calibrate = cfg.scorer == "likelihood" and cfg.calibration == "pmi"
        if calibrate:
            title_priors(model, tokenizer, sorted({t for r in requests for t in r.candidates}), cfg, batch)
        if use_packed(model, cfg):
            with progress(total=len(requests), desc=desc, unit="user") as bar:
                raw = _score_packed(model, text, requests, cfg.scorer, row_tokens(cfg, dev), bar)
        else:
            raw = [_score_request(model, text, r, batch, cfg.scorer)
                   for r in progress(requests, desc=desc, unit="user")]
        for r, s in zip(requests, raw, strict=True):
            out.append(s - title_priors(model, tokenizer, r.candidates, cfg, batch) if calibrate else s)
    return out


def score_naive(model, tokenizer, request: Request, config: ScoringConfig | None = None) -> np.ndarray:
    """Reference implementation: one full prompt per candidate through ``model(...).logits``.

    Same token ids as ``score`` (prefix and suffix tokenized separately), full-vocabulary
    logits at every position, no cache: slow, but obviously right. Used by the tests and
    benchmarks/bench_scoring.py to check the fast path.
    """
    cfg = config or ScoringConfig()
    text = Prompt(tokenizer, cfg)
    dev = _device(model)
    scores = []
    with torch.no_grad():
        for title in request.candidates:
            if cfg.scorer == "likelihood":
                prefix, suffix = text.likelihood_prefix(request.history), text.title_ids(title)
                ids = torch.tensor([prefix + suffix], device=dev)
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
                pos = torch.arange(len(prefix) - 1, len(prefix) + len(suffix) - 1, device=dev)
                s = logp[pos, torch.tensor(suffix, device=dev)].mean().item()
                if cfg.calibration == "pmi":
                    prior = text.likelihood_prefix([])
                    ids = torch.tensor([prior + suffix], device=dev)
                    lp0 = model(input_ids=ids).logits[0].float().log_softmax(-1)
                    pos0 = torch.arange(len(prior) - 1, len(prior) + len(suffix) - 1, device=dev)
                    s -= lp0[pos0, torch.tensor(suffix, device=dev)].mean().item()
                scores.append(s)
            elif cfg.scorer == "yesno":
                yes, no = yes_no_ids(tokenizer)
                ids = text.yesno_prefix(request.history) + text.yesno_suffix(title)
                logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0, -1].float()
                logp = logits.log_softmax(-1)
                scores.append((logp[yes] - logp[no]).item())
            else:
                raise ValueError("score_naive covers 'likelihood' and 'yesno'")
    return np.array(scores)
