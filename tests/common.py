# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Tiny in-process models shared by the tests (no files, no network)."""

import torch
from torchtune.models.llama3_1 import llama3_1

from torchtune_medusa.models import smollm2
from torchtune_medusa.modules import medusa_heads, MedusaTransformerDecoder

TINY = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128)


def tiny_medusa(
    *,
    num_heads: int = 3,
    num_layers: int = 1,
    own_projection: bool = True,
    tied: bool = False,
    seed: int = 0,
    randomize_heads: bool = True,
) -> MedusaTransformerDecoder:
    """A 2-layer Llama (llama3_1, or smollm2-style with a tied output when ``tied``) with random weights and
    ``num_heads`` Medusa heads. With ``randomize_heads`` the residual weights are random too (not zero), so
    that heads disagree with the base model, which makes decoding tests meaningful."""
    torch.manual_seed(seed)
    if tied:
        base = smollm2(intermediate_dim=64, rope_base=10_000, **TINY)
    else:
        base = llama3_1(intermediate_dim=64, **TINY)
    heads = medusa_heads(
        num_heads=num_heads,
        dim=TINY["embed_dim"],
        vocab_size=TINY["vocab_size"],
        num_layers=num_layers,
        own_projection=own_projection,
    )
    model = MedusaTransformerDecoder.from_decoder(base, heads)
    if randomize_heads:
        with torch.no_grad():
            for name, p in model.medusa_heads.named_parameters():
                p.normal_(0, 0.2 if "linear" in name else 0.5)
    return model.eval()
