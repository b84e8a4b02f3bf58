# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""MedusaHFCheckpointer: init from a plain HF checkpoint, save, reload, resume, adapter saves, bad sidecars."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune import training
from torchtune.models import convert_weights

from tests.common import TINY, tiny_medusa
from torchtune_medusa.models import export_heads
from torchtune_medusa.training import MEDUSA_KEY, MedusaHFCheckpointer

SHARD = "model-00001-of-00001.safetensors"


def _write_hf(model, folder):
    """A tiny HF checkpoint of ``model``'s base weights, as torchtune's checkpointer reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    base_sd = {k: v for k, v in model.state_dict().items() if not k.startswith("medusa_heads.")}
    hf = convert_weights.tune_to_hf(
        base_sd, num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"], dim=TINY["embed_dim"]
    )
    save_file({k: v.contiguous() for k, v in hf.items()}, folder / SHARD)
    config = {
        "num_attention_heads": TINY["num_heads"],
        "num_key_value_heads": TINY["num_kv_heads"],
        "hidden_size": TINY["embed_dim"],
        "vocab_size": TINY["vocab_size"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return base_sd


def _ckpt(tmp_path, src="hf", files=(SHARD,), out="out", **kwargs):
    kwargs.setdefault("medusa_num_heads", 3)
    return MedusaHFCheckpointer(
        checkpoint_dir=str(tmp_path / src),
        checkpoint_files=list(files),
        model_type="LLAMA3",
        output_dir=str(tmp_path / out),
        **kwargs,
    )


def _heads(sd):
    return {k: v for k, v in sd.items() if k.startswith("medusa_heads.")}


@pytest.mark.parametrize("projection", ["own", "shared"])
@pytest.mark.parametrize("tied", [False, True])
def test_init_from_plain_hf_checkpoint(tmp_path, projection, tied):
    model = tiny_medusa(own_projection=projection == "own", tied=tied)
    base_sd = _write_hf(model, tmp_path / "hf")
    ckpt = _ckpt(tmp_path, medusa_projection=projection)
    sd = ckpt.load_checkpoint()[training.MODEL_KEY]
    assert ckpt.medusa_heads_source is None
    fresh = tiny_medusa(own_projection=projection == "own", tied=tied, seed=1)
    fresh.load_state_dict(sd, strict=True)  # every key present
    for k, v in base_sd.items():
        assert torch.equal(sd[k], v), k
    base_out = base_sd["tok_embeddings.weight" if tied else "output.weight"]
    for i in range(3):
        assert torch.count_nonzero(sd[f"medusa_heads.{i}.0.linear.weight"]) == 0
        bias = sd[f"medusa_heads.{i}.0.linear.bias"]
        assert bias.abs().max() <= 32**-0.5 and bias.abs().max() > 0
        if projection == "own":
            assert torch.equal(sd[f"medusa_heads.{i}.1.weight"], base_out)
            assert sd[f"medusa_heads.{i}.1.weight"].data_ptr() != base_out.data_ptr()
    assert not torch.equal(sd["medusa_heads.0.0.linear.bias"], sd["medusa_heads.1.0.linear.bias"])
    # identical on every rank / every call
    again = _ckpt(tmp_path, medusa_projection=projection).load_checkpoint()[training.MODEL_KEY]
    for k in _heads(sd):
        assert torch.equal(sd[k], again[k])


@pytest.mark.parametrize("projection", ["own", "shared"])
def test_save_load_resume(tmp_path, projection):
    own = projection == "own"
    model = tiny_medusa(own_projection=own, num_layers=2)
    _write_hf(model, tmp_path / "hf")
    ckpt = _ckpt(tmp_path, medusa_projection=projection, medusa_num_layers=2)
    ckpt.load_checkpoint()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.save_checkpoint(
        {training.MODEL_KEY: dict(full), "epoch": 1, "seed": 0, "total_epochs": 2, "max_steps_per_epoch": None},
        epoch=0,
        intermediate_checkpoint=True,
    )
    epoch = tmp_path / "out" / "epoch_0"
    assert (epoch / SHARD).is_file() and (epoch / "medusa_lm_head.safetensors").is_file()
    assert not any(k.startswith("medusa") for k in load_file(epoch / SHARD))
    cfg = json.loads((epoch / "medusa_config.json").read_text())
    assert cfg["medusa_num_heads"] == 3 and cfg["medusa_num_layers"] == 2 and cfg["medusa_projection"] == projection
    assert cfg["hidden_size"] == 32 and cfg["vocab_size"] == 128 and "base_model_name_or_path" in cfg
    assert sorted(load_file(epoch / "medusa_lm_head.safetensors")) == sorted(
        k[len("medusa_heads.") :] for k in _heads(full)
    )

    # load the saved epoch as a checkpoint of its own
    sd = _ckpt(
        tmp_path, src="out/epoch_0", out="out2", medusa_projection=projection, medusa_num_layers=2
    ).load_checkpoint()[training.MODEL_KEY]
    assert sorted(sd) == sorted(full)
    for k in full:
        assert torch.equal(sd[k], full[k]), k

    # resume: the files point at epoch_0 of the output folder, the heads come from its sidecar
    resumed = _ckpt(
        tmp_path,
        files=("epoch_0/" + SHARD,),
        medusa_projection=projection,
        medusa_num_layers=2,
        should_load_recipe_state=True,
    )
    state = resumed.load_checkpoint()
    assert resumed.medusa_heads_source == epoch / "medusa_lm_head.safetensors"
    assert state["epoch"] == 1
    for k in full:
        assert torch.equal(state[training.MODEL_KEY][k], full[k]), k


def test_adapter_only_save_keeps_heads(tmp_path):
    model = tiny_medusa()
    _write_hf(model, tmp_path / "hf")
    ckpt = _ckpt(tmp_path)
    ckpt.load_checkpoint()
    heads = _heads(model.state_dict())
    adapter = {
        "layers.0.attn.q_proj.lora_a.weight": torch.randn(4, 32),
        "layers.0.attn.q_proj.lora_b.weight": torch.zeros(32, 4),
    }
    # heads given explicitly (and, by mistake, also inside the adapter dict: they are taken out of it)
    ckpt.save_checkpoint({training.ADAPTER_KEY: {**adapter, **heads}, MEDUSA_KEY: heads}, epoch=0, adapter_only=True)
    epoch = tmp_path / "out" / "epoch_0"
    assert sorted(torch.load(epoch / "adapter_model.pt")) == sorted(adapter)
    saved = load_file(epoch / "medusa_lm_head.safetensors")
    for k, v in heads.items():
        assert torch.equal(saved[k[len("medusa_heads.") :]], v)


def test_save_without_heads_warns(tmp_path, caplog):
    model = tiny_medusa()
    base_sd = _write_hf(model, tmp_path / "hf")
    ckpt = _ckpt(tmp_path)
    ckpt.load_checkpoint()
    with caplog.at_level("WARNING"):
        ckpt.save_checkpoint({training.MODEL_KEY: dict(base_sd)}, epoch=0)
    assert "no medusa_lm_head.safetensors written" in caplog.text


def test_medusa_checkpoint_dir(tmp_path):
    model = tiny_medusa()
    _write_hf(model, tmp_path / "hf")
    export_heads(model, tmp_path / "heads", format="torchtune")
    ckpt = _ckpt(tmp_path, medusa_checkpoint_dir=str(tmp_path / "heads"))
    sd = ckpt.load_checkpoint()[training.MODEL_KEY]
    for k, v in _heads(model.state_dict()).items():
        assert torch.equal(sd[k], v)
    with pytest.raises(FileNotFoundError, match="medusa_checkpoint_dir"):
        _ckpt(tmp_path, medusa_checkpoint_dir=str(tmp_path / "hf")).load_checkpoint()


def test_bad_sidecar(tmp_path):
    model = tiny_medusa()
    _write_hf(model, tmp_path / "hf")
    export_heads(model, tmp_path / "heads", format="torchtune")
    with pytest.raises(ValueError, match="has 3 heads but the checkpointer was given medusa_num_heads=4"):
        _ckpt(tmp_path, medusa_num_heads=4, medusa_checkpoint_dir=str(tmp_path / "heads")).load_checkpoint()
    with pytest.raises(ValueError, match="medusa_num_layers=2"):
        _ckpt(tmp_path, medusa_num_layers=2, medusa_checkpoint_dir=str(tmp_path / "heads")).load_checkpoint()
    with pytest.raises(ValueError, match="medusa_projection='shared'"):
        _ckpt(tmp_path, medusa_projection="shared", medusa_checkpoint_dir=str(tmp_path / "heads")).load_checkpoint()
    # heads of another model: hidden size 16
    other = {f"{i}.0.linear.weight": torch.zeros(16, 16) for i in range(3)}
    other.update({f"{i}.0.linear.bias": torch.zeros(16) for i in range(3)})
    other.update({f"{i}.1.weight": torch.zeros(128, 16) for i in range(3)})
    export_heads(other, tmp_path / "other", format="torchtune")
    with pytest.raises(ValueError, match="hidden size 16 but the base model"):
        _ckpt(tmp_path, medusa_checkpoint_dir=str(tmp_path / "other")).load_checkpoint()
    # and another vocabulary
    other.update({f"{i}.1.weight": torch.zeros(64, 32) for i in range(3)})
    other.update({f"{i}.0.linear.weight": torch.zeros(32, 32) for i in range(3)})
    other.update({f"{i}.0.linear.bias": torch.zeros(32) for i in range(3)})
    export_heads(other, tmp_path / "other", format="torchtune")
    with pytest.raises(ValueError, match="vocabulary size 64 but the base model"):
        _ckpt(tmp_path, medusa_checkpoint_dir=str(tmp_path / "other")).load_checkpoint()


def test_bad_args(tmp_path):
    _write_hf(tiny_medusa(), tmp_path / "hf")
    with pytest.raises(ValueError, match="medusa_num_heads"):
        _ckpt(tmp_path, medusa_num_heads=0)
    with pytest.raises(ValueError, match="medusa_projection"):
        _ckpt(tmp_path, medusa_projection="both")


def test_save_checkpoint_to_writes_into_the_given_folder(tmp_path):
    from torchtune_medusa.training._checkpointer import num_heads_in_sidecar

    model = tiny_medusa()
    _write_hf(model, tmp_path / "hf")
    ckpt = _ckpt(tmp_path)
    sd = ckpt.load_checkpoint()[training.MODEL_KEY]
    target = tmp_path / "staging"
    target.mkdir()
    ckpt.save_checkpoint_to(target, {training.MODEL_KEY: dict(sd)}, epoch=2)
    assert (target / SHARD).is_file() and (target / "medusa_lm_head.safetensors").is_file()
    assert not (target / "epoch_2").exists() and not (tmp_path / "out" / "epoch_2").exists()
    assert num_heads_in_sidecar(target) == 3 and num_heads_in_sidecar(tmp_path / "hf") is None
    assert str(ckpt._output_dir) == str(tmp_path / "out")  # the configured output folder is kept
    reloaded = _ckpt(tmp_path, medusa_checkpoint_dir=str(target)).load_checkpoint()[training.MODEL_KEY]
    for k, v in _heads(sd).items():
        assert torch.equal(reloaded[k], v), k
