# One entry point per job. Every target sets up .venv first when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed
SHAKESPEARE ?= ../shared/data/tinyshakespeare.txt
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: setup test test-fast serve train-default train-chains bench bench-decode bench-quick bench-spec soak ablation ablation-quick clean

setup: $(STAMP)

# Reinstall when the dependency list changes. torch is pinned to the CPU wheel on disk.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest tests

serve: setup
	$(PYTHON) -m server --host $(HOST) --port $(PORT)

train-default: setup
	$(PYTHON) -m training.default_model --text $(SHAKESPEARE) --out model/default

# The chains model (docs/DEPTH.md): generated problems, no data file; rerunning resumes from runs/chains.
train-chains: setup
	$(PYTHON) -m training.chains_model --out model/chains

bench: setup
	$(PYTHON) -m benchmarks.run --out docs/benchmarks.json
	$(PYTHON) -m benchmarks.decode_speed --out docs/decode-speed.json

# The decode-speed targets alone (docs/BENCHMARKS.md part 8): eager / compiled / bf16 vs HF, HTTP, c32.
bench-decode: setup
	$(PYTHON) -m benchmarks.decode_speed --out docs/decode-speed.json

bench-quick: setup
	$(PYTHON) -m benchmarks.run --quick --out docs/benchmarks-quick.json

bench-spec: setup
	$(PYTHON) -m benchmarks.speculation --out docs/speculation.json

soak: setup
	$(PYTHON) -m pytest tests -m soak --run-soak

ablation: setup
	$(PYTHON) -m training.experiments.ablation --text $(SHAKESPEARE) --out runs/ablation

ablation-quick: setup
	$(PYTHON) -m training.experiments.ablation --quick --text $(SHAKESPEARE) --out runs/ablation-quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
