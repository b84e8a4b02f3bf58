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

.PHONY: setup assets demo demo-quick test lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

assets: setup
	$(BIN)/python -m torchtune_medusa.assets prepare

# The main job, end to end on the embedded default (SmolLM2-135M-Instruct, CPU, offline):
#   1. self-distillation data: SmolLM2 answers DEMO_PROMPTS ShareGPT training prompts (greedy, bf16 where native,
#      DEMO_SHARDS one-thread processes sharing the batches) and keeps the hidden state behind every reply token
#      (--save-hidden), and answers DEMO_VAL_PROMPTS held-out ones for validation (resumable: rerunning continues
#      where it stopped);
#   2. Medusa-1 heads trained on the saved hidden states, with no second pass of the backbone over the data
#      (`tune run medusa_finetune`, self_distilled_hidden_dataset; DEMO_HEADS heads over the 8,192 most frequent
#      target tokens: two, because the trees this CPU can afford go two tokens deep, and a third head's training
#      time buys more self-distilled data;
#      a held-out validation every DEMO_VAL_EVERY steps gives the learning curve; the final one decodes held-out
#      prompts for real and calibrates the tree on this machine's measured step cost);
#   3. benchmarks/bench_decode.py on DEMO_BENCH_PROMPTS other held-out prompts: baseline vs Medusa with the shipped
#      decode settings (lookup drafts included), and side by side the heads alone (DEMO_LOOKUP: the lookup-draft
#      lengths timed, the first is the shipped one), greedy outputs checked identical in fp32 and bf16 compared with
#      fp32, results table printed and written to DEMO_OUT/bench/.
# `make demo-quick` is the same pipeline at a size that finishes in minutes.
DEMO_OUT ?= output/smollm2_135m_medusa
DEMO_PROMPTS ?= 3600
DEMO_VAL_PROMPTS ?= 48
DEMO_EPOCHS ?= 3
DEMO_HEADS ?= 2
DEMO_VAL_EVERY ?= 100
DEMO_NEW_TOKENS ?= 128
DEMO_BENCH_PROMPTS ?= 16
DEMO_BENCH_REPEATS ?= 1
DEMO_TREES ?= trained
DEMO_LOOKUP ?= 6,0
DEMO_SHARDS ?= $(shell nproc 2>/dev/null || echo 2)
# Decoding runs with the shipped decode settings (bf16 where native, every core but one, compile auto: the prepacked
# eager step for bf16 on CPU) and reports bf16 against fp32 greedy output on DEMO_QUALITY_PROMPTS prompts.
DEMO_COMPILE ?= auto
DEMO_QUALITY_PROMPTS ?= 16
DEMO_EXTRA ?=
CACHE = $$($(BIN)/python -m torchtune_medusa.assets path)
SELF_DISTILL = $(BIN)/python -m torchtune_medusa.data.self_distill --batch-size 32 --max-prompt-len 256 \
  --max-new-tokens $(DEMO_NEW_TOKENS)

demo: assets
	pids=""; for i in $$(seq 0 $$(($(DEMO_SHARDS) - 1))); do \
	  $(SELF_DISTILL) --threads 1 --limit $(DEMO_PROMPTS) --shard $$i/$(DEMO_SHARDS) --save-hidden \
	    --output $(DEMO_OUT)/data/train.$$i-of-$(DEMO_SHARDS).jsonl & pids="$$pids $$!"; \
	done; for p in $$pids; do wait $$p || exit 1; done
	$(SELF_DISTILL) --threads $(DEMO_SHARDS) --output $(DEMO_OUT)/data/heldout.jsonl --limit $(DEMO_VAL_PROMPTS) \
	  --data $(CACHE)/sharegpt/heldout.jsonl
	# a shard that got no batch (fewer batches than shards) writes no file
	files=$$(ls $(DEMO_OUT)/data/train.*-of-$(DEMO_SHARDS).jsonl | paste -sd, -); \
	$(BIN)/tune run medusa_finetune --config smollm2/135M_medusa output_dir=$(DEMO_OUT) epochs=$(DEMO_EPOCHS) \
	  dtype=bf16 model.medusa_num_heads=$(DEMO_HEADS) \
	  dataset._component_=torchtune_medusa.data.self_distilled_hidden_dataset "dataset.data_files=[$$files]" \
	  '~dataset.split' \
	  dataset.max_seq_len=512 tokenizer.max_seq_len=512 validation.dataset.data_files=$(DEMO_OUT)/data/heldout.jsonl \
	  validation.dataset.max_seq_len=512 validation.max_samples=$(DEMO_VAL_PROMPTS) \
	  validation.every_n_steps=$(DEMO_VAL_EVERY) $(DEMO_EXTRA)
	$(BIN)/python benchmarks/bench_decode.py --model checkpoint --checkpoint $(DEMO_OUT) --compile $(DEMO_COMPILE) \
	  --quality-prompts $(DEMO_QUALITY_PROMPTS) \
	  --prompt-file $(CACHE)/sharegpt/heldout.jsonl --prompt-skip $(DEMO_VAL_PROMPTS) --num-prompts $(DEMO_BENCH_PROMPTS) \
	  --max-new-tokens $(DEMO_NEW_TOKENS) --repeats $(DEMO_BENCH_REPEATS) --trees '$(DEMO_TREES)' \
	  --lookup-tokens '$(DEMO_LOOKUP)' --step-sizes 1,4,16 --context-len 256 --out $(DEMO_OUT)/bench

demo-quick:
	$(MAKE) demo DEMO_OUT=output/smollm2_135m_medusa_quick DEMO_PROMPTS=32 DEMO_VAL_PROMPTS=8 DEMO_EPOCHS=2 \
	  DEMO_VAL_EVERY=4 DEMO_NEW_TOKENS=64 DEMO_BENCH_PROMPTS=2 DEMO_BENCH_REPEATS=1 DEMO_COMPILE=off \
	  DEMO_QUALITY_PROMPTS=2

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
