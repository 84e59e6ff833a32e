"""Three LLM scorers with one interface: score(model, tokenizer, requests, config) -> scores.

* ``likelihood``: mean log-prob of the candidate title's tokens given the history prompt;
  by default calibrated (``calibration='pmi'``) by subtracting the same quantity with an
  empty history, so that titles which are merely easy to spell out (long templated
  accessory names) do not win: measured on the demo data with SmolLM2, the raw mean
  log-prob ranks *below* chance, the calibrated one well above it.
* ``yesno``: TALLRec-style log P(Yes) - log P(No) at the answer position.
* ``embedding``: cosine between mean-pooled final hidden states of user prompt and item title.

Speed: the history prefix is encoded once per user and its KV cache is expanded over
the candidates, which are run in right-padded batches behind it. Only the rows of the
LM head that are needed are computed: Yes/No rows for ``yesno``; for ``likelihood`` the
full vocabulary only at title positions, in bounded chunks. Right padding with explicit
attention masks keeps every real token at its true position.

The model can be any HF causal LM that ``layerviz.arch`` understands; everything goes
through ``arch.parts(model)``, so compact models built on the same parts work unchanged.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from layerviz import arch
from layerviz.progress import progress

SCORERS = ("likelihood", "yesno", "embedding")

PROMPTS = {
    "products": dict(
        header="A customer bought these products, oldest first:",
        question="Will the customer buy this product next? Answer Yes or No.",
    ),
    "movies": dict(
        header="A user watched and liked these movies, oldest first:",
        question="Will the user like this movie next? Answer Yes or No.",
    ),
}


@dataclass
class ScoringConfig:
    """How candidates are scored."""

    scorer: str = "likelihood"
    """'likelihood', 'yesno' or 'embedding'."""
    domain: str = "products"
    """Prompt wording: 'products' or 'movies'."""
    max_title_tokens: int = 32
    """Each title is cut to at most this many tokens, in the history and as a candidate."""
    batch_size: int | None = None
    """Candidates per forward pass; None: 64 on CPU, 256 on CUDA, halved on CUDA OOM."""
    calibration: str = "pmi"
    """likelihood only: 'pmi' subtracts log p(title | no history); 'none' keeps the raw mean log-prob."""


@dataclass
class Request:
    """One user's history titles (oldest first) and candidate titles to score."""

    history: list[str]
    candidates: list[str]


class _Text:
    """Tokenization with per-title truncation, memoized per call."""

    def __init__(self, tokenizer, cfg: ScoringConfig):
        if cfg.domain not in PROMPTS:
            raise ValueError(f"unknown domain {cfg.domain!r}; use one of {', '.join(PROMPTS)}")
        self.tok, self.cfg, self.p = tokenizer, cfg, PROMPTS[cfg.domain]
        self._ids: dict[str, list[int]] = {}

    def title_ids(self, title: str) -> list[int]:
        """Token ids of ' ' + title, cut to max_title_tokens."""
        if title not in self._ids:
            ids = self.tok(" " + title, add_special_tokens=False).input_ids[: self.cfg.max_title_tokens]
            self._ids[title] = ids or self.tok(" ?", add_special_tokens=False).input_ids
        return self._ids[title]

    def prefix_segments(self, history: list[str], tail: str) -> tuple[list[int], list[bool]]:
        """Prompt ids built segment by segment, and which of them are item-title tokens.

        header (with BOS where the model has one), then '\n-' + title ids per history item,
        then ``tail``. Segment-wise tokenization keeps titles identical wherever they appear.
        """
        ids = self.tok(self.p["header"]).input_ids
        is_item = [False] * len(ids)
        dash = self.ids("\n-")
        for t in history:
            title = self.title_ids(t)
            ids += dash + title
            is_item += [False] * len(dash) + [True] * len(title)
        if tail:
            end = self.ids(tail)
            ids += end
            is_item += [False] * len(end)
        return ids, is_item

    def prefix_ids(self, history: list[str], tail: str) -> list[int]:
        return self.prefix_segments(history, tail)[0]

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


def _device(model) -> torch.device:
    return arch.embedding(model).weight.device


def _batch_size(cfg: ScoringConfig, device: torch.device) -> int:
    return cfg.batch_size or (256 if device.type == "cuda" else 64)


def _pad_right(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask: real tokens keep positions 0..len-1."""
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

    def hidden(self, suffixes: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (post-norm) hidden states of [last prefix token] + suffix, and the suffix mask."""
        seqs = [[self.last, *s] for s in suffixes]
        ids, mask = _pad_right(seqs, pad, self.dev)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(seqs))
        full_mask = torch.cat([torch.ones((len(seqs), len(self.head)), dtype=mask.dtype, device=self.dev), mask], 1)
        hidden, _ = arch.run_decoder(self.model, ids, full_mask, cache=cache, use_cache=True)
        return hidden, mask


def _token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """log p(targets) for rows of post-norm hidden states, in vocabulary-bounded chunks."""
    vocab = arch.lm_head(model).out_features
    rows = max(1, chunk_elems // vocab)
    out = []
    for i in range(0, len(hidden), rows):
        logits = arch.logits(model, hidden[i : i + rows]).float()
        out.append(logits.gather(1, targets[i : i + rows, None])[:, 0] - torch.logsumexp(logits, 1))
    return torch.cat(out) if out else hidden.new_zeros(0)


def _likelihood(model, text: _Text, req: Request, batch: int) -> np.ndarray:
    prefix = _Prefix(model, text.prefix_ids(req.history, "\n-"))
    pad = text.tok.pad_token_id

    def run(titles: list[str]) -> list[float]:
        suffixes = [text.title_ids(t) for t in titles]
        hidden, mask = prefix.hidden(suffixes, pad)
        # position j predicts suffix token j (position 0 is the re-fed last prefix token)
        ids, _ = _pad_right(suffixes, pad, prefix.dev)
        valid = mask[:, 1:].bool()
        lp = _token_logprobs(model, hidden[:, :-1][valid], ids[valid])
        per = torch.zeros(valid.shape, dtype=lp.dtype, device=lp.device)
        per[valid] = lp
        return (per.sum(1) / valid.sum(1)).tolist()

    lengths = [len(text.title_ids(t)) for t in req.candidates]
    return np.array(_batched(run, req.candidates, batch, prefix.dev, lengths, _max_tokens(prefix.dev)))


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """First token of ' Yes' and of ' No' (they must differ)."""
    yes = tokenizer(" Yes", add_special_tokens=False).input_ids[0]
    no = tokenizer(" No", add_special_tokens=False).input_ids[0]
    if yes == no:
        raise ValueError("the tokenizer maps ' Yes' and ' No' to the same first token; "
                         "the yesno scorer cannot be used with it")
    return yes, no


def _yesno(model, text: _Text, req: Request, batch: int) -> np.ndarray:
    prefix = _Prefix(model, text.prefix_ids(req.history, "\n"))
    pad, rows = text.tok.pad_token_id, list(yes_no_ids(text.tok))
    tail = text.ids(f"\n{text.p['question']}\nAnswer:")

    def run(titles: list[str]) -> list[float]:
        cand = text.ids("Candidate:")
        suffixes = [cand + text.title_ids(t) + tail for t in titles]
        hidden, mask = prefix.hidden(suffixes, pad)
        last = hidden[torch.arange(len(titles)), mask.sum(1) - 1]  # answer position
        two = arch.logits(model, last, rows).float()
        return (two[:, 0] - two[:, 1]).tolist()  # = log P(Yes) - log P(No)

    lengths = [len(text.title_ids(t)) for t in req.candidates]
    return np.array(_batched(run, req.candidates, batch, prefix.dev, lengths, _max_tokens(prefix.dev)))


def _embed(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    """Mean-pooled final hidden states, L2-normalized: (len(seqs), hidden)."""
    ids, mask = _pad_right(seqs, pad, _device(model))
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
    if todo:
        vals = _likelihood(model, _Text(tokenizer, cfg), Request([], todo), batch)
        cache.update({(key, t): v for t, v in zip(todo, vals, strict=True)})
    return np.array([cache[(key, t)] for t in titles])


def embed_items(model, tokenizer, titles: list[str], cfg: ScoringConfig | None = None) -> torch.Tensor:
    """Embeddings of item titles, (n, hidden), computed once per (model, title) and cached."""
    cfg = cfg or ScoringConfig(scorer="embedding")
    text = _Text(tokenizer, cfg)
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
    text, dev = _Text(tokenizer, cfg), _device(model)
    seqs = [text.prefix_ids(h, "") for h in histories]
    with torch.no_grad():
        vecs = _batched(lambda c: list(_embed(model, c, tokenizer.pad_token_id).cpu()), seqs,
                        max(1, _batch_size(cfg, dev) // 8), dev)
        return torch.stack(vecs) if seqs else torch.zeros(0)


def score(model, tokenizer, requests: list[Request], config: ScoringConfig | None = None,
          desc: str = "scoring") -> list[np.ndarray]:
    """Score every request's candidates -> one float array per request (higher = better)."""
    cfg = config or ScoringConfig()
    if cfg.scorer not in SCORERS:
        raise ValueError(f"unknown scorer {cfg.scorer!r}; use one of {', '.join(SCORERS)}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dev = _device(model)
    batch = _batch_size(cfg, dev)
    text = _Text(tokenizer, cfg)
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
        calibrate = cfg.scorer == "likelihood" and cfg.calibration == "pmi"
        if calibrate:
            title_priors(model, tokenizer, sorted({t for r in requests for t in r.candidates}), cfg, batch)
        fn = _likelihood if cfg.scorer == "likelihood" else _yesno
        for r in progress(requests, desc=desc, unit="user"):
            s = fn(model, text, r, batch)
            out.append(s - title_priors(model, tokenizer, r.candidates, cfg, batch) if calibrate else s)
    return out


def score_naive(model, tokenizer, request: Request, config: ScoringConfig | None = None) -> np.ndarray:
    """Reference implementation: one full prompt per candidate through ``model(...).logits``.

    Same token ids as ``score`` (prefix and suffix tokenized separately), full-vocabulary
    logits at every position, no cache: slow, but obviously right. Used by the tests and
    benchmarks/bench_scoring.py to check the fast path.
    """
    cfg = config or ScoringConfig()
    text = _Text(tokenizer, cfg)
    dev = _device(model)
    scores = []
    with torch.no_grad():
        for title in request.candidates:
            if cfg.scorer == "likelihood":
                prefix, suffix = text.prefix_ids(request.history, "\n-"), text.title_ids(title)
                ids = torch.tensor([prefix + suffix], device=dev)
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
                pos = torch.arange(len(prefix) - 1, len(prefix) + len(suffix) - 1, device=dev)
                s = logp[pos, torch.tensor(suffix, device=dev)].mean().item()
                if cfg.calibration == "pmi":
                    prior = text.prefix_ids([], "\n-")
                    ids = torch.tensor([prior + suffix], device=dev)
                    lp0 = model(input_ids=ids).logits[0].float().log_softmax(-1)
                    pos0 = torch.arange(len(prior) - 1, len(prior) + len(suffix) - 1, device=dev)
                    s -= lp0[pos0, torch.tensor(suffix, device=dev)].mean().item()
                scores.append(s)
            elif cfg.scorer == "yesno":
                yes, no = yes_no_ids(tokenizer)
                ids = (text.prefix_ids(request.history, "\n") + text.ids("Candidate:") + text.title_ids(title)
                       + text.ids(f"\n{text.p['question']}\nAnswer:"))
                logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0, -1].float()
                logp = logits.log_softmax(-1)
                scores.append((logp[yes] - logp[no]).item())
            else:
                raise ValueError("score_naive covers 'likelihood' and 'yesno'")
    return np.array(scores)
