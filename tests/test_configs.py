# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Every shipped config (found by globbing ``configs/``, so a new one is covered without editing this file):
registered with ``tune``, its components importable and its model/loss/optimizer built on the meta device; and
every SmolLM2 config run for a step or a few tokens on the offline assets (issue 15.2)."""

import json
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

from torchtune_medusa._config import register_resolvers
from torchtune_medusa._recipe_registry import RECIPES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
RECIPE_OF = {config_file: entry.name for entry in RECIPES for config_file in entry.configs}
SMOLLM2_CONFIGS = [c for c in CONFIGS if c.startswith("smollm2/")]

register_resolvers()


def load_config(name: str) -> DictConfig:
    return OmegaConf.load(REPO / "configs" / name)


def components(node: Any, where: str = "") -> Iterator[Tuple[str, str]]:
    """``(config key, _component_ path)`` of every component in a config tree."""
    if isinstance(node, dict):
        if "_component_" in node:
            yield where or "<root>", node["_component_"]
        for key, value in node.items():
            yield from components(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from components(value, f"{where}[{i}]")


def test_configs_are_found():
    assert "smollm2/135M_generate.yaml" in CONFIGS and "llama3_3/llama_medusa.yaml" in CONFIGS
    assert len(SMOLLM2_CONFIGS) >= 3


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_registered_with_tune(name):
    """``tune ls``/``tune cp``/``tune run --config`` only know the configs the registry lists."""
    assert name in RECIPE_OF, f"configs/{name} is not listed in torchtune_medusa/_recipe_registry.py RECIPES"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_components_instantiate_on_meta(name):
    """torchtune's test_configs pattern: every ``_component_`` resolves; the model, loss, optimizer and scheduler
    are built (model weights on the meta device: no memory, no checkpoint)."""
    cfg = load_config(name)
    for key, path in components(OmegaConf.to_container(cfg, resolve=True)):
        assert callable(_get_component_from_path(path)), f"{name}: {key}._component_={path} is not callable"
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    assert model.num_medusa_heads == cfg.model.medusa_num_heads
    if RECIPE_OF[name] != "medusa_finetune":
        return
    assert callable(config.instantiate(cfg.loss))
    optimizer = config.instantiate(cfg.optimizer, list(model.medusa_heads.parameters()))
    if cfg.get("lr_scheduler") is not None:
        config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=10)


def set_if_present(cfg: DictConfig, overrides: dict) -> DictConfig:
    """Apply the overrides whose key the config has (the recipes reject unknown keys; keys of a null section,
    such as ``validation: null``, are not there)."""
    missing = object()
    for key, value in overrides.items():
        if OmegaConf.select(cfg, key, default=missing) is not missing:
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


#: A step or two of training on a few short conversations, a tiny validation with tree calibration.
QUICK_FINETUNE = {
    "epochs": 1,
    "max_steps_per_epoch": 2,
    "batch_size": 2,
    "dataset.split": "train[:16]",
    "dataset.max_seq_len": 64,
    "tokenizer.max_seq_len": 64,
    "validation.max_samples": 2,
    "validation.batch_size": 2,
    "validation.dataset.max_seq_len": 64,
    "validation.num_prompts": 1,
    "validation.max_prompt_len": 48,
    "validation.max_new_tokens": 4,
    "validation.calibrate_tree_nodes": 3,
    "validation.tree_cost": "none",
}


@pytest.mark.parametrize("name", [c for c in SMOLLM2_CONFIGS if RECIPE_OF.get(c) == "medusa_finetune"])
def test_smollm2_finetune_config_trains_a_step(name, smollm2_assets, tmp_path):
    from tests.test_recipe import run_recipe
    from torchtune_medusa import load_medusa

    out = tmp_path / "out"
    cfg = set_if_present(load_config(name), {**QUICK_FINETUNE, "output_dir": str(out)})
    if cfg.get("medusa_version", 1) == 2:  # both stages: heads warm-up, then joint
        cfg.stages = [{"name": "heads_warmup", "steps": 1}, {"name": "joint"}]
    recipe = run_recipe(cfg)
    assert recipe.global_step == 2
    run = load_medusa(out)
    assert run.model.num_medusa_heads == cfg.model.medusa_num_heads
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["medusa_version"] == cfg.get("medusa_version", 1)
    if cfg.get("validation") is not None:
        assert run.medusa_choices is not None and len(run.medusa_choices) <= 3


@pytest.mark.parametrize("name", [c for c in SMOLLM2_CONFIGS if RECIPE_OF.get(c) == "medusa_generate"])
def test_smollm2_generate_config_runs_as_shipped(name, smollm2_assets, tmp_path):
    """As shipped, cut to a few tokens of one prompt and eager (compile=auto compiles for about a minute)."""
    from tests.test_generate_recipe import run_recipe

    out = tmp_path / "out"
    cfg = set_if_present(load_config(name), {"output_dir": str(out), "max_new_tokens": 4, "compile": "off"})
    cfg.prompts = cfg.prompts[:1]
    assert run_recipe(cfg) == 0
    report = json.loads((out / "generate_results.json").read_text())
    (row,) = report["results"]
    assert row["medusa"]["new_tokens"] == 4 and row["text"]
    if cfg.get("compare_baseline") and report["config"]["dtype"] in ("fp32", "float32"):
        assert row["same_tokens_as_baseline"] is True
