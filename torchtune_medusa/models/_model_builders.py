# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Sized presets: no required arguments. Each accepts the Medusa arguments (``medusa_num_heads=4``,
``medusa_num_layers=1``, ``medusa_projection="own"``, see :mod:`torchtune_medusa.models._component_builders`), and
the LoRA variants accept torchtune's LoRA arguments with torchtune's defaults (rank 8, alpha 16) plus a default
``lora_attn_modules`` of ``["q_proj", "v_proj", "output_proj"]`` (torchtune's LoRA configs' choice). The QLoRA
variants are ``functools.partial(lora_..., quantize_base=True)``, as torchtune's own.

All names work as ``_component_`` in configs, e.g. ``torchtune_medusa.models.lora_medusa_llama3_1_8b``.

Each preset is one line over its component builder: the architecture arguments of its size are fixed here, and
every other keyword argument goes to the builder, which documents and validates it.
"""

from functools import partial
from typing import Any, Sequence

from torchtune.modules.peft import LORA_ATTN_MODULES

from torchtune_medusa.models._component_builders import (
    lora_medusa_llama3_1,
    lora_medusa_llama3_2,
    lora_medusa_smollm2,
    medusa_llama3_1,
    medusa_llama3_2,
    medusa_smollm2,
)
from torchtune_medusa.models._smollm2 import SMOLLM2_135M_ARGS
from torchtune_medusa.modules import MedusaTransformerDecoder

DEFAULT_LORA_ATTN_MODULES: Sequence[LORA_ATTN_MODULES] = ("q_proj", "v_proj", "output_proj")

# The architecture arguments of torchtune's presets (torchtune/models/llama3_{1,2}/_model_builders.py).
_LLAMA3_1_COMMON = dict(vocab_size=128_256, num_kv_heads=8, max_seq_len=131072, norm_eps=1e-5, rope_base=500_000)
_LLAMA3_1_8B = dict(_LLAMA3_1_COMMON, num_layers=32, num_heads=32, embed_dim=4096, intermediate_dim=14336)
_LLAMA3_1_70B = dict(_LLAMA3_1_COMMON, num_layers=80, num_heads=64, embed_dim=8192, intermediate_dim=28672)
_LLAMA3_1_405B = dict(_LLAMA3_1_COMMON, num_layers=126, num_heads=128, embed_dim=16384, intermediate_dim=53248)
_LLAMA3_2_COMMON = dict(_LLAMA3_1_COMMON, scale_factor=32)
_LLAMA3_2_1B = dict(_LLAMA3_2_COMMON, num_layers=16, num_heads=32, embed_dim=2048, intermediate_dim=8192)
_LLAMA3_2_3B = dict(_LLAMA3_2_COMMON, num_layers=28, num_heads=24, embed_dim=3072, intermediate_dim=8192)


# torchtune's LoRA presets default to rank 8, alpha 16; the component builders require both.
_LORA_DEFAULTS = dict(lora_rank=8, lora_alpha=16)


def _lora_kwargs(lora_attn_modules: Sequence[LORA_ATTN_MODULES], kwargs: Any) -> dict:
    return dict(_LORA_DEFAULTS, lora_attn_modules=list(lora_attn_modules), **kwargs)


def medusa_llama3_1_8b(**medusa_kwargs: Any) -> MedusaTransformerDecoder:
    """Llama 3.1 8B with Medusa heads (``medusa_num_heads=4``, ``medusa_num_layers=1``, ``medusa_projection="own"``
    unless given; see :func:`~torchtune_medusa.models.medusa_llama3_1`)."""
    return medusa_llama3_1(**_LLAMA3_1_8B, **medusa_kwargs)


def medusa_llama3_1_70b(**medusa_kwargs: Any) -> MedusaTransformerDecoder:
    """Llama 3.1 70B with Medusa heads (arguments as :func:`medusa_llama3_1_8b`)."""
    return medusa_llama3_1(**_LLAMA3_1_70B, **medusa_kwargs)


def medusa_llama3_1_405b(**medusa_kwargs: Any) -> MedusaTransformerDecoder:
    """Llama 3.1 405B with Medusa heads (arguments as :func:`medusa_llama3_1_8b`)."""
    return medusa_llama3_1(**_LLAMA3_1_405B, **medusa_kwargs)


def medusa_llama3_2_1b(**kwargs: Any) -> MedusaTransformerDecoder:
    """Llama 3.2 1B (tied output) with Medusa heads (``tie_word_embeddings`` and the Medusa arguments, see
    :func:`~torchtune_medusa.models.medusa_llama3_2`)."""
    return medusa_llama3_2(**_LLAMA3_2_1B, **kwargs)


def medusa_llama3_2_3b(**kwargs: Any) -> MedusaTransformerDecoder:
    """Llama 3.2 3B (tied output) with Medusa heads (arguments as :func:`medusa_llama3_2_1b`)."""
    return medusa_llama3_2(**_LLAMA3_2_3B, **kwargs)


def medusa_smollm2_135m(**medusa_kwargs: Any) -> MedusaTransformerDecoder:
    """SmolLM2-135M(-Instruct) (tied output) with Medusa heads (arguments as :func:`medusa_llama3_1_8b`)."""
    return medusa_smollm2(**SMOLLM2_135M_ARGS, **medusa_kwargs)


def lora_medusa_llama3_1_8b(
    lora_attn_modules: Sequence[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES, **kwargs: Any
) -> MedusaTransformerDecoder:
    """Llama 3.1 8B with LoRA and Medusa heads. ``kwargs``: the LoRA arguments (rank 8, alpha 16 unless given)
    and the Medusa arguments of :func:`~torchtune_medusa.models.lora_medusa_llama3_1`. The heads are plain
    trainable modules, not LoRA."""
    return lora_medusa_llama3_1(**_LLAMA3_1_8B, **_lora_kwargs(lora_attn_modules, kwargs))


def lora_medusa_llama3_1_70b(
    lora_attn_modules: Sequence[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES, **kwargs: Any
) -> MedusaTransformerDecoder:
    """Llama 3.1 70B with LoRA and Medusa heads (arguments as :func:`lora_medusa_llama3_1_8b`)."""
    return lora_medusa_llama3_1(**_LLAMA3_1_70B, **_lora_kwargs(lora_attn_modules, kwargs))


def lora_medusa_llama3_1_405b(
    lora_attn_modules: Sequence[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES, **kwargs: Any
) -> MedusaTransformerDecoder:
    """Llama 3.1 405B with LoRA and Medusa heads (arguments as :func:`lora_medusa_llama3_1_8b`)."""
    return lora_medusa_llama3_1(**_LLAMA3_1_405B, **_lora_kwargs(lora_attn_modules, kwargs))


def lora_medusa_llama3_2_1b(
    lora_attn_modules: Sequence[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES, **kwargs: Any
) -> MedusaTransformerDecoder:
    """Llama 3.2 1B (tied output) with LoRA and Medusa heads (arguments as :func:`lora_medusa_llama3_1_8b`,
    plus ``tie_word_embeddings``)."""
    return lora_medusa_llama3_2(**_LLAMA3_2_1B, **_lora_kwargs(lora_attn_modules, kwargs))


def lora_medusa_llama3_2_3b(
    lora_attn_modules: Sequence[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES, **kwargs: Any
) -> MedusaTransformerDecoder:
    """Llama 3.2 3B (tied output) with LoRA and Medusa heads (arguments as :func:`lora_medusa_llama3_2_1b`)."""
    return lora_medusa_llama3_2(**_LLAMA3_2_3B, **_lora_kwargs(lora_attn_modules, kwargs))


def lora_medusa_smollm2_135m(
    lora_attn_modules: Sequence[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES, **kwargs: Any
) -> MedusaTransformerDecoder:
    """SmolLM2-135M(-Instruct) (tied output) with LoRA and Medusa heads (arguments as
    :func:`lora_medusa_llama3_1_8b`)."""
    return lora_medusa_smollm2(**SMOLLM2_135M_ARGS, **_lora_kwargs(lora_attn_modules, kwargs))


# Llama 3.3 70B is the Llama 3.1 70B architecture, as in torchtune.
medusa_llama3_3_70b = medusa_llama3_1_70b
lora_medusa_llama3_3_70b = lora_medusa_llama3_1_70b

# QLoRA: NF4 base weights in the transformer layers, as torchtune's qlora presets.
qlora_medusa_llama3_1_8b = partial(lora_medusa_llama3_1_8b, quantize_base=True)
qlora_medusa_llama3_1_70b = partial(lora_medusa_llama3_1_70b, quantize_base=True)
qlora_medusa_llama3_1_405b = partial(lora_medusa_llama3_1_405b, quantize_base=True)
qlora_medusa_llama3_2_1b = partial(lora_medusa_llama3_2_1b, quantize_base=True)
qlora_medusa_llama3_2_3b = partial(lora_medusa_llama3_2_3b, quantize_base=True)
qlora_medusa_llama3_3_70b = partial(lora_medusa_llama3_3_70b, quantize_base=True)
qlora_medusa_smollm2_135m = partial(lora_medusa_smollm2_135m, quantize_base=True)

__all__ = [
    "DEFAULT_LORA_ATTN_MODULES",
    "lora_medusa_llama3_1_405b",
    "lora_medusa_llama3_1_70b",
    "lora_medusa_llama3_1_8b",
    "lora_medusa_llama3_2_1b",
    "lora_medusa_llama3_2_3b",
    "lora_medusa_llama3_3_70b",
    "lora_medusa_smollm2_135m",
    "medusa_llama3_1_405b",
    "medusa_llama3_1_70b",
    "medusa_llama3_1_8b",
    "medusa_llama3_2_1b",
    "medusa_llama3_2_3b",
    "medusa_llama3_3_70b",
    "medusa_smollm2_135m",
    "qlora_medusa_llama3_1_405b",
    "qlora_medusa_llama3_1_70b",
    "qlora_medusa_llama3_1_8b",
    "qlora_medusa_llama3_2_1b",
    "qlora_medusa_llama3_2_3b",
    "qlora_medusa_llama3_3_70b",
    "qlora_medusa_smollm2_135m",
]
