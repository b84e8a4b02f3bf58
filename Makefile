# Set-up and everyday commands. `make demo` and `make test` work on a fresh CPU machine (see README).
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel: an explicit pin keeps pip from pulling a multi-GB CUDA build onto a CPU machine.
# GPU users: `make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128` or install torch first.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

# Tests and the demo never reach a model hub; tiktoken must not serve stale files from its path-keyed cache.
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export TIKTOKEN_CACHE_DIR :=

BIN := $(VENV)/bin

.PHONY: setup assets demo test lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

assets: setup
	$(BIN)/python -m torchtune_medusa.assets prepare

demo: assets
	cd /tmp && $(CURDIR)/$(BIN)/tune run medusa_finetune --config smollm2/135M_medusa output_dir=$(CURDIR)/output/smollm2_135m_medusa

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
