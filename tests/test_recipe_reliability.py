# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""``medusa_finetune`` under bad input, kills and failing saves: nothing lost, nothing silently wrong (issue 14).
Same tiny model, tokenizer and chat data as ``tests/test_recipe.py``."""

import argparse
import glob
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torchtune.config._utils import _merge_yaml_and_cli_args

from tests.common import write_tiny_hf_checkpoint
from tests.data_common import conv, tiny_tokenizer, write_jsonl
from tests.test_recipe import _toy_rows, heads_sidecar, make_cfg, recipe_mod, REPO, run_recipe
from torchtune_medusa.data import medusa_chat_dataset
from torchtune_medusa.training import MedusaHFCheckpointer
from torchtune_medusa.training._config_checks import check_config, check_config_keys, check_numbers

STATE = "training_state"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("medusa_reliability")
    hf = write_tiny_hf_checkpoint(root / "hf")
    train = write_jsonl(root / "train.jsonl", _toy_rows(16))
    return {"root": root, "hf": hf, "train": train}


def _small_cfg(assets, out, **overrides):
    """1 epoch of 2 steps (batch 4), a training state after every step."""
    kw = dict(epochs=1, max_steps_per_epoch=2, save_every_n_steps=1)
    kw.update(overrides)
    return make_cfg(assets, out, **kw)


def _construct(cfg):
    """Build the recipe (config and resume checks only), always leaving no process group behind."""
    try:
        return recipe_mod.MedusaFinetuneRecipe(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _cli(cfg, *overrides):
    """``cfg`` with ``key=value`` overrides merged the way ``tune run`` merges them."""
    return _merge_yaml_and_cli_args(argparse.Namespace(**OmegaConf.to_container(cfg)), list(overrides))


class DiskFull(OSError):
    pass


@pytest.fixture(scope="module")
def failed_final_save(assets, tmp_path_factory):
    """A run whose training ends but whose final save fails (disk full): (output_dir, trained weights)."""
    out = tmp_path_factory.mktemp("failed_save") / "out"
    cfg = _small_cfg(assets, out)
    recipe = recipe_mod.MedusaFinetuneRecipe(cfg)
    try:
        recipe.setup(cfg)

        def disk_full(epoch):
            raise DiskFull(28, "No space left on device")

        recipe.save_checkpoint = disk_full
        with pytest.raises(DiskFull):
            recipe.train()
        trained = {n: p.detach().clone() for n, p in recipe._trainable_named_params()}
    finally:
        recipe._metric_logger.close()
        dist.destroy_process_group()
    return out, trained


def _copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run's output folder, for a test to damage."""
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ item 5


def test_training_state_after_last_epoch_survives_a_failed_final_save(assets, failed_final_save, tmp_path):
    src, trained = failed_final_save
    assert not (src / "epoch_0").exists()
    latest = (src / STATE / "latest").read_text().strip()
    assert latest == "step_0000002"
    state = torch.load(src / STATE / latest / "recipe_state.pt", weights_only=False)
    assert state["epochs_run"] == 1 and state["global_step"] == 2
    # resuming trains nothing more and writes the final checkpoint with the trained heads
    out = _copy_run(src, tmp_path / "out")
    cfg = _small_cfg(assets, out, resume_from_checkpoint=True)
    recipe = run_recipe(cfg)
    assert recipe.global_step == 2
    heads = heads_sidecar(out, 0)
    assert heads and torch.equal(heads["0.0.linear.weight"], trained["medusa_heads.0.0.linear.weight"])
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2


# ------------------------------------------------------------------------------------------------ item 6


def test_stale_temp_folders_are_removed_at_start(assets, tmp_path, caplog):
    out = tmp_path / "out"
    stale = [
        out / ".tmp_epoch_0_ab12cd_3",
        out / ".tmp_metrics.json_x1y2z3w4",
        out / STATE / ".tmp_step_0000004_q9w8e7r6",
        out / STATE / ".staging_step_0000004",
        out / STATE / ".latest.tmp",
        out / STATE / ".tmp_latest_a1b2c3d4",
        out / ".old_epoch_1_4242",  # epoch_1 exists: the leftover of a finished replacement
    ]
    foreign = [out / ".tmp_notes", out / "tmp_epoch_0_ab12cd_3", out / "epoch_1" / ".tmp_epoch_0_ab12cd_3", out / "x"]
    for p in stale + foreign:
        if p.name.endswith((".tmp", "_x1y2z3w4", "_a1b2c3d4", "x")):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("data")
        else:
            p.mkdir(parents=True)
            (p / "trainable.pt").write_bytes(b"0" * 1024)
    moved_aside = out / STATE / ".old_step_0000002_4242"  # step_0000002 is missing: it is the only copy
    moved_aside.mkdir()
    (moved_aside / "recipe_state.pt").write_text("state")
    with caplog.at_level(logging.INFO):
        _construct(_small_cfg(assets, out))
    for p in stale:
        assert not p.exists(), p
    for p in foreign:
        assert p.exists(), p
    assert (out / STATE / "step_0000002" / "recipe_state.pt").read_text() == "state"
    text = caplog.text
    assert "removed training_state/.tmp_step_0000004_q9w8e7r6" in text and "removed .tmp_epoch_0_ab12cd_3" in text
    assert "restored training_state/.old_step_0000002_4242 as training_state/step_0000002" in text


# ------------------------------------------------------------------------------------------------ item 7


@pytest.mark.parametrize(
    "override, bad, nearest",
    [
        ("epocs=2", "'epocs'", "'epochs'"),
        ("+model.lora_rank=8", "'+model.lora_rank'", "'model.lora_rank'"),
        ("optimizer.lrr=0.1", "'optimizer.lrr'", "'optimizer.lr'"),
        ("loss.decya=0.5", "'loss.decya'", "'loss.decay'"),
    ],
)
def test_unknown_config_keys_are_named_with_the_nearest_key(assets, tmp_path, override, bad, nearest):
    cfg = _cli(make_cfg(assets, tmp_path / "out"), override)
    with pytest.raises(ValueError, match="unknown config key") as e:
        check_config(cfg)
    assert bad in str(e.value) and f"did you mean {nearest}" in str(e.value)


def test_validation_section_keys_are_checked(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "out", validation={"num_prompt": 3})
    with pytest.raises(ValueError, match="'validation.num_prompt' \\(did you mean 'validation.num_prompts'"):
        check_config(cfg)


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*" / "*medusa*.yaml"))))
def test_shipped_configs_have_no_unknown_keys(path):
    cfg = OmegaConf.load(path)
    check_config_keys(cfg)
    check_numbers(cfg)


@pytest.mark.parametrize(
    "override, fix",
    [
        ("epochs=0", "epochs=1 or more"),
        ("batch_size=0", "batch_size=1 or more"),
        ("gradient_accumulation_steps=-1", "gradient_accumulation_steps=1 or more"),
        ("optimizer.lr=-1", "optimizer.lr=1e-3"),
        ("save_every_n_steps=0", "save_every_n_steps=null"),
    ],
)
def test_non_positive_counts_are_refused(assets, tmp_path, override, fix):
    cfg = _cli(make_cfg(assets, tmp_path / "out"), override)
    with pytest.raises(ValueError) as e:
        check_config(cfg)
    assert override in str(e.value) and fix in str(e.value)
    assert not (tmp_path / "out").exists()


def test_resume_with_changed_batch_size_is_refused(assets, failed_final_save, tmp_path):
    src, _ = failed_final_save
    out = _copy_run(src, tmp_path / "out")
    cfg = _small_cfg(assets, out, resume_from_checkpoint=True, batch_size=2, shuffle=False)
    with pytest.raises(ValueError) as e:
        _construct(cfg)  # refused before the model or data are loaded
    msg = str(e.value)
    assert "batch_size=4 (this run: 2)" in msg and "shuffle=True (this run: False)" in msg
    assert "Resume with the same settings (batch_size=4 shuffle=True)" in msg
    assert "resume_from_checkpoint=False in a new output_dir" in msg


def test_resume_with_other_data_is_refused(assets, failed_final_save, tmp_path):
    src, _ = failed_final_save
    out = _copy_run(src, tmp_path / "out")
    more = write_jsonl(tmp_path / "more.jsonl", _toy_rows(20))
    cfg = _small_cfg(assets, out, resume_from_checkpoint=True, **{"dataset.data_files": str(more)})
    recipe = recipe_mod.MedusaFinetuneRecipe(cfg)
    try:
        with pytest.raises(ValueError, match=r"num_samples=16 \(this run: 20\).*same data"):
            recipe.setup(cfg)
    finally:
        recipe._metric_logger.close()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ item 8


def test_empty_jsonl_names_the_file(assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = make_cfg(assets, tmp_path / "out", **{"dataset.data_files": str(empty)})
    with pytest.raises(ValueError, match=f"data file '{empty}' is empty .*point data_files at"):
        check_config(cfg)
    tok = tiny_tokenizer(assets["hf"])
    for content in ("", "  \n\n"):
        empty.write_text(content)
        with pytest.raises(ValueError, match=f"medusa_chat_dataset: data file '{empty}' is empty"):
            medusa_chat_dataset(tok, data_files=str(empty))


@pytest.mark.parametrize("name", ["trainable.pt", "optimizer.pt", "recipe_state.pt", "rank_0.pt"])
def test_corrupt_training_state_names_the_file_and_the_intact_one(assets, failed_final_save, tmp_path, name):
    src, trained = failed_final_save
    out = _copy_run(src, tmp_path / "out")
    bad = out / STATE / "step_0000002" / name
    bad.write_bytes(bad.read_bytes()[:100])
    cfg = _small_cfg(assets, out, resume_from_checkpoint=True)
    with pytest.raises(RuntimeError) as e:
        _construct(cfg)  # before the model or data are loaded
    msg = str(e.value)
    assert f"training state file {bad} is corrupt" in msg
    assert f"The earlier training state {out / STATE / 'step_0000001'} is intact" in msg
    fix = f"echo step_0000001 > {out / STATE / 'latest'}"
    assert fix in msg
    # following the message resumes from step 1 and trains step 2 again, to the same weights
    (out / STATE / "latest").write_text("step_0000001\n")
    recipe = run_recipe(cfg)
    assert recipe.global_step == 2
    for n, p in recipe._trainable_named_params():
        assert torch.equal(p, trained[n]), n


def test_corrupt_training_state_without_an_earlier_one(assets, failed_final_save, tmp_path):
    src, _ = failed_final_save
    out = _copy_run(src, tmp_path / "out")
    shutil.rmtree(out / STATE / "step_0000001")
    (out / STATE / "step_0000002" / "trainable.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="No earlier training state .* is intact: start again"):
        _construct(_small_cfg(assets, out, resume_from_checkpoint=True))


@pytest.mark.parametrize("content", [b"garbage" * 10, None])
def test_corrupt_head_checkpoint_names_the_file(assets, tmp_path, content):
    heads = tmp_path / "heads"
    heads.mkdir()
    sidecar = heads / "medusa_lm_head.safetensors"
    if content is None:  # truncated
        from safetensors.torch import save_file

        save_file({"0.0.linear.weight": torch.zeros(64, 64)}, str(sidecar))
        content = sidecar.read_bytes()[:-100]
    sidecar.write_bytes(content)
    cfg = make_cfg(assets, tmp_path / "out", **{"checkpointer.medusa_checkpoint_dir": str(heads)})
    with pytest.raises(ValueError, match=f"the head checkpoint {sidecar} is not a readable safetensors file"):
        check_config(cfg)


# ------------------------------------------------------------------------------------------------ item 9


@pytest.fixture
def no_checkpoint_load(monkeypatch):
    def load_checkpoint(self):
        raise AssertionError("the checkpoint was loaded before the inputs were checked")

    monkeypatch.setattr(MedusaHFCheckpointer, "load_checkpoint", load_checkpoint)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"optimizer.lr": -1.0}, ValueError, "optimizer.lr=-1.0"),
        ({"batch_size": 0}, ValueError, "batch_size=0"),
        ({"resume_from_checkpoint": True}, FileNotFoundError, "no training state in"),
        ({"dataset.data_files": "unusable"}, ValueError, "no usable conversation in"),
        ({"max_steps_per_epoch": None, "batch_size": 32}, ValueError, "batches of batch_size=32 per rank"),
    ],
)
def test_inputs_are_checked_before_the_checkpoint_loads(assets, tmp_path, no_checkpoint_load, overrides, error, match):
    if overrides.get("dataset.data_files") == "unusable":
        overrides["dataset.data_files"] = str(write_jsonl(tmp_path / "bing.jsonl", [conv("bing", "hi", "gpt", "x")]))
    cfg = _small_cfg(assets, tmp_path / "out", **overrides)
    with pytest.raises(error, match=match):
        run_recipe(cfg)


# ------------------------------------------------------------------------------------------------ item 10


def test_zero_max_steps_per_epoch_says_so(assets, tmp_path):
    cfg = _cli(make_cfg(assets, tmp_path / "out"), "max_steps_per_epoch=0")
    with pytest.raises(ValueError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert "max_steps_per_epoch=0" in msg and "max_steps_per_epoch=null" in msg
    assert "gradient_accumulation_steps" not in msg


# ------------------------------------------------------------------------------------------------ item 11


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_checkpoints_get_the_umask_permissions(assets, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        run_recipe(_small_cfg(assets, out, max_steps_per_epoch=1))
    finally:
        os.umask(old)
    dirs = [out / "epoch_0", out / STATE / "step_0000001"]
    for d in dirs:
        assert _mode(d) == 0o750, d
        files = [f for f in d.iterdir() if f.is_file()]
        assert files
        for f in files:
            assert _mode(f) == 0o640, f
    assert {"medusa_lm_head.safetensors", "medusa_config.json"} <= {f.name for f in (out / "epoch_0").iterdir()}
    assert _mode(out / "metrics.json") == 0o640
