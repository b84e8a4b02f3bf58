# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Component builders: every architecture argument of the base model plus the Medusa arguments.

Each builder builds the base model with torchtune's own builder (so every torchtune option keeps working) and
wraps it with :meth:`MedusaTransformerDecoder.from_decoder`, which reuses the base sub-modules: the base
state-dict keys are unchanged and the heads live under ``medusa_heads.*``.

Medusa arguments, shared by every builder:

- ``medusa_num_heads`` (int, default 4): number of heads K, ``>= 1``. Head k predicts the token k+1 steps
  after the base model's next token.
- ``medusa_num_layers`` (int, default 1): residual blocks per head, ``>= 0``. The blocks of one head are
  independent (FasterDecoding's code shares them; the same for L == 1).
- ``medusa_projection`` (str, default ``"own"``): ``"own"`` gives every head its own
  ``Linear(embed_dim, vocab_size, bias=False)``, initialised from the base output weights when the checkpoint
  is loaded (FasterDecoding v1, required by TensorRT-LLM and TGI v1); ``"shared"`` reuses the base output layer
  (FasterDecoding v2 / TGI v2; about ``vocab_size / embed_dim`` times fewer head parameters).
- ``medusa_head_type`` (str, default ``"medusa"``): ``"hydra"`` makes head k also read the embeddings of the k
  tokens before its target (the base model's next token and the candidates above it on the tree path; Hydra,
  Ankner et al. 2024). Saved in our head format only: serving engines load plain Medusa heads.

In the LoRA builders the heads are plain trainable modules, never LoRA: the recipe decides what trains
(``get_adapter_params`` returns only the LoRA parameters; add ``model.medusa_heads.parameters()`` yourself).
"""

from typing import Dict, List, Optional

from torch import nn
from torchao.dtypes.nf4tensor import to_nf4
from torchtune.models.llama3 import lora_llama3
from torchtune.models.llama3_1 import llama3_1, lora_llama3_1
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.common_utils import _register_reparametrize_state_dict_hooks
from torchtune.modules.low_precision import FrozenNF4Linear
from torchtune.modules.peft import DoRALinear, LORA_ATTN_MODULES, LoRALinear

from torchtune_medusa.models._smollm2 import smollm2
from torchtune_medusa.modules import MEDUSA_HEAD_TYPES, medusa_heads, MedusaTransformerDecoder

MEDUSA_PROJECTIONS = ("own", "shared")


def validate_medusa_args(
    medusa_num_heads: int, medusa_num_layers: int, medusa_projection: str, medusa_head_type: str = "medusa"
) -> None:
    """Check the Medusa builder arguments.

    Raises:
        ValueError: if ``medusa_num_heads < 1``, ``medusa_num_layers < 0``, ``medusa_projection`` is not one of
            ``"own"``, ``"shared"``, ``medusa_head_type`` not one of ``"medusa"``, ``"hydra"``, or Hydra heads have
            no residual block.
    """
    if isinstance(medusa_num_heads, bool) or not isinstance(medusa_num_heads, int) or medusa_num_heads < 1:
        raise ValueError(
            f"medusa_num_heads must be an int >= 1, got {medusa_num_heads!r}; "
            "for a model without heads use the plain torchtune builder"
        )
    if isinstance(medusa_num_layers, bool) or not isinstance(medusa_num_layers, int) or medusa_num_layers < 0:
        raise ValueError(f"medusa_num_layers (residual blocks per head) must be an int >= 0, got {medusa_num_layers!r}")
    if medusa_projection not in MEDUSA_PROJECTIONS:
        raise ValueError(
            f"medusa_projection must be one of {MEDUSA_PROJECTIONS} ('own': a vocabulary projection per head, "
            f"FasterDecoding v1; 'shared': reuse the base output layer, v2), got {medusa_projection!r}"
        )
    if medusa_head_type not in MEDUSA_HEAD_TYPES:
        raise ValueError(
            f"medusa_head_type must be one of {MEDUSA_HEAD_TYPES} ('medusa': heads read the hidden state; 'hydra': "
            f"head k also reads the k tokens before its target), got {medusa_head_type!r}"
        )
    if medusa_head_type == "hydra" and medusa_num_layers < 1:
        raise ValueError("Hydra heads read the previous tokens in their first residual block: medusa_num_layers >= 1")


def nf4_kwargs(numel: int, block_size: int = 64) -> Dict[str, int]:
    """``to_nf4`` block sizes for a weight with ``numel`` elements: torchao's defaults (64, scaler block 256)
    when they divide it, else the largest power-of-two scaler block that does (SmolLM2's 576-wide projections
    need 64).

    Raises:
        ValueError: if no block size fits (``numel`` not a multiple of ``block_size``).
    """
    if numel % block_size:
        raise ValueError(f"NF4 needs a weight size divisible by {block_size}, got {numel} elements")
    n_scalers = numel // block_size
    scaler_block = 256
    while scaler_block > 1 and n_scalers % scaler_block:
        scaler_block //= 2
    return {"block_size": block_size, "scaler_block_size": scaler_block}


def _quantize_layers_nf4(model: TransformerDecoder) -> None:
    """QLoRA after the fact: what torchtune's ``quantize_base=True`` does, with block sizes that fit any width
    (identical to torchtune's for every Llama 3.x size; SmolLM2-135M and small test models need smaller scaler
    blocks, which torchtune's builders cannot pass).

    LoRA/DoRA linears in ``model.layers`` get NF4 base weights; plain linears there become
    :class:`~torchtune.modules.low_precision.FrozenNF4Linear`. Embeddings, norms and the output stay as they are.
    """
    for layer in model.layers:
        for parent in list(layer.modules()):
            if isinstance(parent, (LoRALinear, DoRALinear)):
                continue  # lora_a / lora_b are the trainable adapter, never quantised
            for name, child in list(parent.named_children()):
                if isinstance(child, (LoRALinear, DoRALinear)):
                    w = child.weight
                    child.weight = nn.Parameter(to_nf4(w.detach(), **nf4_kwargs(w.numel())))
                    child._quantize_base = True
                elif type(child) is nn.Linear:
                    w = child.weight
                    q = FrozenNF4Linear(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        device=w.device,
                        dtype=w.dtype,
                        **nf4_kwargs(w.numel()),
                    )
                    setattr(parent, name, q)
    _register_reparametrize_state_dict_hooks(model)


def wrap_with_medusa_heads(
    base: TransformerDecoder,
    *,
    embed_dim: int,
    vocab_size: int,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
    medusa_head_type: str = "medusa",
) -> MedusaTransformerDecoder:
    """Add Medusa heads to a built torchtune decoder (no copies of the base modules).

    State-dict hooks registered on ``base`` (the QLoRA builders register one that dequantises NF4 weights on
    ``state_dict()``) are carried over to the returned model, which is the module the recipe calls
    ``state_dict()`` on.

    Args:
        base (TransformerDecoder): the base model.
        embed_dim (int): its hidden size (``TiedLinear`` has no ``in_features``, so it is passed explicitly).
        vocab_size (int): its vocabulary size.
        medusa_num_heads (int): heads K. Default 4.
        medusa_num_layers (int): residual blocks per head. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"`` (head k also reads the k tokens before its
            target; see :class:`~torchtune_medusa.modules.MedusaHead`). Default ``"medusa"``.

    Returns:
        MedusaTransformerDecoder: the Medusa model.

    Raises:
        ValueError: on invalid Medusa arguments (see :func:`validate_medusa_args`).
    """
    validate_medusa_args(medusa_num_heads, medusa_num_layers, medusa_projection, medusa_head_type)
    heads = medusa_heads(
        num_heads=medusa_num_heads,
        dim=embed_dim,
        vocab_size=vocab_size,
        num_layers=medusa_num_layers,
        own_projection=medusa_projection == "own",
        head_type=medusa_head_type,
    )
    model = MedusaTransformerDecoder.from_decoder(base, heads)
    for hook in base._state_dict_hooks.values():
        model._register_state_dict_hook(hook)
    return model


def medusa_llama3_1(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    rope_base: int = 500_000,
    intermediate_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    scale_factor: int = 8,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
    medusa_head_type: str = "medusa",
) -> MedusaTransformerDecoder:
    """Llama 3.1 / 3.3 (:func:`torchtune.models.llama3_1.llama3_1`) with Medusa heads.

    Args:
        vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, max_seq_len, attn_dropout, rope_base,
            intermediate_dim, norm_eps, scale_factor: as in :func:`torchtune.models.llama3_1.llama3_1`.
        medusa_num_heads (int): heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"`` (see the module docstring). Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"`` (head k also reads the k tokens before its
            target; see :class:`~torchtune_medusa.modules.MedusaHead`). Default ``"medusa"``.

    Returns:
        MedusaTransformerDecoder: the model.

    Raises:
        ValueError: on invalid Medusa arguments.
    """
    validate_medusa_args(medusa_num_heads, medusa_num_layers, medusa_projection, medusa_head_type)
    base = llama3_1(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        attn_dropout=attn_dropout,
        rope_base=rope_base,
        intermediate_dim=intermediate_dim,
        norm_eps=norm_eps,
        scale_factor=scale_factor,
    )
    return wrap_with_medusa_heads(
        base,
        embed_dim=embed_dim,
        vocab_size=vocab_size,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
        medusa_head_type=medusa_head_type,
    )


def medusa_llama3_2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    rope_base: int = 500_000,
    intermediate_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    scale_factor: int = 32,
    tie_word_embeddings: bool = True,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
    medusa_head_type: str = "medusa",
) -> MedusaTransformerDecoder:
    """Llama 3.2 text (:func:`torchtune.models.llama3_2.llama3_2`, tied output by default) with Medusa heads.

    With ``medusa_projection="own"`` and tied embeddings each head's projection is initialised from
    ``tok_embeddings.weight`` (the tied output) and then trains on its own.

    Args:
        vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, max_seq_len, attn_dropout, rope_base,
            intermediate_dim, norm_eps, scale_factor, tie_word_embeddings: as in
            :func:`torchtune.models.llama3_2.llama3_2`.
        medusa_num_heads (int): heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"`` (head k also reads the k tokens before its
            target; see :class:`~torchtune_medusa.modules.MedusaHead`). Default ``"medusa"``.

    Returns:
        MedusaTransformerDecoder: the model.

    Raises:
        ValueError: on invalid Medusa arguments.
    """
    validate_medusa_args(medusa_num_heads, medusa_num_layers, medusa_projection, medusa_head_type)
    base = llama3_2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        attn_dropout=attn_dropout,
        rope_base=rope_base,
        intermediate_dim=intermediate_dim,
        norm_eps=norm_eps,
        scale_factor=scale_factor,
        tie_word_embeddings=tie_word_embeddings,
    )
    return wrap_with_medusa_heads(
        base,
        embed_dim=embed_dim,
        vocab_size=vocab_size,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
        medusa_head_type=medusa_head_type,
    )


def medusa_smollm2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    rope_base: int = 100_000,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
    medusa_head_type: str = "medusa",
) -> MedusaTransformerDecoder:
    """SmolLM2 (:func:`torchtune_medusa.models.smollm2`: Llama blocks, unscaled RoPE, tied output) with Medusa
    heads.

    Args:
        vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, intermediate_dim, max_seq_len, rope_base,
            norm_eps, attn_dropout: as in :func:`torchtune_medusa.models.smollm2`.
        medusa_num_heads (int): heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"`` (head k also reads the k tokens before its
            target; see :class:`~torchtune_medusa.modules.MedusaHead`). Default ``"medusa"``.

    Returns:
        MedusaTransformerDecoder: the model.

    Raises:
        ValueError: on invalid Medusa arguments.
    """
    validate_medusa_args(medusa_num_heads, medusa_num_layers, medusa_projection, medusa_head_type)
    base = smollm2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        rope_base=rope_base,
        norm_eps=norm_eps,
        attn_dropout=attn_dropout,
    )
    return wrap_with_medusa_heads(
        base,
        embed_dim=embed_dim,
        vocab_size=vocab_size,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
        medusa_head_type=medusa_head_type,
    )


def lora_medusa_llama3_1(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: int = 500_000,
    scale_factor: int = 8,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
    medusa_head_type: str = "medusa",
) -> MedusaTransformerDecoder:
    """Llama 3.1 / 3.3 with LoRA (:func:`torchtune.models.llama3_1.lora_llama3_1`) and Medusa heads.

    The heads are plain modules (not LoRA). ``quantize_base=True`` gives QLoRA (NF4 base weights via torchao in
    the transformer layers, as torchtune does); the heads and the output layer stay in full precision.

    Args:
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, vocab_size, num_layers, num_heads,
            num_kv_heads, embed_dim, max_seq_len, intermediate_dim, attn_dropout, norm_eps, rope_base,
            scale_factor, lora_rank, lora_alpha, lora_dropout, use_dora, quantize_base: as in
            :func:`torchtune.models.llama3_1.lora_llama3_1`.
        medusa_num_heads (int): heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. With ``"shared"`` and ``apply_lora_to_output`` the
            heads are projected through the LoRA output layer. Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"`` (head k also reads the k tokens before its
            target; see :class:`~torchtune_medusa.modules.MedusaHead`). Default ``"medusa"``.

    Returns:
        MedusaTransformerDecoder: the model.

    Raises:
        ValueError: on invalid Medusa arguments.
    """
    validate_medusa_args(medusa_num_heads, medusa_num_layers, medusa_projection, medusa_head_type)
    base = lora_llama3_1(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        scale_factor=scale_factor,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=False,  # quantised below, with NF4 block sizes that fit any width
    )
    if quantize_base:
        _quantize_layers_nf4(base)
    return wrap_with_medusa_heads(
        base,
        embed_dim=embed_dim,
        vocab_size=vocab_size,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
        medusa_head_type=medusa_head_type,
    )


def lora_medusa_llama3_2(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: int = 500_000,
    scale_factor: int = 32,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    tie_word_embeddings: bool = True,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
    medusa_head_type: str = "medusa",
) -> MedusaTransformerDecoder:
    """Llama 3.2 text with LoRA (:func:`torchtune.models.llama3_2.lora_llama3_2`) and Medusa heads.

    Args:
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, vocab_size, num_layers, num_heads,
            num_kv_heads, embed_dim, max_seq_len, intermediate_dim, attn_dropout, norm_eps, rope_base,
            scale_factor, lora_rank, lora_alpha, lora_dropout, use_dora, quantize_base, tie_word_embeddings: as
            in :func:`torchtune.models.llama3_2.lora_llama3_2` (``apply_lora_to_output`` is refused there for
            the tied output).
        medusa_num_heads (int): heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"`` (head k also reads the k tokens before its
            target; see :class:`~torchtune_medusa.modules.MedusaHead`). Default ``"medusa"``.

    Returns:
        MedusaTransformerDecoder: the model.

    Raises:
        ValueError: on invalid Medusa arguments.
    """
    validate_medusa_args(medusa_num_heads, medusa_num_layers, medusa_projection, medusa_head_type)
    base = lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        scale_factor=scale_factor,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=False,  # quantised below, with NF4 block sizes that fit any width
        tie_word_embeddings=tie_word_embeddings,
    )
    if quantize_base:
        _quantize_layers_nf4(base)
    return wrap_with_medusa_heads(
        base,
        embed_dim=embed_dim,
        vocab_size=vocab_size,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
        medusa_head_type=medusa_head_type,
    )


def lora_medusa_smollm2(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: int = 100_000,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    medusa_num_heads: int = 4,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
    medusa_head_type: str = "medusa",
) -> MedusaTransformerDecoder:
    """SmolLM2 with LoRA (torchtune's :func:`~torchtune.models.llama3.lora_llama3` blocks, output tied to the
    token embeddings) and Medusa heads.

    Args:
        lora_attn_modules, apply_lora_to_mlp, vocab_size, num_layers, num_heads, num_kv_heads, embed_dim,
            intermediate_dim, max_seq_len, attn_dropout, norm_eps, rope_base, lora_rank, lora_alpha,
            lora_dropout, use_dora, quantize_base: as in :func:`torchtune.models.llama3.lora_llama3`.
        apply_lora_to_output (bool): must be False: the output is tied to the token embeddings.
        medusa_num_heads (int): heads K, ``>= 1``. Default 4.
        medusa_num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"`` (head k also reads the k tokens before its
            target; see :class:`~torchtune_medusa.modules.MedusaHead`). Default ``"medusa"``.

    Returns:
        MedusaTransformerDecoder: the model.

    Raises:
        ValueError: on invalid Medusa arguments or ``apply_lora_to_output=True``.
    """
    validate_medusa_args(medusa_num_heads, medusa_num_layers, medusa_projection, medusa_head_type)
    if apply_lora_to_output:
        raise ValueError(
            "apply_lora_to_output is not supported for SmolLM2: its output layer is tied to the token embeddings"
        )
    base = lora_llama3(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=False,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=False,  # quantised below: torchtune's NF4 block sizes do not divide SmolLM2's 576 width
    )
    if quantize_base:
        _quantize_layers_nf4(base)
    del base.output  # a registered nn.Linear; TiedLinear is a plain callable, not a module
    base.output = TiedLinear(base.tok_embeddings)
    return wrap_with_medusa_heads(
        base,
        embed_dim=embed_dim,
        vocab_size=vocab_size,
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
        medusa_head_type=medusa_head_type,
    )


__all__ = [
    "MEDUSA_PROJECTIONS",
    "lora_medusa_llama3_1",
    "lora_medusa_llama3_2",
    "lora_medusa_smollm2",
    "medusa_llama3_1",
    "medusa_llama3_2",
    "medusa_smollm2",
    "nf4_kwargs",
    "validate_medusa_args",
    "wrap_with_medusa_heads",
]
