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

The presets are made by :func:`_medusa_preset` and :func:`_lora_medusa_preset` from a component builder and the
architecture arguments of one size; their signatures are those of :func:`_medusa_signature` and
:func:`_lora_medusa_signature` (plus ``tie_word_embeddings`` for the Llama 3.2 presets).
"""

import inspect
from functools import partial
from typing import Any, Callable, Dict, List, Sequence, Tuple

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


# The presets' signatures (never called).
def _medusa_signature(
    *,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder: ...


def _lora_medusa_signature(
    lora_attn_modules: List[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    *,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder: ...


_ARG_DOCS = {
    "lora_attn_modules": "lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections LoRA is applied to.\n"
    '        Default ``["q_proj", "v_proj", "output_proj"]``.',
    "apply_lora_to_mlp": "apply_lora_to_mlp (bool): apply LoRA to the MLPs. Default False.",
    "apply_lora_to_output": "apply_lora_to_output (bool): apply LoRA to the output layer (refused for tied outputs). "
    "Default False.",
    "lora_rank": "lora_rank (int): LoRA rank. Default 8.",
    "lora_alpha": "lora_alpha (float): LoRA alpha. Default 16.",
    "lora_dropout": "lora_dropout (float): LoRA dropout. Default 0.0.",
    "use_dora": "use_dora (bool): DoRA instead of LoRA. Default False.",
    "quantize_base": "quantize_base (bool): NF4 base weights in the LoRA linears (QLoRA). Default False.",
    "tie_word_embeddings": "tie_word_embeddings (bool): tie the output layer to the token embeddings. Default True.",
    "medusa_num_heads": "medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.",
    "medusa_num_layers": "medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.",
    "medusa_projection": 'medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.',
}


def _with_tie_word_embeddings(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` with a keyword-only ``tie_word_embeddings: bool = True`` before the Medusa arguments."""
    params = list(signature.parameters.values())
    at = [p.name for p in params].index("medusa_num_heads")
    tie = inspect.Parameter("tie_word_embeddings", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool)
    return signature.replace(parameters=params[:at] + [tie] + params[at:])


def _make_preset(
    name: str,
    signature: inspect.Signature,
    build: Callable[..., MedusaTransformerDecoder],
    summary: str,
) -> Callable[..., MedusaTransformerDecoder]:
    """A module-level function ``name`` with ``signature`` that calls ``build(**arguments)`` with the bound
    arguments (defaults applied), documented by ``summary`` and the shared argument descriptions."""

    def preset(*args: Any, **kwargs: Any) -> MedusaTransformerDecoder:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{name}() {e}") from None
        bound.apply_defaults()
        return build(**bound.arguments)

    args_doc = "\n".join(f"    {_ARG_DOCS[p]}" for p in signature.parameters)
    preset.__name__ = preset.__qualname__ = name
    preset.__signature__ = signature
    preset.__doc__ = f"{summary}\n\nArgs:\n{args_doc}\n\nReturns:\n    MedusaTransformerDecoder: the model.\n"
    return preset


def _medusa_preset(
    name: str,
    component_builder: Callable[..., MedusaTransformerDecoder],
    size_kwargs: Dict[str, Any],
    description: str,
    *,
    tie_word_embeddings: bool = False,
) -> Callable[..., MedusaTransformerDecoder]:
    """The full-model preset ``name``: ``component_builder(**size_kwargs, <Medusa arguments>)``. With
    ``tie_word_embeddings``, the preset also takes that argument (the Llama 3.2 builders')."""
    signature = inspect.signature(_medusa_signature)
    if tie_word_embeddings:
        signature = _with_tie_word_embeddings(signature)
    return _make_preset(
        name,
        signature,
        lambda **kwargs: component_builder(**size_kwargs, **kwargs),
        f"{description} with Medusa heads.",
    )


def _lora_medusa_preset(
    name: str,
    component_builder: Callable[..., MedusaTransformerDecoder],
    size_kwargs: Dict[str, Any],
    description: str,
    *,
    tie_word_embeddings: bool = False,
) -> Callable[..., MedusaTransformerDecoder]:
    """The LoRA preset ``name``: ``component_builder(**size_kwargs, <LoRA and Medusa arguments>)``, with
    ``lora_attn_modules`` passed as a list."""
    signature = inspect.signature(_lora_medusa_signature)
    if tie_word_embeddings:
        signature = _with_tie_word_embeddings(signature)

    def build(lora_attn_modules: Sequence[LORA_ATTN_MODULES], **kwargs: Any) -> MedusaTransformerDecoder:
        return component_builder(lora_attn_modules=list(lora_attn_modules), **size_kwargs, **kwargs)

    return _make_preset(
        name,
        signature,
        build,
        f"{description} with LoRA and Medusa heads.\n\nThe heads are plain trainable modules, not LoRA.",
    )


def _qlora_medusa_preset(lora_preset: Callable[..., MedusaTransformerDecoder], description: str) -> partial:
    """``functools.partial(lora_preset, quantize_base=True)``, documented."""
    qlora_preset = partial(lora_preset, quantize_base=True)
    qlora_preset.__doc__ = (
        f"{description} with QLoRA and Medusa heads\n(NF4 base weights in the transformer layers).\n"
        f"Same arguments as :func:`{lora_preset.__name__}`, with ``quantize_base=True``.\n"
    )
    return qlora_preset


def _presets(
    size: str,
    component_builder: Callable[..., MedusaTransformerDecoder],
    lora_component_builder: Callable[..., MedusaTransformerDecoder],
    size_kwargs: Dict[str, Any],
    description: str,
    *,
    tie_word_embeddings: bool = False,
) -> Tuple[Callable[..., MedusaTransformerDecoder], Callable[..., MedusaTransformerDecoder], partial]:
    """The presets ``medusa_<size>``, ``lora_medusa_<size>`` and ``qlora_medusa_<size>`` of one model size."""
    medusa = _medusa_preset(
        f"medusa_{size}", component_builder, size_kwargs, description, tie_word_embeddings=tie_word_embeddings
    )
    lora = _lora_medusa_preset(
        f"lora_medusa_{size}", lora_component_builder, size_kwargs, description, tie_word_embeddings=tie_word_embeddings
    )
    return medusa, lora, _qlora_medusa_preset(lora, description)


medusa_llama3_1_8b, lora_medusa_llama3_1_8b, qlora_medusa_llama3_1_8b = _presets(
    "llama3_1_8b", medusa_llama3_1, lora_medusa_llama3_1, _LLAMA3_1_8B, "Llama 3.1 8B"
)
medusa_llama3_1_70b, lora_medusa_llama3_1_70b, qlora_medusa_llama3_1_70b = _presets(
    "llama3_1_70b", medusa_llama3_1, lora_medusa_llama3_1, _LLAMA3_1_70B, "Llama 3.1 70B"
)
medusa_llama3_1_405b, lora_medusa_llama3_1_405b, qlora_medusa_llama3_1_405b = _presets(
    "llama3_1_405b", medusa_llama3_1, lora_medusa_llama3_1, _LLAMA3_1_405B, "Llama 3.1 405B"
)
medusa_llama3_2_1b, lora_medusa_llama3_2_1b, qlora_medusa_llama3_2_1b = _presets(
    "llama3_2_1b",
    medusa_llama3_2,
    lora_medusa_llama3_2,
    _LLAMA3_2_1B,
    "Llama 3.2 1B (tied output)",
    tie_word_embeddings=True,
)
medusa_llama3_2_3b, lora_medusa_llama3_2_3b, qlora_medusa_llama3_2_3b = _presets(
    "llama3_2_3b",
    medusa_llama3_2,
    lora_medusa_llama3_2,
    _LLAMA3_2_3B,
    "Llama 3.2 3B (tied output)",
    tie_word_embeddings=True,
)
medusa_llama3_3_70b, lora_medusa_llama3_3_70b, qlora_medusa_llama3_3_70b = _presets(
    "llama3_3_70b",
    medusa_llama3_1,
    lora_medusa_llama3_1,
    _LLAMA3_1_70B,
    "Llama 3.3 70B (the Llama 3.1 70B architecture)",
)
medusa_smollm2_135m, lora_medusa_smollm2_135m, qlora_medusa_smollm2_135m = _presets(
    "smollm2_135m", medusa_smollm2, lora_medusa_smollm2, SMOLLM2_135M_ARGS, "SmolLM2-135M(-Instruct) (tied output)"
)

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
