"""The scoring harness against naive per-candidate prompts, next to the token bound, on the same candidates.

Naive: one prompt per candidate through plain ``model(input_ids).logits`` (full vocabulary at
every position, no sharing). Harness (``layerviz.scoring.score``): each user's candidates packed
behind one copy of its history under a block attention mask, several users per forward pass, only
the needed LM-head rows (or, with --no-packed, the KV-cache batches it falls back to).

The token bound is naive tokens / harness tokens for the same requests: n x (prefix + title)
against prefix + n x title (for pmi, plus each candidate's empty-history prompt against one prompt
per distinct title). A speedup above its bound would mean that the two sides are not timed alike.

Run: .venv/bin/python benchmarks/bench_scoring.py [--users 2] [--json rows.json]
     .venv/bin/python benchmarks/bench_scoring.py --sweep        # harness s/user by row_tokens
     .venv/bin/python benchmarks/bench_scoring.py --bf16         # bf16 against fp32: speed, rank agreement
     .venv/bin/python benchmarks/bench_scoring.py --head --model gemma3-270m   # the LM head's log-probs alone
Goal (issue #15): speedup >= 0.8 x bound at history 20, 1+19, fp32, with identical ranks.
"""

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import kendalltau

from layerviz import arch, data, load_model
from layerviz.evaluate import requests_for
from layerviz.scoring import _PRIOR_CACHE, Prompt, ScoringConfig, score, score_naive, token_logprobs

SCORERS = [("likelihood", "none"), ("likelihood", "pmi"), ("yesno", "none")]


def requests(dataset: str, history: int, negatives: int, users: int, seed: int = 0):
    """The first ``users`` sampled test users whose history holds at least ``history`` titles (so that
    history 5, 10 and 20 are different prompts), with their candidates and positive positions."""
    prep = data.load(dataset, config=data.PrepConfig(history_len=history), report=None)
    cands = data.build_candidates(prep, data.CandidateConfig(negatives=negatives, users=None, seed=seed))
    reqs = requests_for(prep, cands, "test")
    keep = [i for i, r in enumerate(reqs) if len(r.history) >= history][:users]
    if len(keep) < users:
        raise SystemExit(f"{dataset} has only {len(keep)} test users with {history}+ history titles; "
                         "lower --users or --histories")
    return prep, [reqs[i] for i in keep], cands["pos_index"].to_numpy()[keep]


def token_counts(tok, reqs, cfg: ScoringConfig) -> tuple[int, int]:
    """(naive tokens, harness tokens) of scoring ``reqs`` with ``cfg``."""
    text = Prompt(tok, cfg)
    naive = harness = 0
    for r in reqs:
        prefix, blocks = text.prefix(r.history, cfg.scorer), [text.block(t, cfg.scorer) for t in r.candidates]
        naive += sum(len(prefix) + len(b) for b in blocks)
        harness += len(prefix) + sum(len(b) for b in blocks)
    if cfg.scorer == "likelihood" and cfg.calibration == "pmi":
        empty = len(text.likelihood_prefix([]))
        naive += sum(empty + len(text.title_ids(t)) for r in reqs for t in r.candidates)
        harness += empty + sum(len(text.title_ids(t)) for t in {t for r in reqs for t in r.candidates})
    return naive, harness


def timed(fn, reps: int = 1):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def same_ranks(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all((np.argsort(-x, kind="stable") == np.argsort(-y, kind="stable")).all() for x, y in zip(a, b, strict=True))


def compare(model, tok, args) -> list[dict]:
    rows = []
    print(f"{'scorer':<19}{'hist':>5}{'cands':>6}{'naive s/u':>10}{'harness s/u':>12}{'speedup':>9}{'bound':>7}"
          f"{'ratio':>7}{'max|diff|':>11}{'same ranks':>11}", flush=True)
    for history in args.histories:
        for n in args.candidates:
            prep, reqs, _ = requests(args.dataset, history, n - 1, args.users)
            for scorer, cal in SCORERS:
                cfg = ScoringConfig(scorer=scorer, calibration=cal, domain=prep.domain, packed=args.packed)
                score(model, tok, reqs[:1], cfg)  # warm-up (and the first-call allocations)
                t_naive, naive = timed(lambda cfg=cfg, reqs=reqs: [score_naive(model, tok, r, cfg) for r in reqs])
                _PRIOR_CACHE.pop(model, None)  # the harness pays for its title priors too
                t_fast, fast = timed(lambda cfg=cfg, reqs=reqs: score(model, tok, reqs, cfg))
                n_tok, h_tok = token_counts(tok, reqs, cfg)
                row = dict(scorer=scorer, calibration=cal, history=history, candidates=n,
                           naive_s_per_user=t_naive / len(reqs), harness_s_per_user=t_fast / len(reqs),
                           speedup=t_naive / t_fast, bound=n_tok / h_tok, ratio=(t_naive / t_fast) / (n_tok / h_tok),
                           max_abs_diff=max(float(np.abs(a - b).max()) for a, b in zip(naive, fast, strict=True)),
                           same_ranks=same_ranks(naive, fast))
                rows.append(row)
                name = scorer + (f" ({cal})" if scorer == "likelihood" else "")
                print(f"{name:<19}{history:>5}{n:>6}{row['naive_s_per_user']:>10.2f}{row['harness_s_per_user']:>12.3f}"
                      f"{row['speedup']:>8.1f}x{row['bound']:>6.1f}x{row['ratio']:>7.2f}{row['max_abs_diff']:>11.1e}"
                      f"{str(row['same_ranks']):>11}", flush=True)
    return rows


def sweep(model, tok, args) -> list[dict]:
    rows = []
    print(f"{'scorer':<12}{'hist':>5}{'cands':>6}{'KV cache':>10}" + "".join(f"{f'rows {t}':>11}" for t in args.row_tokens)
          + "   (harness s/user; KV cache: the unpacked fallback)", flush=True)
    for history in args.histories:
        for n in args.candidates:
            prep, reqs, _ = requests(args.dataset, history, n - 1, args.users)
            for scorer in ("likelihood", "yesno"):
                times = []
                for t in [None, *args.row_tokens]:  # None: the KV-cache path
                    cfg = ScoringConfig(scorer=scorer, calibration="none", domain=prep.domain, row_tokens=t,
                                        packed=t is not None)
                    score(model, tok, reqs[:1], cfg)
                    times.append(timed(lambda cfg=cfg, reqs=reqs: score(model, tok, reqs, cfg), 2)[0] / len(reqs))
                    rows.append(dict(scorer=scorer, history=history, candidates=n, row_tokens=t, s_per_user=times[-1]))
                print(f"{scorer:<12}{history:>5}{n:>6}{times[0]:>10.3f}" + "".join(f"{x:>11.3f}" for x in times[1:]),
                      flush=True)
    return rows


def bf16(args) -> list[dict]:
    """bf16 against fp32 harness scoring on the same users: speedup, positive-rank agreement, Kendall's tau."""
    rows, out = [], {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model(args.model, device="cpu", dtype=dtype)
        for history in args.histories:
            for n in args.candidates:
                prep, reqs, pos = requests(args.dataset, history, n - 1, args.users)
                for scorer, cal in SCORERS:
                    cfg = ScoringConfig(scorer=scorer, calibration=cal, domain=prep.domain)
                    score(model, tok, reqs[:1], cfg)
                    _PRIOR_CACHE.pop(model, None)
                    out[dtype, history, n, scorer, cal] = (*timed(lambda m=model, t=tok, cfg=cfg, r=reqs: score(m, t, r, cfg)), pos)
    print(f"{'scorer':<19}{'hist':>5}{'cands':>6}{'bf16 speedup':>13}{'same positive rank':>20}{'kendall tau':>13}")
    for (dtype, history, n, scorer, cal), (t32, s32, pos) in out.items():
        if dtype != "float32":
            continue
        t16, s16, _ = out["bfloat16", history, n, scorer, cal]
        a, b = np.stack(s32), np.stack(s16)
        rank = [(x > x[np.arange(len(x)), pos][:, None]).sum(1) for x in (a, b)]
        row = dict(scorer=scorer, calibration=cal, history=history, candidates=n, speedup=t32 / t16,
                   same_positive_rank=float((rank[0] == rank[1]).mean()),
                   kendall_tau=float(np.mean([kendalltau(x, y).statistic for x, y in zip(a, b, strict=True)])))
        rows.append(row)
        name = scorer + (f" ({cal})" if scorer == "likelihood" else "")
        print(f"{name:<19}{history:>5}{n:>6}{row['speedup']:>12.2f}x{row['same_positive_rank']:>20.3f}"
              f"{row['kendall_tau']:>13.3f}", flush=True)
    return rows


def head(model, args) -> list[dict]:
    """log p(target) of random post-norm hidden states through the model's LM head: full-vocabulary logits
    in chunks of 2^24 elements (what scoring did before) against ``token_logprobs``' vocabulary blocks."""
    lm = arch.lm_head(model)
    vocab, width = lm.out_features, lm.in_features
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"LM head {vocab} x {width}; s per call (best of 3), speedup over full-vocabulary chunks")
    print(f"{'rows':>6}{'chunks':>9}" + "".join(f"{f'block {b}':>14}" for b in args.vocab_blocks) + f"{'max|diff|':>11}")
    for n in args.head_rows:
        h = torch.randn(n, width, generator=gen)
        t = torch.randint(0, vocab, (n,), generator=gen)
        chunk = max(1, (1 << 24) // vocab)

        def full(h=h, t=t, chunk=chunk):
            return torch.cat([arch.logits(model, h[i : i + chunk]).float().log_softmax(-1).gather(1, t[i : i + chunk, None])[:, 0]
                              for i in range(0, len(h), chunk)])

        with torch.no_grad():
            base, ref = timed(full, 3)
            cells, diff = [], 0.0
            for b in args.vocab_blocks:
                sec, out = timed(lambda b=b, h=h, t=t: token_logprobs(model, h, t, vocab_block=b), 3)
                err = float((out - ref).abs().max())
                diff = max(diff, err)
                cells.append(f"{sec:>7.3f} {base / sec:>4.2f}x")
                rows.append(dict(rows=n, vocab_block=b, full_chunks_s=base, blocked_s=sec, speedup=base / sec,
                                 max_abs_diff=err))
        print(f"{n:>6}{base:>8.3f}s" + "".join(f"{c:>14}" for c in cells) + f"{diff:>11.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="synthetic-movies", help="synthetic-movies: the bundled data with 20-title histories")
    ap.add_argument("--users", type=int, default=2, help="test users per setting (bf16: use more, e.g. 40)")
    ap.add_argument("--histories", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--candidates", type=int, nargs="+", default=[20, 100], help="list lengths: 20 is 1+19")
    ap.add_argument("--no-packed", dest="packed", action="store_false", default=None,
                    help="time the KV-cache batches instead of packed rows")
    ap.add_argument("--sweep", action="store_true", help="harness time by row_tokens instead of the comparison")
    ap.add_argument("--row-tokens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--bf16", action="store_true", help="bf16 against fp32 instead of the comparison")
    ap.add_argument("--head", action="store_true", help="time the LM head's log-probs alone instead of the comparison")
    ap.add_argument("--head-rows", type=int, nargs="+", default=[64, 600, 2000])
    ap.add_argument("--vocab-blocks", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    print(f"{args.model} on CPU ({torch.get_num_threads()} threads), {args.users} test users per setting")
    if args.bf16:
        rows = bf16(args)
    else:
        model, tok = load_model(args.model, device="cpu")
        rows = head(model, args) if args.head else sweep(model, tok, args) if args.sweep else compare(model, tok, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
