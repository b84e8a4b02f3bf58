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

DEMO_OUT ?= output/smollm2_135m_medusa

# The embedded default end to end: train Medusa-1 heads on SmolLM2-135M (validation calibrates a tree and measures
# tau with real tree decoding), then decode held-out ShareGPT prompts with those heads next to the baseline.
demo: assets
	$(BIN)/tune run medusa_finetune --config smollm2/135M_medusa output_dir=$(DEMO_OUT)
	$(BIN)/tune run medusa_generate --config smollm2/135M_generate output_dir=$(DEMO_OUT)/generate \
	  checkpointer.medusa_checkpoint_dir=$(DEMO_OUT)/epoch_1 medusa_choices=$(DEMO_OUT)/epoch_1/medusa_choices.json \
	  'prompt_file=$${medusa_cache:}/sharegpt/heldout.jsonl' max_prompts=4 prompts=[] max_new_tokens=96

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
