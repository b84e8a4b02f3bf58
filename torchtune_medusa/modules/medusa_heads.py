# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

from typing import Optional

import torch
from torch import nn


class MedusaResBlock(nn.Module):
    """Residual block ``h + SiLU(W x + b)`` used inside a Medusa head, with ``x = h`` (Medusa) or, for the first
    block of a Hydra head, ``x = [h, e_1, ..., e_k]``: the hidden state and the embeddings of the k tokens between
    the backbone's position and the head's target.

    ``W`` is zero-initialised, as in Medusa, so that at initialisation the block only adds ``SiLU(b)`` to its
    input; the bias keeps ``nn.Linear``'s default initialisation. The attribute is named ``linear`` so that the
    state-dict keys match the FasterDecoding layout (``{head}.{block}.linear.weight``).

    Args:
        dim (int): hidden size of the backbone.
        num_prev_tokens (int): token embeddings read besides the hidden state (0: a Medusa block). Default 0.
    """

    def __init__(self, dim: int, num_prev_tokens: int = 0) -> None:
        super().__init__()
        self.num_prev_tokens = num_prev_tokens
        self.linear = nn.Linear(dim * (1 + num_prev_tokens), dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor, prev_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): input with shape ``[..., dim]``.
            prev_embeddings (Optional[torch.Tensor]): ``[..., num_prev_tokens, dim]``, needed when
                ``num_prev_tokens > 0``.

        Returns:
            torch.Tensor: output with the same shape as ``x``.
        """
        inputs = x
        if self.num_prev_tokens:
            if prev_embeddings is None or prev_embeddings.size(-2) < self.num_prev_tokens:
                got = None if prev_embeddings is None else tuple(prev_embeddings.shape)
                raise ValueError(
                    f"this Hydra block reads the embeddings of {self.num_prev_tokens} previous tokens "
                    f"([..., {self.num_prev_tokens}, dim]), got {got}"
                )
            prev = prev_embeddings[..., : self.num_prev_tokens, :].flatten(-2)
            inputs = torch.cat([x, prev.to(x.dtype)], dim=-1)
        return x + nn.functional.silu(self.linear(inputs))


class MedusaHead(nn.Sequential):
    """One Medusa head: ``num_layers`` independent :class:`MedusaResBlock` s followed, optionally, by its own
    vocabulary projection.

    The head is an ``nn.Sequential`` so that its state-dict keys are exactly FasterDecoding's: blocks at
    ``0..L-1`` (``{j}.linear.weight|bias``) and the own projection at ``L`` (``{L}.weight``).

    A *Hydra* head (``num_prev_tokens = k > 0``, Ankner et al. 2024, "Hydra: Sequentially-Dependent Draft Heads")
    also reads the tokens it would follow: head k predicts the token after ``x_1..x_k`` (``x_1`` is the base
    model's next token, ``x_2..x_k`` the candidates of heads ``1..k-1`` on the same tree path), and its first block
    reads ``[h, embed(x_1), ..., embed(x_k)]`` (weight ``[D, (k + 1) D]``; same keys). Knowing the tokens before
    its target is what a Medusa head lacks: with it, deeper heads guess nearly as well as the first.

    Note:
        FasterDecoding builds a head with ``[ResBlock(dim)] * L``, which repeats the *same* block object, so
        with ``L > 1`` all blocks of a head share weights. Here every block is a distinct module with its own
        weights. With ``L == 1`` (the default and every released checkpoint) the two are the same.

    Args:
        dim (int): hidden size of the backbone.
        vocab_size (int): vocabulary size of the backbone.
        num_layers (int): number of residual blocks, ``>= 0`` (``>= 1`` for a Hydra head).
        own_projection (bool): if True the head ends with its own ``Linear(dim, vocab_size, bias=False)``
            (FasterDecoding v1 / TensorRT-LLM / TGI v1 layout); if False the head returns hidden states and
            the caller projects them with the backbone's output layer (FasterDecoding v2 / TGI v2 layout).
        num_prev_tokens (int): tokens the head reads besides the hidden state: 0 for a Medusa head, k for Hydra
            head k. Default 0.

    Raises:
        ValueError: if ``num_layers < 0``, or a Hydra head has no block.
    """

    def __init__(
        self, *, dim: int, vocab_size: int, num_layers: int = 1, own_projection: bool = True, num_prev_tokens: int = 0
    ) -> None:
        if num_layers < 0:
            raise ValueError(f"num_layers (layers per Medusa head) must be >= 0, got {num_layers}")
        if num_prev_tokens and num_layers < 1:
            raise ValueError("a Hydra head reads the previous tokens in its first block: num_layers must be >= 1")
        modules = [MedusaResBlock(dim, num_prev_tokens if j == 0 else 0) for j in range(num_layers)]
        if own_projection:
            modules.append(nn.Linear(dim, vocab_size, bias=False))
        super().__init__(*modules)
        self.num_layers = num_layers
        self.num_prev_tokens = num_prev_tokens
        self.dim = dim
        self.vocab_size = vocab_size

    @property
    def projection(self) -> Optional[nn.Linear]:
        """The head's own vocabulary projection, or None when it shares the backbone's output layer."""
        return self[self.num_layers] if len(self) > self.num_layers else None

    def trunk(self, x: torch.Tensor, prev_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The residual blocks: the head's state before any vocabulary projection, ``[..., dim]``.

        Args:
            x (torch.Tensor): normed hidden state ``[..., dim]``.
            prev_embeddings (Optional[torch.Tensor]): ``[..., k, dim]`` embeddings of the k tokens a Hydra head
                reads (``k >= num_prev_tokens``; the first ``num_prev_tokens`` are used). Ignored by Medusa heads.
        """
        for j in range(self.num_layers):
            x = self[j](x, prev_embeddings) if j == 0 else self[j](x)
        return x

    def forward(self, x: torch.Tensor, prev_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head's logits (own projection) or its state (shared projection), see :meth:`trunk`."""
        z = self.trunk(x, prev_embeddings)
        projection = self.projection
        return z if projection is None else projection(z)


class MedusaHeadList(nn.ModuleList):
    """The ``medusa_heads`` container: the heads, plus an optional *token map* (vLLM's truncated-vocabulary layout).

    With a token map of N token ids, every head scores only those N tokens: a head that shares the backbone's
    output layer is projected onto those N rows of it, and a head with its own projection has N outputs. Head
    logits are then ``[..., N]`` and index ``i`` stands for token ``token_map[i]``. On a small model the heads'
    vocabulary projection is most of their cost, in training and in decoding, and the N most frequent tokens of
    the training data cover nearly every target (:func:`~torchtune_medusa.generation.frequent_tokens`).

    The map is a buffer, saved as ``medusa_heads.token_map`` (``token_map`` in the heads file, as vLLM names
    it). Loading a state dict that has one sets it, so a model built without a map loads truncated heads.
    """

    def __init__(self, modules=None) -> None:
        super().__init__(modules)
        self.register_buffer("token_map", None)  # None: the whole vocabulary (not in the state dict)
        self._register_load_state_dict_pre_hook(self._take_token_map)

    @property
    def head_type(self) -> str:
        """``"hydra"`` when the heads read the tokens before their targets, else ``"medusa"``."""
        return "hydra" if any(getattr(head, "num_prev_tokens", 0) for head in self) else "medusa"

    def set_token_map(self, token_map: Optional[torch.Tensor], vocab_size: Optional[int] = None) -> None:
        """Restrict the heads to ``token_map`` (sorted, distinct token ids), or lift the restriction with None.

        Args:
            token_map (Optional[torch.Tensor]): ``[N]`` token ids.
            vocab_size (Optional[int]): the backbone's vocabulary, to check the ids against.

        Raises:
            ValueError: ids that are not sorted and distinct, out of ``0..vocab_size-1``, or heads with their own
                projection whose size is not N.
        """
        if token_map is None:
            self.register_buffer("token_map", None)
            return
        token_map = torch.as_tensor(token_map, dtype=torch.long).flatten()
        if token_map.numel() == 0 or (token_map.numel() > 1 and not bool((token_map[1:] > token_map[:-1]).all())):
            raise ValueError("token_map must be a non-empty list of sorted, distinct token ids")
        if int(token_map[0]) < 0 or (vocab_size is not None and int(token_map[-1]) >= vocab_size):
            raise ValueError(
                f"token_map has ids outside the vocabulary 0..{vocab_size} (min {int(token_map[0])}, "
                f"max {int(token_map[-1])}): it was made for another tokenizer"
            )
        for i, head in enumerate(self):
            if head.projection is not None and head.projection.out_features != token_map.numel():
                raise ValueError(
                    f"head {i + 1} projects onto {head.projection.out_features} tokens but the token map has "
                    f"{token_map.numel()}: build the heads with vocab_size={token_map.numel()}"
                )
        device = next(self.parameters()).device if any(True for _ in self.parameters()) else token_map.device
        self.register_buffer("token_map", token_map.to(device))

    def _take_token_map(self, state_dict, prefix, *args) -> None:
        key = prefix + "token_map"
        if key in state_dict and (self.token_map is None or self.token_map.shape != state_dict[key].shape):
            self.set_token_map(state_dict[key])


def token_map_index(token_map: torch.Tensor) -> torch.Tensor:
    """``index_of`` for :func:`to_head_vocab`: ``index_of[t]`` is token t's position in ``token_map``, or -1."""
    index_of = torch.full((int(token_map.max()) + 1,), -1, dtype=torch.long, device=token_map.device)
    index_of[token_map] = torch.arange(token_map.numel(), device=token_map.device)
    return index_of


def to_head_vocab(tokens: torch.Tensor, index_of: torch.Tensor) -> torch.Tensor:
    """Token ids as indices of the heads' token map (see :func:`token_map_index`): -1 for a token outside the map
    and for negative ids (an ``ignore_index``)."""
    inside = (tokens >= 0) & (tokens < index_of.numel())
    return torch.where(inside, index_of[tokens.clamp(0, index_of.numel() - 1)], -1)


def following_tokens(seq: torch.Tensor, start: int, end: int, k: int, offset: int = 1) -> torch.Tensor:
    """``[..., end - start, k]``: for every position t in ``start..end-1``, ``seq[..., t + offset + j]`` for
    ``j < k``. With the input tokens and ``offset=1``: the k tokens after t, what Hydra head k at t reads (labels
    are already shifted by one: ``offset=0``). ``seq`` must reach ``end + offset + k - 1``."""
    return torch.stack([seq[..., start + offset + j : end + offset + j] for j in range(k)], dim=-1)


MEDUSA_HEAD_TYPES = ("medusa", "hydra")


def medusa_heads(
    *,
    num_heads: int,
    dim: int,
    vocab_size: int,
    num_layers: int = 1,
    own_projection: bool = True,
    head_type: str = "medusa",
) -> MedusaHeadList:
    """Build ``num_heads`` Medusa heads in an ``nn.ModuleList`` (the ``medusa_heads`` container).

    Args:
        num_heads (int): number of heads K, ``>= 1``. Head k (1-based) predicts the token k+1 steps after the
            backbone's next-token prediction.
        dim (int): hidden size of the backbone.
        vocab_size (int): vocabulary size of the backbone.
        num_layers (int): residual blocks per head, ``>= 0``. Default 1.
        own_projection (bool): whether each head has its own vocabulary projection. Default True.
        head_type (str): ``"medusa"`` (heads read the hidden state) or ``"hydra"`` (head k also reads the k tokens
            before its target, see :class:`MedusaHead`). Default ``"medusa"``.

    Returns:
        MedusaHeadList: the heads.

    Raises:
        ValueError: if ``num_heads < 1``, ``num_layers < 0``, an unknown ``head_type`` or Hydra heads without a
            block.
    """
    if num_heads < 1:
        raise ValueError(
            f"num_heads (Medusa heads) must be >= 1, got {num_heads}; use the plain torchtune model for no heads"
        )
    if head_type not in MEDUSA_HEAD_TYPES:
        raise ValueError(f"head_type must be one of {MEDUSA_HEAD_TYPES}, got {head_type!r}")
    return MedusaHeadList(
        MedusaHead(
            dim=dim,
            vocab_size=vocab_size,
            num_layers=num_layers,
            own_projection=own_projection,
            num_prev_tokens=k if head_type == "hydra" else 0,
        )
        for k in range(1, num_heads + 1)
    )
