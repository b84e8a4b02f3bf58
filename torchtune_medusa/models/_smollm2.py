# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""SmolLM2: a Llama-architecture model with tied embeddings and plain (unscaled) RoPE, base 1e5.

torchtune has no SmolLM2 builder; ``llama3`` gives the right blocks and RoPE, and the output layer is swapped
for a :class:`~torchtune.modules.TiedLinear` over the token embeddings, as torchtune's Llama 3.2 builder does.
"""

from torchtune.models.llama3 import llama3
from torchtune.modules import TiedLinear, TransformerDecoder

SMOLLM2_135M_ARGS = dict(
    vocab_size=49152,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    intermediate_dim=1536,
    max_seq_len=8192,
    rope_base=100_000,
    norm_eps=1e-5,
)


def smollm2(
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
) -> TransformerDecoder:
    """Build a SmolLM2-style decoder (Llama blocks, unscaled RoPE, output tied to the token embeddings).

    Args:
        vocab_size (int): vocabulary size.
        num_layers (int): number of transformer layers.
        num_heads (int): query heads.
        num_kv_heads (int): key/value heads (GQA).
        embed_dim (int): hidden size.
        intermediate_dim (int): MLP hidden size.
        max_seq_len (int): maximum sequence length (RoPE cache and KV-cache default size).
        rope_base (int): RoPE base. Default 1e5.
        norm_eps (float): RMSNorm epsilon. Default 1e-5.
        attn_dropout (float): attention dropout. Default 0.0.

    Returns:
        TransformerDecoder: the model.
    """
    model = llama3(
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
    )
    del model.output  # a registered nn.Linear; TiedLinear is a plain callable, not a module
    model.output = TiedLinear(model.tok_embeddings)
    return model


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M(-Instruct): 30 layers, dim 576, 9 heads / 3 KV heads, vocab 49152, context 8192."""
    return smollm2(**SMOLLM2_135M_ARGS)
