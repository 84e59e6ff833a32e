import gzip
import http.server
import json
import shutil
import threading
import warnings
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerviz.data import (
    CandidateConfig,
    DataFormatError,
    DataWarning,
    PrepConfig,
    build_candidates,
    candidates_for,
    prepare,
    read_dataset,
)
from layerviz.data import synthetic as synthetic_mod
from layerviz.data.bundled import synthetic_dir
from layerviz.data.candidates import candidates_key, load_candidates, save_candidates
from layerviz.data.download import DownloadError, Source, download

FIX = Path(__file__).parent / "fixtures"
PRODUCT_DIRS = ["amazon2014", "amazon2018", "amazon2018_csv", "amazon2023", "amazon2023_csv"]
MOVIE_DIRS = ["ml-100k", "ml-1m", "ml-latest"]
NO_KCORE = PrepConfig(positive_threshold=0, kcore=1)


def _norm(raw):
    inter = raw.interactions.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    items = raw.items[["item_id", "title"]].sort_values("item_id").reset_index(drop=True)
    return inter, items


@pytest.mark.parametrize("family", [PRODUCT_DIRS, MOVIE_DIRS], ids=["amazon", "movielens"])
def test_every_official_layout_parses_to_the_same_frames(family):
    expected_fmt = {"amazon2018_csv": "amazon2018", "amazon2023_csv": "amazon2023"}
    preps, raws = [], []
    for d in family:
        raw = read_dataset(FIX / d, report=None)
        assert raw.format == expected_fmt.get(d, d)
        assert list(raw.interactions.columns) == ["user_id", "item_id", "rating", "timestamp"]
        assert raw.interactions["timestamp"].dtype == np.int64
        raws.append(raw)
        preps.append(prepare(raw, NO_KCORE, report=None))
    for raw, prep in zip(raws[1:], preps[1:], strict=True):
        pd.testing.assert_frame_equal(_norm(raw)[1], _norm(raws[0])[1])
        pd.testing.assert_frame_equal(prep.events, preps[0].events)
    # the raw frames match too, except the 2018 ratings CSV which carries one duplicate pair
    for d, raw in zip(family, raws, strict=True):
        if d != "amazon2018_csv":
            pd.testing.assert_frame_equal(_norm(raw)[0], _norm(raws[0])[0])


def test_exact_field_values():
    raw = read_dataset(FIX / "ml-100k", report=None)
    titles = dict(zip(raw.items.item_id, raw.items.title, strict=True))
    assert titles["20"] == "Café Society (1995)"  # latin-1 decoded
    cats = dict(zip(raw.items.item_id, raw.items.categories, strict=True))
    assert cats["10"] == "Animation|Children's|Comedy"
    a14 = read_dataset(FIX / "amazon2014", report=None)
    assert a14.items.set_index("item_id").loc["B0005", "categories"] == "Electronics > Camera & Photo > Lenses"
    first = a14.interactions.iloc[0]
    assert (first.user_id, first.item_id, first.rating, first.timestamp) == ("U1", "B0001", 5.0, 1400000000)
    a23 = read_dataset(FIX / "amazon2023", report=None)  # milliseconds -> seconds
    assert a23.interactions["timestamp"].iloc[0] == 1400000000


def test_auto_detection_says_what_it_chose():
    said = []
    read_dataset(FIX / "ml-1m", report=said.append)
    assert "detected format ml-1m" in said[0]


def test_reviews_file_path_and_gzip(tmp_path):
    d = tmp_path / "a23"
    shutil.copytree(FIX / "amazon2023", d)
    with open(d / "Electronics.jsonl", "rb") as f, gzip.open(d / "Electronics.jsonl.gz", "wb") as g:
        g.write(f.read())
    (d / "Electronics.jsonl").unlink()
    raw = read_dataset(d / "Electronics.jsonl.gz", report=None)
    assert len(raw.interactions) == 14 and raw.format == "amazon2023"


def test_wrong_format_names_the_right_one(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(FIX / "amazon2018" / "Electronics_5.json", d)
    shutil.copy(FIX / "amazon2014" / "meta_Electronics.json", d)
    with pytest.raises(DataFormatError, match="looks like Amazon 2014 meta.*format='amazon2014'"):
        read_dataset(d, format="amazon2018", report=None)
    with pytest.raises(DataFormatError, match="looks like MovieLens 1M"):
        read_dataset(FIX / "ml-1m" / "ratings.dat", format="amazon2023", report=None)


def test_missing_file_and_unknown_layout(tmp_path):
    with pytest.raises(DataFormatError, match="no such file or folder"):
        read_dataset(tmp_path / "nope", report=None)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DataFormatError, match="cannot detect the dataset format"):
        read_dataset(tmp_path, report=None)
    d = tmp_path / "ml"
    d.mkdir()
    shutil.copy(FIX / "ml-100k" / "u.data", d)
    with pytest.raises(DataFormatError, match="u.item: file not found"):
        read_dataset(d, format="ml-100k", report=None)


def test_rows_with_missing_fields_are_counted(tmp_path):
    d = tmp_path / "a14"
    shutil.copytree(FIX / "amazon2014", d)
    with open(d / "reviews_Electronics_5.json", "a") as f:
        f.write(json.dumps({"reviewerID": "U9", "asin": "B0001", "unixReviewTime": 1}) + "\n")
        f.write(json.dumps({"reviewerID": "U9", "overall": 5.0, "unixReviewTime": 1}) + "\n")
    with pytest.warns(DataWarning, match=r"skipped 2 row\(s\).*first at line 15: missing overall"):
        raw = read_dataset(d, report=None)
    assert len(raw.interactions) == 14


def test_invalid_utf8_names_line_and_latin1(tmp_path):
    d = tmp_path / "ml"
    shutil.copytree(FIX / "ml-latest", d)
    with open(d / "ratings.csv", "ab") as f:
        f.write(b"9,20,4.0,1\n" + "9,Caf\xe9,4.0,1\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"ratings.csv:13: .*not valid utf-8.*latin-1"):
        read_dataset(d, report=None)


def test_prepare_protocol():
    raw = read_dataset(FIX / "amazon2018_csv", report=None)
    said = []
    prep = prepare(raw, PrepConfig(positive_threshold=4, kcore=1), report=said.append)
    ev = prep.events
    # dedup keeps the earliest (U1,B0001) rating (5.0 in 2014), not the 1.0 from 2017
    assert ((ev.user_id == "U1") & (ev.item_id == "B0001")).sum() == 1
    assert ev.groupby("user_id").size().min() >= 3  # leave-one-out needs 3
    # leave-one-out by (timestamp, item_id): U4's last two positives share a timestamp
    u4 = ev[ev.user_id == "U4"]
    assert list(u4.item_id) == ["B0005", "B0002", "B0003"] and list(u4.split) == ["train", "valid", "test"]
    assert prep.targets("test")["U4"] == "B0003" and prep.histories("test")["U4"] == ["B0005", "B0002"]
    assert prep.histories("valid")["U4"] == ["B0005"]
    assert list(prep.stats.step)[:3] == ["raw", "dedup (user, item)", "positives (rating >= 4)"]
    assert any("density=" in s for s in said)
    # never recommend what the user already rated, even with a low rating
    assert "B0004" in prep.seen_by_user()["U4"]


def test_untitled_items_are_dropped_and_reported():
    raw = read_dataset(FIX / "amazon2014", report=None)
    raw.items.loc[raw.items.item_id == "B0005", "title"] = ""
    said = []
    prep = prepare(raw, NO_KCORE, report=said.append)
    assert "B0005" not in set(prep.events.item_id)
    assert any("dropped 1 item(s) with no title" in s for s in said)


def test_empty_after_kcore_is_a_clear_error():
    raw = read_dataset(FIX / "ml-100k", report=None)
    with pytest.raises(DataFormatError, match="no users left after 5-core.*Lower kcore"):
        prepare(raw, report=None)


def test_users_with_too_few_interactions_warn():
    raw = read_dataset(FIX / "ml-100k", report=None)
    with pytest.warns(DataWarning, match="fewer than 3 positives"):
        prepare(raw, PrepConfig(positive_threshold=4, kcore=1), report=None)


@pytest.fixture(scope="module")
def synthetic_prep():
    """The synthetic electronics data under the default protocol, from the run's one generated folder."""
    out = synthetic_mod.generate(synthetic_dir())
    with warnings.catch_warnings():
        return prepare(read_dataset(out / "electronics", report=None), report=None)


def test_kcore_holds_on_synthetic_data(synthetic_prep):
    ev = synthetic_prep.events
    assert ev.groupby("user_id").size().min() >= 5 and ev.groupby("item_id").size().min() >= 5
    assert synthetic_prep.stats.iloc[-1].users == ev.user_id.nunique()


def test_candidates_are_valid(synthetic_prep):
    c = build_candidates(synthetic_prep, CandidateConfig(negatives=99, users=50, seed=3))
    seen = synthetic_prep.seen_by_user()
    assert len(c) == 50 and c.user_id.is_monotonic_increasing
    for row in c.itertuples():
        assert len(row.candidates) == 100 == len(set(row.candidates))
        assert row.candidates[row.pos_index] == row.positive
        assert not (set(row.candidates) - {row.positive}) & seen[row.user_id]
    assert c.pos_index.nunique() > 10  # shuffled, not always first
    small = build_candidates(synthetic_prep, CandidateConfig(negatives=19, users=20, sampler="popularity"))
    assert {len(x) for x in small.candidates} == {20}


def test_same_seed_gives_byte_identical_candidate_files(synthetic_prep, tmp_path):
    cfg = CandidateConfig(negatives=19, users=30, seed=7)
    a, pa = candidates_for(synthetic_prep, cfg, tmp_path / "a")
    b, pb = candidates_for(synthetic_prep, cfg, tmp_path / "b")
    assert pa.read_bytes() == pb.read_bytes()
    c = build_candidates(synthetic_prep, CandidateConfig(negatives=19, users=30, seed=8))
    assert list(c.candidates.map(tuple)) != list(a.candidates.map(tuple))
    again, _ = candidates_for(synthetic_prep, cfg, tmp_path / "a")  # served from disk
    pd.testing.assert_frame_equal(again, a)


def test_candidates_refuse_other_data(synthetic_prep, tmp_path):
    cfg = CandidateConfig(negatives=19, users=5)
    df = build_candidates(synthetic_prep, cfg)
    path = save_candidates(df, tmp_path / "c.parquet", candidates_key(synthetic_prep, cfg))
    other = CandidateConfig(negatives=19, users=5, seed=1)
    with pytest.raises(DataFormatError, match="built for other data or settings"):
        load_candidates(path, candidates_key(synthetic_prep, other))


def test_synthetic_generator_is_deterministic(tmp_path):
    """A fresh generation equals, byte for byte, the run's shared folder (written by the same generator)."""
    a, b = synthetic_mod.generate(tmp_path / "a"), synthetic_mod.generate(synthetic_dir())
    for f in sorted(a.rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f
    movies = prepare(read_dataset(a / "movies", report=None), report=None)
    assert movies.users.size > 1000 and movies.domain == "movies"


# ----------------------------------------------------------------------------- download


@pytest.fixture()
def http_dir(tmp_path):
    """A local http.server serving tmp_path/www (no internet needed)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _zip_fixture(www: Path) -> str:
    with zipfile.ZipFile(www / "ml-100k.zip", "w") as z:
        for f in (FIX / "ml-100k").iterdir():
            z.write(f, f"ml-100k/{f.name}")
    import hashlib

    return hashlib.md5((www / "ml-100k.zip").read_bytes()).hexdigest()


def test_download_verifies_and_unpacks(http_dir, tmp_path):
    www, url = http_dir
    md5 = _zip_fixture(www)
    dest = tmp_path / "raw"
    download("ml-100k", dest, {"ml-100k": [Source(f"{url}/ml-100k.zip", f"md5:{md5}", unpack=True)]})
    raw = read_dataset(dest / "ml-100k", report=None)
    assert raw.format == "ml-100k" and len(raw.interactions) == 10
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]


def test_download_bad_checksum_keeps_nothing(http_dir, tmp_path):
    www, url = http_dir
    _zip_fixture(www)
    dest = tmp_path / "raw"
    with pytest.raises(DownloadError, match="md5 is .* expected 0000"):
        download("x", dest, {"x": [Source(f"{url}/ml-100k.zip", "md5:" + "0" * 32, unpack=True)]})
    assert list(dest.iterdir()) == []
    with pytest.raises(DownloadError, match="could not download.*Nothing partial"):
        download("x", dest, {"x": [Source(f"{url}/missing.zip", None)]})
    assert list(dest.iterdir()) == []
    with pytest.raises(ValueError, match="unknown dataset"):
        download("ml-42m", dest)
