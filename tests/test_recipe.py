# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The ``medusa_finetune`` recipe on a tiny SmolLM2-style model, tokenizer and chat data built in a temporary
folder (CPU, no assets, no network)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import tune_to_hf

from tests.data_common import conv, write_jsonl, write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "medusa_finetune.py"

TINY_ARGS = dict(
    vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=256
)


def _load_recipe_module():
    spec = importlib.util.spec_from_file_location("medusa_finetune_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


recipe_mod = _load_recipe_module()


def _toy_rows(n: int, offset: int = 0):
    """Learnable toy chats: the assistant counts on from a number the user gives."""
    rows = []
    for i in range(n):
        start = (i + offset) % 7
        seq = " ".join(str((start + j) % 10) for j in range(24))
        rows.append(conv("human", f"Count from {start}.", "gpt", seq))
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """tiny HF checkpoint (random smollm2-style, tied output) + tokenizer + train/held-out chat files."""
    from torchtune_medusa.models import smollm2

    root = tmp_path_factory.mktemp("medusa_recipe")
    hf = root / "hf"
    write_tiny_tokenizer(hf)
    torch.manual_seed(0)
    base = smollm2(**TINY_ARGS, rope_base=10_000)
    sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    hf_sd = tune_to_hf(sd, num_heads=4, num_kv_heads=2, dim=64)
    save_file(hf_sd, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_hidden_layers": 2,
                "intermediate_size": 128,
                "vocab_size": 512,
                "tie_word_embeddings": True,
                "rope_theta": 10000.0,
            }
        )
    )
    train = write_jsonl(root / "train.jsonl", _toy_rows(32))
    heldout = write_jsonl(root / "heldout.jsonl", _toy_rows(8, offset=3))
    return {"root": root, "hf": hf, "train": train, "heldout": heldout}


def make_cfg(assets, out: Path, *, version: int = 1, **overrides):
    model = {
        "_component_": "torchtune_medusa.models.medusa_smollm2" if version == 1 else "torchtune_medusa.models.lora_medusa_smollm2",
        **TINY_ARGS,
        "rope_base": 10_000,
        "medusa_num_heads": 3,
        "medusa_num_layers": 1,
        "medusa_projection": "own",
    }
    if version == 2:
        model.update(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, lora_rank=4, lora_alpha=8)
    cfg = {
        "output_dir": str(out),
        "medusa_version": version,
        "model": model,
        "tokenizer": {"_component_": "torchtune_medusa.data.smollm2_tokenizer", "path": str(assets["hf"]),
                      "max_seq_len": 96},
        "checkpointer": {
            "_component_": "torchtune_medusa.training.MedusaHFCheckpointer",
            "checkpoint_dir": str(assets["hf"]),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3",
            "output_dir": str(out),
            "medusa_num_heads": 3,
            "medusa_num_layers": 1,
            "medusa_projection": "own",
        },
        "dataset": {"_component_": "torchtune_medusa.data.medusa_chat_dataset", "data_files": str(assets["train"]),
                    "max_seq_len": 96},
        "seed": 7,
        "shuffle": True,
        "batch_size": 4,
        "epochs": 2,
        "max_steps_per_epoch": None,
        "gradient_accumulation_steps": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.0},
        "medusa_lr_multiplier": 1.0 if version == 1 else 4.0,
        "loss": {
            "_component_": "torchtune_medusa.modules.loss.MedusaCrossEntropyLoss" if version == 1
            else "torchtune_medusa.modules.loss.MedusaSelfDistillationLoss",
            "num_output_chunks": 2,
            "heads_coefficient": 1.0,
            "decay": 0.8,
            "include_base_loss": version == 2,
        },
        "clip_grad_norm": 1.0,
        "device": "cpu",
        "dtype": "fp32",
        "enable_activation_checkpointing": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs")},
        "log_every_n_steps": 1,
        "validation": None,
    }
    cfg = OmegaConf.create(cfg)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def run_recipe(cfg):
    recipe = recipe_mod.MedusaFinetuneRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        import torch.distributed as dist

        if recipe._is_rank_zero and hasattr(recipe, "_metric_logger"):
            recipe._metric_logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return recipe


def heads_sidecar(out: Path, epoch: int):
    return load_file(str(out / f"epoch_{epoch}" / "medusa_lm_head.safetensors"))


def base_weights(out: Path, epoch: int):
    d = out / f"epoch_{epoch}"
    files = sorted(d.glob("model*.safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def read_log(out: Path):
    logs = sorted((out / "logs").glob("*.txt"))
    return logs[-1].read_text()


# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def medusa1_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("m1")
    cfg = make_cfg(assets, out)
    recipe = run_recipe(cfg)
    return out, recipe


def test_medusa1_backbone_bit_identical_heads_trained(assets, medusa1_run):
    out, recipe = medusa1_run
    before = load_file(str(assets["hf"] / "model.safetensors"))
    after = base_weights(out, 1)
    assert set(before) == set(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    heads = heads_sidecar(out, 1)
    assert any(float(v.abs().sum()) > 0 for k, v in heads.items() if k.endswith("linear.weight"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 16


def test_loss_goes_down(medusa1_run):
    out, _ = medusa1_run
    text = read_log(out)
    losses = [float(line.split("loss:")[1].split()[0]) for line in text.splitlines() if " loss:" in line]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
