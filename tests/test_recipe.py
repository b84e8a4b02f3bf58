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
from safetensors.torch import load_file

from tests.common import TINY_CHAT_ARGS, write_tiny_hf_checkpoint
from tests.data_common import conv, write_jsonl
from torchtune_medusa.training._config_checks import check_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "medusa_finetune.py"

TINY_ARGS = TINY_CHAT_ARGS


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
    root = tmp_path_factory.mktemp("medusa_recipe")
    hf = write_tiny_hf_checkpoint(root / "hf")
    train = write_jsonl(root / "train.jsonl", _toy_rows(32))
    heldout = write_jsonl(root / "heldout.jsonl", _toy_rows(8, offset=3))
    return {"root": root, "hf": hf, "train": train, "heldout": heldout}


def make_cfg(assets, out: Path, *, version: int = 1, **overrides):
    model = {
        "_component_": "torchtune_medusa.models.medusa_smollm2"
        if version == 1
        else "torchtune_medusa.models.lora_medusa_smollm2",
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
        "tokenizer": {
            "_component_": "torchtune_medusa.data.smollm2_tokenizer",
            "path": str(assets["hf"]),
            "max_seq_len": 96,
        },
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
        "dataset": {
            "_component_": "torchtune_medusa.data.medusa_chat_dataset",
            "data_files": str(assets["train"]),
            "max_seq_len": 96,
        },
        "seed": 7,
        "shuffle": True,
        "batch_size": 4,
        "epochs": 2,
        "max_steps_per_epoch": None,
        "gradient_accumulation_steps": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.0},
        "medusa_lr_multiplier": 1.0 if version == 1 else 4.0,
        "loss": {
            "_component_": "torchtune_medusa.modules.loss.MedusaCrossEntropyLoss"
            if version == 1
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


def _trainable_state(recipe):
    return {n: p.detach().clone() for n, p in recipe._model.named_parameters()}


@pytest.fixture(scope="module")
def medusa2_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("m2")
    cfg = make_cfg(
        assets,
        out,
        version=2,
        epochs=1,
        max_steps_per_epoch=6,
        stages=[{"name": "heads_warmup", "steps": 3}, {"name": "joint"}],
    )
    torch.manual_seed(0)
    from torchtune import config as tt_config

    with torch.device("cpu"):
        init = tt_config.instantiate(cfg.model)  # names only
    recipe = run_recipe(cfg)
    return out, recipe, {n for n, _ in init.named_parameters()}


def test_medusa2_changes_only_adapters_and_heads(assets, medusa2_run):
    out, recipe, names = medusa2_run
    before = load_file(str(assets["hf"] / "model.safetensors"))
    from torchtune.models.convert_weights import hf_to_tune

    base = hf_to_tune(before, num_heads=4, num_kv_heads=2, dim=64)
    final = _trainable_state(recipe)  # the live (unmerged) model after training
    for k, v in base.items():
        assert torch.equal(final[k], v), f"base weight {k} changed"
    lora_b = [k for k in final if "lora_b" in k]
    assert lora_b and any(final[k].abs().sum() > 0 for k in lora_b), "adapters did not train"
    # merged output differs from the base where LoRA applies
    merged = base_weights(out, 0)
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(merged["model.layers.0.mlp.gate_proj.weight"], before["model.layers.0.mlp.gate_proj.weight"])
    assert (out / "epoch_0" / "medusa_lm_head.safetensors").is_file()


def test_stage_switch_at_configured_step(medusa2_run):
    out, _, _ = medusa2_run
    text = read_log(out)
    stages = {}
    for line in text.splitlines():
        if " stage:" in line:
            step = int(line.split("Step ")[1].split()[0].rstrip("|"))
            stages[step] = float(line.split("stage:")[1].split()[0])
    assert stages == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 1.0, 6: 1.0}, stages


def test_load_medusa_reads_what_training_wrote(medusa1_run, medusa2_run):
    """Issue 15.1: ``load_medusa`` on the runs' output dirs (Medusa-1: frozen base + heads in epoch_1; Medusa-2: the
    LoRA-merged base shards next to the adapter) gives the model that training ended with."""
    from torchtune_medusa import load_medusa

    tokens = torch.arange(5, 30).unsqueeze(0)
    for out, recipe in (medusa1_run, medusa2_run[:2]):
        run = load_medusa(out)
        assert run.checkpoint_dir == out / f"epoch_{recipe.epochs_run - 1}"
        model, return_hidden, training = recipe._model, recipe._model.return_hidden, recipe._model.training
        model.set_return_hidden(False)  # the recipe's loss projects the hidden states itself
        try:
            with torch.no_grad():
                loaded, trained = run.model(tokens), model.eval()(tokens)
        finally:
            model.set_return_hidden(return_hidden)
            model.train(training)
        torch.testing.assert_close(loaded.logits, trained.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.medusa_logits, trained.medusa_logits, atol=1e-5, rtol=1e-5)


def _run_killed_and_resumed(assets, tmp_path, kill_after_steps, **kw):
    """Run `kill_after_steps` steps (saving then stopping, as a kill would), then resume to the end."""
    out = tmp_path / "resumed"
    cfg = make_cfg(assets, out, **kw)
    cfg.save_every_n_steps = kill_after_steps
    recipe = recipe_mod.MedusaFinetuneRecipe(cfg)
    recipe.setup(cfg)
    # stop right after the state of step `kill_after_steps` is on disk
    orig = recipe._save_training_state

    class Killed(Exception):
        pass

    def save_and_die():
        orig()
        if recipe.global_step == kill_after_steps:
            raise Killed()

    recipe._save_training_state = save_and_die
    with pytest.raises(Killed):
        recipe.train()
    import torch.distributed as dist

    recipe._metric_logger.close()
    dist.destroy_process_group()
    cfg.resume_from_checkpoint = True
    return run_recipe(cfg), out


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [5, 8])  # mid-epoch, epoch end (8 steps per epoch)
def test_resume_equals_uninterrupted(assets, medusa1_run, tmp_path, kill_after):
    ref_out, ref = medusa1_run
    resumed, out = _run_killed_and_resumed(assets, tmp_path, kill_after)
    a, b = _trainable_state(ref), _trainable_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.global_step == ref.global_step


def test_hidden_cache_trains_heads(assets, tmp_path):
    out = tmp_path / "cached"
    cfg = make_cfg(assets, out, cache_hidden_states=True, head_targets="base_greedy", epochs=1, max_steps_per_epoch=4)
    recipe = run_recipe(cfg)
    assert recipe._hidden_cache is not None and len(recipe._hidden_cache) == 32
    # cached hidden states equal a fresh backbone forward (no padding involved for a single sample)
    sample = recipe._dataset[0]
    batch = recipe._collate([sample])
    fresh = recipe._backbone_hidden_no_grad(batch)
    cached = recipe._hidden_cache.batch(batch["_index"], batch["tokens"].size(1), torch.device("cpu"))
    torch.testing.assert_close(fresh, cached)
    # the cached base greedy tokens (self-distillation targets) equal the base model's argmax
    greedy = recipe._hidden_cache.greedy_batch(batch["_index"], batch["tokens"].size(1), torch.device("cpu"))
    assert torch.equal(greedy, recipe._base_greedy(fresh))
    assert "loss/head_1" in read_log(out)


def test_validation_reports_tau_and_tree(assets, tmp_path):
    out = tmp_path / "val"
    cfg = make_cfg(
        assets,
        out,
        epochs=1,
        max_steps_per_epoch=4,
        validation={
            "dataset": {
                "_component_": "torchtune_medusa.data.medusa_chat_dataset",
                "data_files": str(assets["heldout"]),
                "max_seq_len": 96,
            },
            "every_n_steps": 2,
            "num_prompts": 3,
            "max_new_tokens": 12,
            "calibrate_tree_nodes": 6,
            "lookup_tokens": 0,
        },
    )
    run_recipe(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    val = metrics["validation"]
    acceptance = [val[f"val/acceptance/head_{k}"] for k in range(1, 4) if f"val/acceptance/head_{k}" in val]
    # without lookup drafts tau counts the bonus token plus every accepted head; head k+1 is only ever accepted
    # after head k
    assert val["val/lookup_steps"] == 0
    assert val["val/tau"] == pytest.approx(1.0 + sum(acceptance))
    assert all(a >= b for a, b in zip(acceptance, acceptance[1:]))
    assert "val/loss/head_1" in val and "val/top1/head_3" in val
    tree = json.loads((out / "epoch_0" / "medusa_choices.json").read_text())["medusa_choices"]
    assert len(tree) == 6 and all(len(p) >= 1 for p in tree)
    assert "val/tau" in read_log(out)


@pytest.mark.parametrize("decode_compile", ["on", "auto"])
def test_validation_calibrates_tree_on_measured_step_cost(assets, tmp_path, monkeypatch, decode_compile):
    """tree_cost=measured: the saved tree is the best tokens/s size (at most calibrate_tree_nodes, maybe empty),
    and validation decodes with it. Steps are timed compiled with decode_compile=on (sizes up to 16 tokens), eager
    with auto on a CPU (compiled on a GPU)."""
    from torchtune_medusa.training import _validation

    timed = []

    def spy(model, sizes, **kwargs):
        timed.append((list(sizes), kwargs["compile"]))
        return measure_step_cost(model, sizes, **kwargs)

    measure_step_cost = _validation.measure_step_cost
    monkeypatch.setattr(_validation, "measure_step_cost", spy)
    out = tmp_path / "val_cost"
    cfg = make_cfg(
        assets,
        out,
        epochs=1,
        max_steps_per_epoch=2,
        validation={
            "dataset": {
                "_component_": "torchtune_medusa.data.medusa_chat_dataset",
                "data_files": str(assets["heldout"]),
                "max_seq_len": 96,
            },
            "num_prompts": 2,
            "max_new_tokens": 8,
            "max_prompt_len": 64,
            "calibrate_tree_nodes": 6,
            "tree_cost": "measured",
            "decode_compile": decode_compile,
        },
    )
    run_recipe(cfg)
    assert timed == [([1, 2, 4, 7], decode_compile == "on")]
    metrics = json.loads((out / "metrics.json").read_text())
    tree = json.loads((out / "epoch_0" / "medusa_choices.json").read_text())["medusa_choices"]
    assert tree == metrics["medusa_choices"] and len(tree) <= 6
    assert metrics["validation"]["val/tree_nodes"] == len(tree)


def test_validation_tau_is_one_when_heads_always_miss(assets):
    """Heads forced to always propose a token the base model never picks: real decoding accepts nothing from them;
    lookup drafts still find the tiny model's repeats."""
    from torchtune_medusa.models import medusa_smollm2
    from torchtune_medusa.training import evaluate_decoding

    torch.manual_seed(0)
    model = medusa_smollm2(**TINY_ARGS, rope_base=10_000, medusa_num_heads=3).eval()
    prompts = [[5, 17, 42, 9], [100, 3, 77]]
    from torchtune_medusa.generation import generate

    picked = set(t for row in generate(model, prompts, max_new_tokens=20).tokens for t in row)
    never = next(t for t in range(TINY_ARGS["vocab_size"]) if t not in picked)
    with torch.no_grad():
        for head in model.medusa_heads:
            head[0].linear.weight.zero_()
            head[0].linear.bias.fill_(30.0)  # block output ~ h + 30
            head[1].weight.zero_()
            head[1].weight[never] = 1.0  # logit of `never` ~ 30 * d, all others ~ 0
    tree = [[0], [0, 0], [0, 0, 0]]
    m = evaluate_decoding(model, prompts, max_new_tokens=20, medusa_choices=tree, lookup_tokens=0)
    assert m["val/tau"] == 1.0
    assert all(m[f"val/acceptance/head_{k}"] == 0.0 for k in (1, 2, 3))
    with_lookup = evaluate_decoding(model, prompts, max_new_tokens=20, medusa_choices=tree)
    assert all(with_lookup[f"val/acceptance/head_{k}"] == 0.0 for k in (1, 2, 3))
    assert with_lookup["val/lookup_accepted"] > 0
    assert with_lookup["val/tau"] > 1.0 and with_lookup["val/decode_steps"] < m["val/decode_steps"]


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"stages": [{"name": "warmupp", "steps": 2}]}, ValueError, "unknown stage name"),
        ({"model.lora_rank": 8}, ValueError, "LoRA options"),
        ({"stages": ["joint"]}, ValueError, "Medusa-1 trains the heads only"),
        ({"dataset.data_files": "/nonexistent/train.jsonl"}, FileNotFoundError, "dataset file not found"),
        ({"checkpointer.medusa_num_heads": 5}, ValueError, "must agree"),
        ({"medusa_version": 3}, ValueError, "medusa_version"),
        ({"medusa_version": 2}, ValueError, "has no LoRA"),
        ({"validation": {"tree_cost": "guessed"}}, ValueError, "tree_cost='guessed'"),
        ({"validation": {"decode_compile": "sometimes"}}, ValueError, "validation.decode_compile"),
        ({"validation": {"decode_dtype": "fp8"}}, ValueError, "decode_dtype='fp8'; choose auto"),
        ({"validation": {"lookup_tokens": -2}}, ValueError, "validation.lookup_tokens=-2: must be an integer >= 0"),
    ],
)
def test_bad_config_fails_before_heavy_work(assets, tmp_path, overrides, error, match):
    cfg = make_cfg(assets, tmp_path / "bad", **overrides)
    with pytest.raises(error, match=match):
        check_config(cfg)


def test_head_count_mismatch_with_head_checkpoint(assets, medusa1_run, tmp_path):
    out, _ = medusa1_run  # epoch_1 holds a 3-head sidecar
    cfg = make_cfg(
        assets,
        tmp_path / "mismatch",
        **{
            "model.medusa_num_heads": 4,
            "checkpointer.medusa_num_heads": 4,
            "checkpointer.medusa_checkpoint_dir": str(out / "epoch_1"),
        },
    )
    with pytest.raises(ValueError, match="has 3 Medusa heads"):
        check_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_single_process_equals_two_process_fsdp(assets, tmp_path, version):
    """Same global batch (1 x 4 vs 2 x 2): the FSDP run ends with the single-process weights (Medusa-2: heads
    warm-up then joint with self-distillation through the tied output; SGD so that tiny float differences are
    not amplified by Adam's normalisation)."""
    outs = {}
    extra = {}
    if version == 2:
        extra = {
            "stages": [{"name": "heads", "steps": 1}, {"name": "joint"}],
            "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.05},
        }
    for nproc in (1, 2):
        out = tmp_path / f"np{nproc}"
        cfg = make_cfg(
            assets,
            out,
            version=version,
            epochs=1,
            max_steps_per_epoch=3,
            batch_size=4 // nproc,
            shuffle=False,
            **{"model.medusa_num_heads": 2, "checkpointer.medusa_num_heads": 2},
            **extra,
        )
        cfg_path = tmp_path / f"np{nproc}.yaml"
        OmegaConf.save(cfg, cfg_path)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(RECIPE),
            "--config",
            str(cfg_path),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
        outs[nproc] = {**heads_sidecar(out, 0), **base_weights(out, 0)}
    for k in outs[1]:
        torch.testing.assert_close(outs[1][k], outs[2][k], rtol=1e-5, atol=1e-6, msg=k)


def test_truncated_vocab_heads_train_on_the_most_frequent_targets(assets, tmp_path):
    from collections import Counter

    from torchtune_medusa.generation import generate, medusa_generate
    from torchtune_medusa.models._convert_weights import import_heads

    out = tmp_path / "truncated"
    shared = {"model.medusa_projection": "shared", "checkpointer.medusa_projection": "shared"}
    cfg = make_cfg(assets, out, epochs=1, truncated_vocab_size=8, cache_hidden_states=True, **shared)
    recipe = run_recipe(cfg)
    counts = Counter()
    for sample in recipe._dataset:
        counts.update(t for t in sample["labels"] if t != -100)
    want = sorted(sorted(counts, key=lambda t: (-counts[t], t))[:8])
    assert len(counts) > 8  # some targets fall outside the map
    assert recipe._model.medusa_token_map.tolist() == want
    assert heads_sidecar(out, 0)["token_map"].tolist() == want
    assert json.loads((out / "epoch_0" / "medusa_config.json").read_text())["truncated_vocab_size"] == 8
    heads, head_cfg = import_heads(out / "epoch_0")
    assert head_cfg.truncated_vocab_size == 8 and heads["medusa_heads.token_map"].tolist() == want
    model = recipe._model.eval()
    prompt = [t for t in recipe._dataset[0]["tokens"][:20]]
    greedy = generate(model, [prompt], max_new_tokens=16).tokens
    tree = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
    assert medusa_generate(model, [prompt], max_new_tokens=16, medusa_choices=tree, topk=4).tokens == greedy
    with pytest.raises(ValueError, match="fewer than topk=10"):
        medusa_generate(model, [prompt], max_new_tokens=4)

    with pytest.raises(ValueError, match="medusa_projection=shared"):
        run_recipe(make_cfg(assets, tmp_path / "own", epochs=1, truncated_vocab_size=8))
