# mmdiag: `make demo` runs the demo pipeline, `make test` the test suite; both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
CORES ?= $(shell nproc)
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmdiag-installed
# Snakemake's jobs call `python -m mmdiag`: the virtual environment must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo report test lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,slurm]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/snakemake --cores $(CORES) all

# The Snakemake HTML report of everything the run made (after `make demo`).
report: install
	$(BIN)/snakemake --report results/report.html all

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/snakefmt --check .
	$(BIN)/snakemake --lint

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/snakefmt .

clean:
	rm -rf results logs .snakemake
