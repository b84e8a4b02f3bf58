# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The library side of ``medusa_finetune`` in isolation: parallelism helpers, steps per epoch, resume settings,
LoRA merge (the recipe tests run them end to end)."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchtune import training

from tests.common import tiny_medusa
from torchtune_medusa.training._lora import merged_checkpoint
from torchtune_medusa.training._parallelize import parallelize_medusa, RootParameters
from torchtune_medusa.training._stages import steps_per_epoch
from torchtune_medusa.training._state import RESUME_SETTINGS, resume_settings


class Recorder(nn.Module):
    """Stands in for a sharded model: records unshard/reshard calls."""

    def __init__(self, output):
        super().__init__()
        self.output = output
        self.calls = []

    def unshard(self):
        self.calls.append("unshard")

    def reshard(self):
        self.calls.append("reshard")


@pytest.mark.parametrize(
    "output, sharded, expected",
    [
        (lambda h: h, True, ["unshard", "reshard"]),  # tied output (not a module) under FSDP: gathered
        (nn.Linear(2, 2), True, []),  # untied output: its own FSDP unit
        (lambda h: h, False, []),  # one process: nothing is sharded
    ],
)
def test_root_parameters_gather_only_a_sharded_tied_output(output, sharded, expected):
    model = Recorder(output)
    root = RootParameters(model, sharded=sharded)
    root.gather()
    root.release()
    assert model.calls == expected and root.need_gathering == bool(expected)


def test_parallelize_one_process_does_not_shard():
    model = tiny_medusa()
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert parallelize_medusa(model, device_type="cpu", world_size=1) is False
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_steps_per_epoch():
    assert steps_per_epoch(10, gradient_accumulation_steps=3, max_steps_per_epoch=None, batch_size=2) == 3
    assert steps_per_epoch(10, gradient_accumulation_steps=1, max_steps_per_epoch=4, batch_size=2) == 4
    with pytest.raises(ValueError, match="2 batches of batch_size=8 per rank, fewer than gradient_accumulation"):
        steps_per_epoch(2, gradient_accumulation_steps=3, max_steps_per_epoch=None, batch_size=8)


def test_resume_settings_cover_the_data_order():
    cfg = OmegaConf.create({"batch_size": 4, "shuffle": True, "max_steps_per_epoch": 7})
    settings = resume_settings(cfg)
    assert settings == {"batch_size": 4, "shuffle": True, "gradient_accumulation_steps": 1, "max_steps_per_epoch": 7}
    assert set(settings) | {"num_samples"} == set(RESUME_SETTINGS)


def test_merged_checkpoint_leaves_the_live_state_dict_alone():
    sd = {"layers.0.attn.q_proj.weight": torch.ones(2, 2), "medusa_heads.0.0.linear.weight": torch.zeros(2, 2)}
    ckpt = merged_checkpoint(sd, [], rank=None, alpha=None)
    assert set(ckpt) == {training.MODEL_KEY}
    ckpt[training.MODEL_KEY]["layers.0.attn.q_proj.weight"].add_(1)
    assert torch.equal(sd["layers.0.attn.q_proj.weight"], torch.ones(2, 2))
