import json

import numpy as np
import pandas as pd
import pytest
import torch

from layerviz import arch, load_model
from layerviz.cli import main as cli
from layerviz.data.prompts import Prompt, prompt_text
from layerviz.scoring import Request, ScoringConfig, embed_items, score, score_naive, token_logprobs

REQ = Request(
    history=["Canon EOS R50 Mirrorless Camera Body", "Canon Battery Pack for EOS R50",
             "SanDisk Extreme 128GB SDXC Memory Card"],
    candidates=["Canon 50mm f/1.8 Prime Lens", "Garmin Venu 3 Smartwatch", "Manfrotto Compact Tripod",
                "Xbox Series X", "A", "Peak Design Everyday Camera Sling Bag for mirrorless cameras and lenses"],
)


@pytest.mark.parametrize("scorer,calibration", [("likelihood", "pmi"), ("likelihood", "none"), ("yesno", "pmi")])
def test_fast_scorers_equal_naive_full_logits(tiny, scorer, calibration):
    _, model, tok = tiny
    cfg = ScoringConfig(scorer=scorer, calibration=calibration, batch_size=4)
    fast = score(model, tok, [REQ], cfg)[0]
    slow = score_naive(model, tok, REQ, cfg)
    assert fast.shape == (len(REQ.candidates),)
    np.testing.assert_allclose(fast, slow, atol=1e-4)
    assert np.argsort(fast).tolist() == np.argsort(slow).tolist()


@pytest.mark.parametrize("block", [1000, 4096, None])
def test_blocked_head_logprobs_equal_full_log_softmax_with_gradients(tiny, block):
    """The online logsumexp over vocabulary blocks (a ragged last block included) equals log_softmax of the
    full logits, and so do its gradients with respect to the hidden states."""
    _, model, _ = tiny
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(9, arch.lm_head(model).in_features, generator=gen) * 3
    vocab = arch.lm_head(model).out_features
    t = torch.tensor([0, vocab - 1, 5, 6, 7, vocab // 2, 1, vocab - 2, 3])
    a, b = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    fast = token_logprobs(model, a, t, vocab_block=block, max_rows=4)  # rows split too
    ref = arch.logits(model, b).float().log_softmax(-1).gather(1, t[:, None])[:, 0]
    shared = [0, 1, 2] * 3  # three states, each predicting three targets: one head pass each
    by_row = token_logprobs(model, h[:3], t, vocab_block=block, rows=torch.tensor(shared))
    full = arch.logits(model, h[shared]).float().log_softmax(-1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(by_row, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    (fast * torch.arange(9.0)).sum().backward()
    (ref * torch.arange(9.0)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_batch_size_does_not_change_scores(tiny):
    _, model, tok = tiny
    a = score(model, tok, [REQ], ScoringConfig(batch_size=1))[0]
    b = score(model, tok, [REQ], ScoringConfig(batch_size=64))[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_title_truncation_applies(tiny):
    _, model, tok = tiny
    req = Request(["Lens", "Tripod"], REQ.candidates)  # history titles shorter than the cut
    a = score(model, tok, [req], ScoringConfig(max_title_tokens=3, calibration="none"))[0]
    b = score(model, tok, [req], ScoringConfig(max_title_tokens=64, calibration="none"))[0]
    assert a[1] != b[1] and a[4] == pytest.approx(b[4], abs=1e-6)  # long title cut, 'A' unchanged


def test_embedding_scorer_caches_items(tiny):
    _, model, tok = tiny
    calls = []
    h = arch.embedding(model).register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        cfg = ScoringConfig(scorer="embedding")
        s = score(model, tok, [REQ], cfg)[0]
        n_before = len(calls)
        embed_items(model, tok, REQ.candidates, cfg)
        assert len(calls) == n_before  # every item was embedded already
    finally:
        h.remove()
    assert np.all(np.abs(s) <= 1 + 1e-6)


def test_unknown_scorer_and_bad_noun(tiny):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="unknown scorer"):
        score(model, tok, [REQ], ScoringConfig(scorer="bm25"))
    with pytest.raises(ValueError, match="item noun"):
        score(model, tok, [REQ], ScoringConfig(domain="/games"))


def test_item_noun_names_the_items():
    """A dataset of games is never called movies: every noun reaches the header and the question."""
    assert prompt_text("games") == {"header": "A user liked these games, oldest first:",
                                    "question": "Will the user like this game next? Answer Yes or No."}
    assert "business next" in prompt_text("business/businesses")["question"]
    assert "businesses" in prompt_text("business/businesses")["header"]
    assert prompt_text("movies")["header"].startswith("A user watched")  # the measured wordings stay
    assert "product" in prompt_text("products")["question"]


def test_same_request_twice_gives_same_scores(tiny):
    _, model, tok = tiny
    out = score(model, tok, [REQ, REQ], ScoringConfig())
    np.testing.assert_allclose(out[0], out[1])


def test_cli_evaluate_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rc = cli(["evaluate", "--model", "tiny-llama3", "--dataset", "synthetic-electronics", "--users", "6",
              "--negatives", "19", "--history-len", "5", "--calibration-users", "6", "--out", str(out),
              "--results-dir", str(tmp_path / "r")])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"ndcg@5", "ndcg@10", "mrr", "precision@10", "hr@10"} <= set(m)
    assert m["n_users"] == 6 and m["n_candidates"] == 20
    assert m["baselines"]["chance"]["ndcg@10"]["mean"] == pytest.approx(0.2272, abs=1e-3)
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert len(ranks) == 6 and ranks["rank"].between(1, 20).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["data_fingerprint"] and manifest["versions"]["torch"]
    # same config, same tables
    cli(["evaluate", "--model", "tiny-llama3", "--dataset", "synthetic-electronics", "--users", "6", "--negatives", "19",
         "--history-len", "5", "--calibration-users", "6", "--out", str(tmp_path / "again"),
         "--results-dir", str(tmp_path / "r")])
    again = pd.read_parquet(tmp_path / "again" / "ranks.parquet")
    assert again["rank"].tolist() == ranks["rank"].tolist()


def test_cli_bad_dataset_is_a_clear_error(tmp_path, capsys):
    assert cli(["evaluate", "--model", "tiny-llama3", "--dataset", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_finds_signal_on_demo_data(smollm2, tmp_path, monkeypatch):
    """Real model, real protocol: the calibrated likelihood scorer ranks above chance."""
    from layerviz.evaluate import run_evaluate
    from layerviz.settings import EvalConfig

    model, tok = smollm2
    cfg = EvalConfig(model="smollm2-135m", dataset="synthetic-electronics", users=30, negatives=19, history_len=10,
                     calibration_users=20, results_dir=str(tmp_path / "r"))
    doc = run_evaluate(cfg, out=tmp_path / "o", model=model, tokenizer=tok, report=None)
    assert doc["ndcg@10"]["mean"] > doc["baselines"]["chance"]["ndcg@10"]["mean"]


def test_cuda_oom_backoff_halves_the_batch():
    """The CUDA out-of-memory path, exercised on CPU with a stand-in that fails on big batches."""
    from layerviz.scoring import _batched

    seen = []

    def run(chunk):
        seen.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [x * 10 for x in chunk]

    items = list(range(10))
    out = _batched(run, items, 8, torch.device("cuda"), lengths=[5 - (i % 5) for i in items])
    assert out == [x * 10 for x in items]  # input order kept despite length sorting
    assert seen == [8, 4, 2, 2, 2, 2, 2]  # 8 fails, 4 fails, then batches of 2
    with pytest.raises(torch.OutOfMemoryError):  # on CPU an OOM is not retried
        _batched(run, items, 8, torch.device("cpu"))


def test_embedding_full_ranking(tmp_path, monkeypatch):
    from layerviz.evaluate import run_evaluate
    from layerviz.settings import EvalConfig

    cfg = EvalConfig(model="tiny-gemma3", scorer="embedding", users=4, negatives=19, history_len=3,
                     full_ranking=True, results_dir=str(tmp_path / "r"))
    doc = run_evaluate(cfg, report=None)
    fr = doc["full_ranking"]
    # the same ranks from the embeddings by hand: the positive against every item the user never saw
    from layerviz.data import candidates_for, load
    from layerviz.scoring import embed_items, embed_users

    model, tok = load_model("tiny-gemma3", device="cpu")
    prep = load(cfg.dataset, cfg.format, cfg.prep_config(), report=None)
    cands, _ = candidates_for(prep, cfg.candidate_config(), cfg.candidates_dir)
    scfg = cfg.scoring_config(prep.domain)
    titles, ids = prep.titles(), prep.items["item_id"].tolist()
    with torch.no_grad():
        items = embed_items(model, tok, [titles[i] for i in ids], scfg)
        users = embed_users(model, tok, [[titles[i] for i in prep.histories("test")[u]] for u in cands["user_id"]],
                            scfg)
    seen, ranks = prep.seen_by_user(), []
    for row, u in enumerate(cands["user_id"]):
        s = (items @ users[row]).numpy().astype(np.float64)
        pos = ids.index(cands["positive"].iloc[row])
        others = [k for k, i in enumerate(ids) if i not in seen.get(u, ()) and k != pos]
        ranks.append(1 + int((s[others] >= s[pos]).sum()))
    ranks = np.array(ranks)
    assert fr["mrr"]["mean"] == pytest.approx(np.mean(1 / ranks))
    assert fr["ndcg@10"]["mean"] == pytest.approx(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0)))
    with pytest.raises(ValueError, match="full_ranking needs scorer='embedding'"):
        run_evaluate(EvalConfig(model="tiny-gemma3", users=2, negatives=19, history_len=3, full_ranking=True,
                       results_dir=str(tmp_path / "r")), report=None)


# -- packed scoring: every candidate of a user behind one copy of its history, under a block mask

@pytest.mark.parametrize("scorer", ["likelihood", "yesno"])
@pytest.mark.parametrize("row_tokens", [None, 40])  # 40: rows split, the history repeated per row
def test_packed_equals_kv_cache_batches_and_naive(tiny, scorer, row_tokens):
    name, model, tok = tiny
    reqs = [REQ, Request(REQ.history[:1], REQ.candidates[::-1]), Request([], REQ.candidates[:2])]
    cfg = dict(scorer=scorer, calibration="none", row_tokens=row_tokens)
    packed = score(model, tok, reqs, ScoringConfig(packed=True, **cfg))
    cached = score(model, tok, reqs, ScoringConfig(packed=False, **cfg))
    for p, c, r in zip(packed, cached, reqs, strict=True):
        naive = score_naive(model, tok, r, ScoringConfig(**cfg))
        np.testing.assert_allclose(p, naive, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(p, c, atol=1e-4, err_msg=name)
        assert np.argsort(-p, kind="stable").tolist() == np.argsort(-naive, kind="stable").tolist()


def test_packed_rows_share_one_prefix_copy_per_row():
    from layerviz.scoring import pack_rows

    rows = pack_rows(7, [1, 2, 3], [[10, 11], [12], [13, 14, 15]], row_tokens=6)
    assert [r.ids for r in rows] == [[1, 2, 3, 10, 11, 12], [1, 2, 3, 13, 14, 15]]
    assert rows[0].segment == [0, 0, 0, 1, 1, 2] and rows[0].position == [0, 1, 2, 3, 4, 3]
    assert rows[1].blocks == [(2, 3, 3)] and all(r.user == 7 for r in rows)
    # a block longer than the budget still gets a row of its own
    assert len(pack_rows(0, [1, 2, 3], [[9] * 10], row_tokens=4)) == 1


def test_sliding_window_mask_matches_the_models_own_masks():
    """A tiny Mistral (every layer slides) and tiny Gemma3 (alternating) with windows shorter than the prompt."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.conftest import _load

    _, tok = _load("tiny-llama3")
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16, sliding_window=8)).eval()
    gemma, _ = _load("tiny-gemma3")  # sliding window 32
    for model in (mistral, gemma):
        assert arch.sliding_window(model) is not None
        cfg = ScoringConfig(calibration="none", packed=True)
        np.testing.assert_allclose(score(model, tok, [REQ], cfg)[0], score_naive(model, tok, REQ, cfg), atol=1e-4)


def test_fallback_when_attention_takes_no_block_mask(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from layerviz import scoring
    from tests.conftest import _load

    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert "flash_attention_2" in arch.packed_mask_unsupported(flash)
    model, tok = _load("tiny-llama3")
    assert arch.packed_mask_unsupported(model) is None
    packed = score(model, tok, [REQ], ScoringConfig(calibration="none"))[0]
    monkeypatch.setattr(scoring.arch, "packed_mask_unsupported", lambda m: "no 4D masks here")
    with caplog.at_level(logging.DEBUG, logger="layerviz.scoring"):
        fallback = score(model, tok, [REQ], ScoringConfig(calibration="none"))[0]
    assert "packed scoring off (no 4D masks here)" in caplog.text
    np.testing.assert_allclose(packed, fallback, atol=1e-4)
    with pytest.raises(ValueError, match="packed scoring is not possible.*no 4D masks here"):
        score(model, tok, [REQ], ScoringConfig(calibration="none", packed=True))


def test_bad_requests_are_clear_errors_or_documented_scores(tiny):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="1 request\\(s\\) have no candidates"):
        score(model, tok, [REQ, Request(REQ.history, [])], ScoringConfig())
    with pytest.raises(ValueError, match="max_title_tokens must be at least 1"):
        score(model, tok, [REQ], ScoringConfig(max_title_tokens=0))
    empty = score(model, tok, [Request(REQ.history, ["", "   "])], ScoringConfig(calibration="none"))[0]
    assert empty.shape == (2,) and np.isfinite(empty).all()  # a blank title still has its leading-space token


def test_history_longer_than_the_context_is_cut_from_the_oldest_side():
    import warnings

    from layerviz.models import load_model
    from layerviz.scoring import fit_context

    model, tok = load_model("tiny-llama3", device="cpu")
    model.config.max_position_embeddings = 96
    long = Request([f"Product number {i} with a long descriptive title" for i in range(12)], REQ.candidates[:3])
    with pytest.warns(UserWarning, match="1 of 2 histories were longer than the model's context \\(96 tokens\\)"):
        got = score(model, tok, [long, REQ], ScoringConfig(calibration="none"))
    cut = fit_context(model, Prompt(tok, ScoringConfig()), [long], "likelihood")[0]
    assert 0 < len(cut.history) < len(long.history) and cut.history == long.history[-len(cut.history):]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cut request fits: no warning, and the same scores
        want = score(model, tok, [cut], ScoringConfig(calibration="none"))[0]
    np.testing.assert_allclose(got[0], want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smollm2-135m", "gemma3-270m"])
def test_packed_equals_naive_on_the_real_models(preset):
    from tests.conftest import _load

    model, tok = _load(preset)
    reqs = [Request(REQ.history, REQ.candidates[:4]), Request(REQ.history[1:], REQ.candidates[2:])]
    for scorer in ("likelihood", "yesno"):
        cfg = ScoringConfig(scorer=scorer, calibration="none", packed=True)
        for r, s in zip(reqs, score(model, tok, reqs, cfg), strict=True):
            naive = score_naive(model, tok, r, cfg)
            np.testing.assert_allclose(s, naive, atol=2e-3, rtol=1e-3)
            assert np.argsort(-s).tolist() == np.argsort(-naive).tolist()


def test_bench_scoring_reports_the_token_bound_as_json(tmp_path, monkeypatch):
    """benchmarks/bench_scoring.py at tiny shapes: every field, and a bound that counts the tokens."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scoring.py"
    spec = importlib.util.spec_from_file_location("bench_scoring", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rows.json"
    mod.main(["--model", "tiny-llama3", "--users", "1", "--histories", "2", "--candidates", "4", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["scorer"], r["calibration"]) for r in rows] == mod.SCORERS
    for r in rows:
        assert {"history", "candidates", "speedup", "bound", "ratio", "same_ranks"} <= set(r)
        assert r["candidates"] == 4 and r["history"] == 2 and r["same_ranks"] is True
        assert r["ratio"] == pytest.approx(r["speedup"] / r["bound"]) and r["bound"] > 1
    from tests.conftest import _load

    _, tok = _load("tiny-llama3")
    req = Request(["a b", "c"], ["d e f", "g"])
    cfg = ScoringConfig(calibration="none")
    text = Prompt(tok, cfg)
    p, t = len(text.likelihood_prefix(req.history)), [len(text.title_ids(x)) for x in req.candidates]
    assert mod.token_counts(tok, [req], cfg) == (2 * p + sum(t), p + sum(t))
    head = mod.main(["--model", "tiny-llama3", "--head", "--head-rows", "5", "--vocab-blocks", "1000", "49152"])
    assert [(r["rows"], r["vocab_block"]) for r in head] == [(5, 1000), (5, 49152)]
    assert all(r["max_abs_diff"] < 1e-4 and r["speedup"] > 0 for r in head)
