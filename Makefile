# Set-up is one venv: the CPU torch wheel where pip finds it locally, the default (CUDA) build elsewhere.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-mixtral test test-engines bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,quant,alpaca_eval,ifeval]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	time $(BIN)/smoe-align pipeline --config recipes/tiny/pipeline.yaml

# the same pipeline with a tiny Mixtral-style student (fused experts), into runs/tiny_mixtral
demo-mixtral: setup
	time $(BIN)/smoe-align pipeline --config recipes/tiny/pipeline_mixtral.yaml

test: setup
	$(BIN)/python -m pytest -q

# Ray Data teacher stages and FSDP / ZeRO-3 training on 2 CPU processes: slow start-ups, kept apart (a few minutes)
test-engines: setup
	$(BIN)/pip install -q -e ".[dev,quant,ray,deepspeed]"
	$(BIN)/python -m pytest -q -m engines

clean:
	rm -rf runs
