# `make repro` and `make test` are all a fresh clone needs (Python 3.10+, PyPI reachable).
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(abspath $(VENV)/bin)
# DVC stages call `python -m pipeline`: put the venv first so they find it.
export PATH := $(BIN):$(PATH)

.PHONY: install repro test test-fast plots plots-template ui bench bench-quick docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# what the benchmark compares against (Lightning): a comparison must never be skipped for want of an install
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

# plain `dvc plots show` renders offline too: DVC's page with Vega inline, named in .dvc/config.local (written once)
plots-template: install
	@python -m pipeline plots --template-only

# DVC ends every repro that ran a stage with a hint to `dvc push`, remote or not: shown only where there is one
repro: install plots-template
	@if dvc remote default >/dev/null 2>&1; then dvc repro; \
	else set -o pipefail; dvc repro | sed '/^Use `dvc push` to send your updates to remote storage.$$/d'; fi

# pytest exits 5 when it collected nothing: that is a failure here, not a pass. Two workers (pytest-xdist), each
# taking whole modules (--dist loadscope), so a module's shared fixture is built once.
PYTEST = rc=0; pytest -n 2 --dist loadscope --no-loadscope-reorder --durations=15 $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# everything, end-to-end runs of the real DVC pipeline included
test: install
	@$(call PYTEST,)

# the edit loop: unit and CLI tests, no end-to-end pipelines (marked slow)
test-fast: install
	@$(call PYTEST,-m "not slow")

# DVC's plots as one page that renders offline (dvc_plots/index.html; DVC's own page loads Vega from a CDN)
plots: install
	python -m pipeline plots

# mlflow ui and optuna-dashboard on 127.0.0.1 against the repo's stores; Ctrl-C stops both.
ui: install
	python -m pipeline ui

# every comparison, default sizes (~10 minutes on 2 cores): the table, docs/bench/<device>.json and docs/performance.md
bench: $(VENV)/.bench-installed
	python benchmarks/bench.py

# small sizes (about a minute), and a check that every comparison ran: what CI runs
bench-quick: $(VENV)/.bench-installed
	python benchmarks/bench.py --quick --check --out $(or $(BENCH_OUT),/tmp/pipeline-bench-quick.json)

# docs/params.md from the config's own field descriptions
docs: install
	python scripts/params_reference.py

clean:
	rm -rf checkpoints dvc_plots .pytest_cache
