# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

from typing import Optional

import torch
from torch import nn


class MedusaResBlock(nn.Module):
    """Residual block ``h + SiLU(W h + b)`` used inside a Medusa head.

    ``W`` is zero-initialised, as in Medusa, so that at initialisation the block only adds ``SiLU(b)`` to its
    input; the bias keeps ``nn.Linear``'s default initialisation. The attribute is named ``linear`` so that the
    state-dict keys match the FasterDecoding layout (``{head}.{block}.linear.weight``).

    Args:
        dim (int): hidden size of the backbone.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): input with shape ``[..., dim]``.

        Returns:
            torch.Tensor: output with the same shape as ``x``.
        """
        return x + nn.functional.silu(self.linear(x))


class MedusaHead(nn.Sequential):
    """One Medusa head: ``num_layers`` independent :class:`MedusaResBlock` s followed, optionally, by its own
    vocabulary projection.

    The head is an ``nn.Sequential`` so that its state-dict keys are exactly FasterDecoding's: blocks at
    ``0..L-1`` (``{j}.linear.weight|bias``) and the own projection at ``L`` (``{L}.weight``).

    Note:
        FasterDecoding builds a head with ``[ResBlock(dim)] * L``, which repeats the *same* block object, so
        with ``L > 1`` all blocks of a head share weights. Here every block is a distinct module with its own
        weights. With ``L == 1`` (the default and every released checkpoint) the two are the same.

    Args:
        dim (int): hidden size of the backbone.
        vocab_size (int): vocabulary size of the backbone.
        num_layers (int): number of residual blocks, ``>= 0``.
        own_projection (bool): if True the head ends with its own ``Linear(dim, vocab_size, bias=False)``
            (FasterDecoding v1 / TensorRT-LLM / TGI v1 layout); if False the head returns hidden states and
            the caller projects them with the backbone's output layer (FasterDecoding v2 / TGI v2 layout).

    Raises:
        ValueError: if ``num_layers < 0``.
    """

    def __init__(self, *, dim: int, vocab_size: int, num_layers: int = 1, own_projection: bool = True) -> None:
        if num_layers < 0:
            raise ValueError(f"num_layers (layers per Medusa head) must be >= 0, got {num_layers}")
        modules = [MedusaResBlock(dim) for _ in range(num_layers)]
        if own_projection:
            modules.append(nn.Linear(dim, vocab_size, bias=False))
        super().__init__(*modules)
        self.num_layers = num_layers
        self.dim = dim
        self.vocab_size = vocab_size

    @property
    def projection(self) -> Optional[nn.Linear]:
        """The head's own vocabulary projection, or None when it shares the backbone's output layer."""
        return self[self.num_layers] if len(self) > self.num_layers else None


def medusa_heads(
    *, num_heads: int, dim: int, vocab_size: int, num_layers: int = 1, own_projection: bool = True
) -> nn.ModuleList:
    """Build ``num_heads`` Medusa heads in an ``nn.ModuleList`` (the ``medusa_heads`` container).

    Args:
        num_heads (int): number of heads K, ``>= 1``. Head k (1-based) predicts the token k+1 steps after the
            backbone's next-token prediction.
        dim (int): hidden size of the backbone.
        vocab_size (int): vocabulary size of the backbone.
        num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        own_projection (bool): whether each head has its own vocabulary projection. Default True.

    Returns:
        nn.ModuleList: the heads.

    Raises:
        ValueError: if ``num_heads < 1`` or ``num_layers < 0``.
    """
    if num_heads < 1:
        raise ValueError(
            f"num_heads (Medusa heads) must be >= 1, got {num_heads}; use the plain torchtune model for no heads"
        )
    return nn.ModuleList(
        MedusaHead(dim=dim, vocab_size=vocab_size, num_layers=num_layers, own_projection=own_projection)
        for _ in range(num_heads)
    )
