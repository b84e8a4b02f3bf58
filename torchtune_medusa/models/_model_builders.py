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
"""

from functools import partial
from typing import List, Sequence

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


def medusa_llama3_1_8b(
    *,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """Llama 3.1 8B with Medusa heads.

    Args:
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return medusa_llama3_1(
        **_LLAMA3_1_8B,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


def lora_medusa_llama3_1_8b(
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
) -> MedusaTransformerDecoder:
    """Llama 3.1 8B with LoRA and Medusa heads.

    The heads are plain trainable modules, not LoRA.

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections LoRA is applied to.
            Default ``["q_proj", "v_proj", "output_proj"]``.
        apply_lora_to_mlp (bool): apply LoRA to the MLPs. Default False.
        apply_lora_to_output (bool): apply LoRA to the output layer (refused for tied outputs). Default False.
        lora_rank (int): LoRA rank. Default 8.
        lora_alpha (float): LoRA alpha. Default 16.
        lora_dropout (float): LoRA dropout. Default 0.0.
        use_dora (bool): DoRA instead of LoRA. Default False.
        quantize_base (bool): NF4 base weights in the LoRA linears (QLoRA). Default False.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return lora_medusa_llama3_1(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **_LLAMA3_1_8B,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


qlora_medusa_llama3_1_8b = partial(lora_medusa_llama3_1_8b, quantize_base=True)
qlora_medusa_llama3_1_8b.__doc__ = """Llama 3.1 8B with QLoRA and Medusa heads
(NF4 base weights in the transformer layers).
Same arguments as :func:`lora_medusa_llama3_1_8b`, with ``quantize_base=True``.
"""


def medusa_llama3_1_70b(
    *,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """Llama 3.1 70B with Medusa heads.

    Args:
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return medusa_llama3_1(
        **_LLAMA3_1_70B,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


def lora_medusa_llama3_1_70b(
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
) -> MedusaTransformerDecoder:
    """Llama 3.1 70B with LoRA and Medusa heads.

    The heads are plain trainable modules, not LoRA.

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections LoRA is applied to.
            Default ``["q_proj", "v_proj", "output_proj"]``.
        apply_lora_to_mlp (bool): apply LoRA to the MLPs. Default False.
        apply_lora_to_output (bool): apply LoRA to the output layer (refused for tied outputs). Default False.
        lora_rank (int): LoRA rank. Default 8.
        lora_alpha (float): LoRA alpha. Default 16.
        lora_dropout (float): LoRA dropout. Default 0.0.
        use_dora (bool): DoRA instead of LoRA. Default False.
        quantize_base (bool): NF4 base weights in the LoRA linears (QLoRA). Default False.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return lora_medusa_llama3_1(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **_LLAMA3_1_70B,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


qlora_medusa_llama3_1_70b = partial(lora_medusa_llama3_1_70b, quantize_base=True)
qlora_medusa_llama3_1_70b.__doc__ = """Llama 3.1 70B with QLoRA and Medusa heads
(NF4 base weights in the transformer layers).
Same arguments as :func:`lora_medusa_llama3_1_70b`, with ``quantize_base=True``.
"""


def medusa_llama3_1_405b(
    *,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """Llama 3.1 405B with Medusa heads.

    Args:
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return medusa_llama3_1(
        **_LLAMA3_1_405B,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


def lora_medusa_llama3_1_405b(
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
) -> MedusaTransformerDecoder:
    """Llama 3.1 405B with LoRA and Medusa heads.

    The heads are plain trainable modules, not LoRA.

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections LoRA is applied to.
            Default ``["q_proj", "v_proj", "output_proj"]``.
        apply_lora_to_mlp (bool): apply LoRA to the MLPs. Default False.
        apply_lora_to_output (bool): apply LoRA to the output layer (refused for tied outputs). Default False.
        lora_rank (int): LoRA rank. Default 8.
        lora_alpha (float): LoRA alpha. Default 16.
        lora_dropout (float): LoRA dropout. Default 0.0.
        use_dora (bool): DoRA instead of LoRA. Default False.
        quantize_base (bool): NF4 base weights in the LoRA linears (QLoRA). Default False.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return lora_medusa_llama3_1(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **_LLAMA3_1_405B,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


qlora_medusa_llama3_1_405b = partial(lora_medusa_llama3_1_405b, quantize_base=True)
qlora_medusa_llama3_1_405b.__doc__ = """Llama 3.1 405B with QLoRA and Medusa heads
(NF4 base weights in the transformer layers).
Same arguments as :func:`lora_medusa_llama3_1_405b`, with ``quantize_base=True``.
"""


def medusa_llama3_2_1b(
    *,
    tie_word_embeddings: bool = True,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """Llama 3.2 1B (tied output) with Medusa heads.

    Args:
        tie_word_embeddings (bool): tie the output layer to the token embeddings. Default True.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return medusa_llama3_2(
        **_LLAMA3_2_1B,
        tie_word_embeddings=tie_word_embeddings,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


def lora_medusa_llama3_2_1b(
    lora_attn_modules: List[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    *,
    tie_word_embeddings: bool = True,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """Llama 3.2 1B (tied output) with LoRA and Medusa heads.

    The heads are plain trainable modules, not LoRA.

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections LoRA is applied to.
            Default ``["q_proj", "v_proj", "output_proj"]``.
        apply_lora_to_mlp (bool): apply LoRA to the MLPs. Default False.
        apply_lora_to_output (bool): apply LoRA to the output layer (refused for tied outputs). Default False.
        lora_rank (int): LoRA rank. Default 8.
        lora_alpha (float): LoRA alpha. Default 16.
        lora_dropout (float): LoRA dropout. Default 0.0.
        use_dora (bool): DoRA instead of LoRA. Default False.
        quantize_base (bool): NF4 base weights in the LoRA linears (QLoRA). Default False.
        tie_word_embeddings (bool): tie the output layer to the token embeddings. Default True.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return lora_medusa_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **_LLAMA3_2_1B,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        tie_word_embeddings=tie_word_embeddings,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


qlora_medusa_llama3_2_1b = partial(lora_medusa_llama3_2_1b, quantize_base=True)
qlora_medusa_llama3_2_1b.__doc__ = """Llama 3.2 1B (tied output) with QLoRA and Medusa heads
(NF4 base weights in the transformer layers).
Same arguments as :func:`lora_medusa_llama3_2_1b`, with ``quantize_base=True``.
"""


def medusa_llama3_2_3b(
    *,
    tie_word_embeddings: bool = True,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """Llama 3.2 3B (tied output) with Medusa heads.

    Args:
        tie_word_embeddings (bool): tie the output layer to the token embeddings. Default True.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return medusa_llama3_2(
        **_LLAMA3_2_3B,
        tie_word_embeddings=tie_word_embeddings,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


def lora_medusa_llama3_2_3b(
    lora_attn_modules: List[LORA_ATTN_MODULES] = DEFAULT_LORA_ATTN_MODULES,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    *,
    tie_word_embeddings: bool = True,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """Llama 3.2 3B (tied output) with LoRA and Medusa heads.

    The heads are plain trainable modules, not LoRA.

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections LoRA is applied to.
            Default ``["q_proj", "v_proj", "output_proj"]``.
        apply_lora_to_mlp (bool): apply LoRA to the MLPs. Default False.
        apply_lora_to_output (bool): apply LoRA to the output layer (refused for tied outputs). Default False.
        lora_rank (int): LoRA rank. Default 8.
        lora_alpha (float): LoRA alpha. Default 16.
        lora_dropout (float): LoRA dropout. Default 0.0.
        use_dora (bool): DoRA instead of LoRA. Default False.
        quantize_base (bool): NF4 base weights in the LoRA linears (QLoRA). Default False.
        tie_word_embeddings (bool): tie the output layer to the token embeddings. Default True.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return lora_medusa_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **_LLAMA3_2_3B,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        tie_word_embeddings=tie_word_embeddings,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


qlora_medusa_llama3_2_3b = partial(lora_medusa_llama3_2_3b, quantize_base=True)
qlora_medusa_llama3_2_3b.__doc__ = """Llama 3.2 3B (tied output) with QLoRA and Medusa heads
(NF4 base weights in the transformer layers).
Same arguments as :func:`lora_medusa_llama3_2_3b`, with ``quantize_base=True``.
"""


def medusa_llama3_3_70b(
    *,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """Llama 3.3 70B (the Llama 3.1 70B architecture) with Medusa heads.

    Args:
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return medusa_llama3_1(
        **_LLAMA3_1_70B,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


def lora_medusa_llama3_3_70b(
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
) -> MedusaTransformerDecoder:
    """Llama 3.3 70B (the Llama 3.1 70B architecture) with LoRA and Medusa heads.

    The heads are plain trainable modules, not LoRA.

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections LoRA is applied to.
            Default ``["q_proj", "v_proj", "output_proj"]``.
        apply_lora_to_mlp (bool): apply LoRA to the MLPs. Default False.
        apply_lora_to_output (bool): apply LoRA to the output layer (refused for tied outputs). Default False.
        lora_rank (int): LoRA rank. Default 8.
        lora_alpha (float): LoRA alpha. Default 16.
        lora_dropout (float): LoRA dropout. Default 0.0.
        use_dora (bool): DoRA instead of LoRA. Default False.
        quantize_base (bool): NF4 base weights in the LoRA linears (QLoRA). Default False.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return lora_medusa_llama3_1(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **_LLAMA3_1_70B,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


qlora_medusa_llama3_3_70b = partial(lora_medusa_llama3_3_70b, quantize_base=True)
qlora_medusa_llama3_3_70b.__doc__ = """Llama 3.3 70B (the Llama 3.1 70B architecture) with QLoRA and Medusa heads
(NF4 base weights in the transformer layers).
Same arguments as :func:`lora_medusa_llama3_3_70b`, with ``quantize_base=True``.
"""


def medusa_smollm2_135m(
    *,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
) -> MedusaTransformerDecoder:
    """SmolLM2-135M(-Instruct) (tied output) with Medusa heads.

    Args:
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return medusa_smollm2(
        **SMOLLM2_135M_ARGS,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


def lora_medusa_smollm2_135m(
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
) -> MedusaTransformerDecoder:
    """SmolLM2-135M(-Instruct) (tied output) with LoRA and Medusa heads.

    The heads are plain trainable modules, not LoRA.

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections LoRA is applied to.
            Default ``["q_proj", "v_proj", "output_proj"]``.
        apply_lora_to_mlp (bool): apply LoRA to the MLPs. Default False.
        apply_lora_to_output (bool): apply LoRA to the output layer (refused for tied outputs). Default False.
        lora_rank (int): LoRA rank. Default 8.
        lora_alpha (float): LoRA alpha. Default 16.
        lora_dropout (float): LoRA dropout. Default 0.0.
        use_dora (bool): DoRA instead of LoRA. Default False.
        quantize_base (bool): NF4 base weights in the LoRA linears (QLoRA). Default False.
        medusa_num_heads (int): Medusa heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.

    Returns:
        MedusaTransformerDecoder: the model.
    """
    return lora_medusa_smollm2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **SMOLLM2_135M_ARGS,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
    )


qlora_medusa_smollm2_135m = partial(lora_medusa_smollm2_135m, quantize_base=True)
qlora_medusa_smollm2_135m.__doc__ = """SmolLM2-135M(-Instruct) (tied output) with QLoRA and Medusa heads
(NF4 base weights in the transformer layers).
Same arguments as :func:`lora_medusa_smollm2_135m`, with ``quantize_base=True``.
"""

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
