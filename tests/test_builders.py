# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Builders: every preset (built on the meta device), its LoRA/QLoRA variants, argument checks."""

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config
from torchtune.models.llama3_1 import llama3_1_8b, llama3_1_70b, llama3_1_405b
from torchtune.models.llama3_2 import llama3_2_1b, llama3_2_3b
from torchtune.models.llama3_3 import llama3_3_70b
from torchtune.modules.peft import get_adapter_params

import torchtune_medusa.models as M
from torchtune_medusa.models import smollm2_135m
from torchtune_medusa.modules import MedusaTransformerDecoder

PRESETS = {
    "llama3_1_8b": (llama3_1_8b, 4096, 128_256),
    "llama3_1_70b": (llama3_1_70b, 8192, 128_256),
    "llama3_1_405b": (llama3_1_405b, 16384, 128_256),
    "llama3_2_1b": (llama3_2_1b, 2048, 128_256),
    "llama3_2_3b": (llama3_2_3b, 3072, 128_256),
    "llama3_3_70b": (llama3_3_70b, 8192, 128_256),
    "smollm2_135m": (smollm2_135m, 576, 49152),
}
# LoRA/QLoRA builds of the biggest presets take seconds even on meta (NF4 of every layer); the plain variant
# covers their key names.
LORA_PRESETS = ["llama3_1_8b", "llama3_2_1b", "llama3_2_3b", "smollm2_135m"]


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _head_keys(k, L, own):
    keys = []
    for i in range(k):
        for j in range(L):
            keys += [f"medusa_heads.{i}.{j}.linear.weight", f"medusa_heads.{i}.{j}.linear.bias"]
        if own:
            keys.append(f"medusa_heads.{i}.{L}.weight")
    return keys


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("projection", ["own", "shared"])
def test_preset_shapes_and_keys(name, projection):
    base_builder, dim, vocab = PRESETS[name]
    with torch.device("meta"):
        base = base_builder()
        model = getattr(M, f"medusa_{name}")(medusa_projection=projection)
    assert isinstance(model, MedusaTransformerDecoder)
    shapes = _shapes(model)
    base_shapes = _shapes(base)
    # the base keys (and shapes) are exactly torchtune's, so its HF conversion keeps working
    assert {k: v for k, v in shapes.items() if not k.startswith("medusa_heads.")} == base_shapes
    heads = {k: v for k, v in shapes.items() if k.startswith("medusa_heads.")}
    assert sorted(heads) == sorted(_head_keys(4, 1, projection == "own"))
    assert heads["medusa_heads.3.0.linear.weight"] == (dim, dim)
    assert heads["medusa_heads.3.0.linear.bias"] == (dim,)
    if projection == "own":
        assert heads["medusa_heads.0.1.weight"] == (vocab, dim)
    assert model.num_medusa_heads == 4


@pytest.mark.parametrize(
    "name, variant",
    [(n, "lora") for n in LORA_PRESETS] + [("llama3_2_1b", "qlora"), ("smollm2_135m", "qlora")],
)
def test_lora_presets(name, variant):
    _, dim, vocab = PRESETS[name]
    with torch.device("meta"):
        model = getattr(M, f"{variant}_medusa_{name}")(medusa_num_heads=2, medusa_num_layers=2)
    keys = dict(model.named_parameters()).keys()  # state_dict() would dequantise NF4, impossible on meta
    assert "layers.0.attn.q_proj.lora_a.weight" in keys
    assert "layers.0.attn.output_proj.lora_b.weight" in keys  # default lora_attn_modules include output_proj
    assert sorted(k for k in keys if k.startswith("medusa_heads.")) == sorted(_head_keys(2, 2, True))
    adapter = get_adapter_params(model)
    assert adapter and not any(k.startswith("medusa_heads.") for k in adapter)
    weight = model.layers[0].attn.q_proj.weight
    assert ("NF4" in type(weight).__name__) == (variant == "qlora")
    assert model.medusa_heads[0][2].weight.shape == (vocab, dim)


def test_every_preset_is_exported():
    for name in PRESETS:
        for prefix in ("medusa_", "lora_medusa_", "qlora_medusa_"):
            assert f"{prefix}{name}" in M.__all__
            assert callable(getattr(M, f"{prefix}{name}"))
    for comp in ("medusa_llama3_1", "medusa_llama3_2", "medusa_smollm2"):
        assert comp in M.__all__ and f"lora_{comp}" in M.__all__
    assert "smollm2" in M.__all__ and "smollm2_135m" in M.__all__


def test_medusa_kwargs_pass_through():
    with torch.device("meta"):
        model = M.medusa_llama3_2_1b(medusa_num_heads=5, medusa_num_layers=0, medusa_projection="shared")
    assert model.num_medusa_heads == 5
    assert not any(k.startswith("medusa_heads.") for k in model.state_dict())  # L=0 and shared: no parameters
    with torch.device("meta"):
        model = M.medusa_llama3_2_1b(tie_word_embeddings=False)
    assert "output.weight" in model.state_dict()


def test_component_in_config():
    cfg = OmegaConf.create(
        {
            "_component_": "torchtune_medusa.models.qlora_medusa_smollm2_135m",
            "lora_attn_modules": ["q_proj", "v_proj"],
            "medusa_num_heads": 3,
            "medusa_projection": "shared",
        }
    )
    with torch.device("meta"):
        model = tt_config.instantiate(cfg)
    assert model.num_medusa_heads == 3
    assert model.medusa_heads[0].projection is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(medusa_num_heads=0), "medusa_num_heads must be an int >= 1"),
        (dict(medusa_num_heads=-2), "medusa_num_heads must be an int >= 1"),
        (dict(medusa_num_layers=-1), "medusa_num_layers"),
        (dict(medusa_projection="tied"), "medusa_projection must be one of"),
    ],
)
def test_bad_medusa_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.medusa_smollm2(
            vocab_size=64,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            embed_dim=16,
            intermediate_dim=32,
            max_seq_len=16,
            **kwargs,
        )
    with pytest.raises(ValueError, match=match):
        M.lora_medusa_llama3_1_8b(**kwargs)  # fails before building anything


def test_smollm2_lora_refuses_output_lora():
    with pytest.raises(ValueError, match="tied"):
        M.lora_medusa_smollm2_135m(apply_lora_to_output=True)


def test_nf4_kwargs():
    assert M._component_builders.nf4_kwargs(4096 * 4096) == {"block_size": 64, "scaler_block_size": 256}
    assert M._component_builders.nf4_kwargs(576 * 576) == {"block_size": 64, "scaler_block_size": 64}
    with pytest.raises(ValueError, match="divisible by 64"):
        M._component_builders.nf4_kwargs(100)
