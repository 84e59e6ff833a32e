import copy
import functools
import os
from pathlib import Path

import pytest
import torch

from layerviz import load_model

os.environ.pop("LAYERVIZ_SYNTHETIC_DIR", None)  # every test (and subprocess) reads the one default folder
# ranx's metrics (the cross-check in test_metrics) run as plain Python: the same arithmetic, without the half
# minute numba takes to compile them on a fresh machine for a few hundred users
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: each worker (and what it starts) on one of the two cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY = ["tiny-llama3", "tiny-qwen3", "tiny-gemma3"]
TINY_LAYERS = {"tiny-llama3": 32, "tiny-qwen3": 36, "tiny-gemma3": 18}


@functools.cache
def _load(spec: str):
    return load_model(spec, device="cpu")


@pytest.fixture(params=TINY)
def tiny(request):
    """(preset name, model, tokenizer) for every tiny family; the model is shared, do not mutate it."""
    model, tok = _load(request.param)
    return request.param, model, tok


@pytest.fixture(scope="session")
def tiny_llama():
    """(tiny-llama3, tokenizer), shared by every test: do not mutate it (``fresh_llama`` gives a copy)."""
    return _load("tiny-llama3")


@pytest.fixture()
def fresh_llama(tiny_llama):
    """A fresh copy of tiny-llama3 (a deep copy of the cached one) and its tokenizer: this test may change it."""
    return copy.deepcopy(tiny_llama[0]), tiny_llama[1]


@pytest.fixture(scope="session")
def synthetic():
    """The SYNTHETIC electronics data under the unit tests' protocol (history 3), prepared once per run; the
    generated files live in the default folder (data/synthetic in a checkout), written once."""
    from layerviz.data import PrepConfig, load

    return load("synthetic-electronics", config=PrepConfig(history_len=3), report=None)


@pytest.fixture(scope="session")
def smollm2():
    """Real pretrained SmolLM2-135M (served from the dequantized cache after the first load)."""
    return _load("smollm2-135m")


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The CI smoke study (tiny random models, synthetic data), computed once for every test that reads one,
    the way a crash leaves it: killed in its first adapter stage (after writing part of its output), then
    resumed -> (stages done before the kill, the Study that resumed, its StudyResult). Do not write into it."""
    from layerviz import study  # here: only the tests that use the study pay for the import
    from layerviz.study import compact_stages  # (as above)

    cfg = study.smoke_config(results_dir=str(tmp_path_factory.mktemp("smoke-results")), device="cpu")
    mp, real = pytest.MonkeyPatch(), compact_stages.run_adapt

    def dying(*a, **k):
        out = Path(k["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "partial.json").write_text('{"half": ')  # what a crash mid-write would leave
        raise Boom("killed mid-stage")

    mp.setattr(compact_stages, "run_adapt", dying)
    with pytest.raises(Boom):
        study.run_study(cfg, report=None)
    mp.undo()
    root = cfg.folder
    done = sorted(str(p.parent.relative_to(root)) for p in root.rglob("done.json"))
    assert real is compact_stages.run_adapt
    (root / "tiny-gemma3/synthetic-electronics/adapters/adapt/partial.json").unlink()  # only the fake left this
    s = study.Study(cfg, report=None)
    return done, s, study.run(s)


@pytest.fixture(scope="session")
def smoke_study(smoke_run):
    """The smoke study's StudyResult (see smoke_run)."""
    return smoke_run[2]


STUDY_FIXTURES = {"smoke_run", "smoke_study", "executed"}


SHARED_FIXTURES = {"both": "two-processes", "exported": "exports"}
"""Other fixtures computed once for the tests that share them: under pytest-xdist those tests run on one worker."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """A test that reads a whole smoke study is a `study` test (``make test-fast`` leaves them out); under
    pytest-xdist they all run on one worker (``--dist loadgroup``), which computes the session's study once, and so
    do the tests of each of SHARED_FIXTURES. The longest tests run first (the study's, then the other `study`
    and `slow` ones), so that on two workers no long test starts last."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if STUDY_FIXTURES & names:
            item.add_marker(pytest.mark.study)
            item.add_marker(pytest.mark.xdist_group("smoke-study"))
        elif shared := sorted(SHARED_FIXTURES[n] for n in SHARED_FIXTURES.keys() & names):
            item.add_marker(pytest.mark.xdist_group(shared[0]))

    def weight(item) -> int:
        group = item.get_closest_marker("xdist_group")
        marks = {m.name for m in item.iter_markers()}
        return 0 if group and group.args == ("smoke-study",) else 1 if "study" in marks else 2 if "slow" in marks \
            else 3

    items[:] = sorted(items, key=weight)  # stable: the order within each weight is the files' own


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
