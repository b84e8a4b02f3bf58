# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

from typing import Callable, List, NamedTuple, Optional, Union

import torch
from torch import nn
from torchtune.modules import TransformerDecoder

from torchtune_medusa.modules.medusa_heads import following_tokens


class MedusaOutput(NamedTuple):
    """What :class:`MedusaTransformerDecoder` returns in logits mode.

    Attributes:
        logits: the backbone's next-token logits, fp32, shape ``[b, s, v]`` (or torchtune's list of
            ``num_output_chunks`` chunks when :meth:`~torchtune.modules.TransformerDecoder.set_num_output_chunks`
            was called, as the base class does).
        medusa_logits: stacked head logits, fp32, shape ``[k, b, s, v]``. ``medusa_logits[k - 1, :, t]`` predicts
            the token at position ``t + k + 1``, i.e. k steps after ``logits[:, t]`` does. With a token map ``v``
            is its size N (see :attr:`MedusaTransformerDecoder.medusa_token_map`). Hydra heads read the input
            tokens ``t+1..t+k`` here (teacher forcing).
    """

    logits: Union[torch.Tensor, List[torch.Tensor]]
    medusa_logits: torch.Tensor


class MedusaTransformerDecoder(TransformerDecoder):
    """A torchtune :class:`~torchtune.modules.TransformerDecoder` whose normed final hidden state also feeds
    K Medusa heads.

    Everything the base decoder does is unchanged: the base state-dict keys (the heads live under
    ``medusa_heads.*``), KV caches, custom masks and ``input_pos``. Only the last step differs: instead of the
    logits alone it returns a :class:`MedusaOutput` with the base logits and the stacked head logits, or, after
    ``set_return_hidden(True)``, the normed hidden state ``[b, s, d]`` so that a memory-lean loss can project to
    the vocabulary chunk by chunk with :meth:`project`.

    Args:
        tok_embeddings (nn.Embedding): as in :class:`~torchtune.modules.TransformerDecoder`.
        layers (Union[nn.Module, List[nn.Module], nn.ModuleList]): as in the base class.
        max_seq_len (int): as in the base class.
        num_heads (int): attention heads, as in the base class.
        head_dim (int): as in the base class.
        norm (nn.Module): as in the base class.
        output (Union[nn.Linear, Callable]): the base output projection (``nn.Linear`` or ``TiedLinear``).
        medusa_heads (nn.ModuleList): the Medusa heads (:class:`~torchtune_medusa.modules.MedusaHead`), possibly
            empty. A head without its own projection is projected with ``output``.
        num_layers (Optional[int]): as in the base class.
        output_hidden_states (Optional[List[int]]): as in the base class.
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Embedding,
        layers: Union[nn.Module, List[nn.Module], nn.ModuleList],
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        norm: nn.Module,
        output: Union[nn.Linear, Callable],
        medusa_heads: nn.ModuleList,
        num_layers: Optional[int] = None,
        output_hidden_states: Optional[List[int]] = None,
    ) -> None:
        super().__init__(
            tok_embeddings=tok_embeddings,
            layers=layers,
            max_seq_len=max_seq_len,
            num_heads=num_heads,
            head_dim=head_dim,
            norm=norm,
            output=output,
            num_layers=num_layers,
            output_hidden_states=output_hidden_states,
        )
        self.medusa_heads = medusa_heads
        self.return_hidden = False
        self._input_tokens: Optional[torch.Tensor] = None

    @classmethod
    def from_decoder(cls, decoder: TransformerDecoder, medusa_heads: nn.ModuleList) -> "MedusaTransformerDecoder":
        """Wrap the sub-modules of a built torchtune decoder (no copies) and add ``medusa_heads``."""
        return cls(
            tok_embeddings=decoder.tok_embeddings,
            layers=decoder.layers,
            max_seq_len=decoder.max_seq_len,
            num_heads=decoder.num_heads,
            head_dim=decoder.head_dim,
            norm=decoder.norm,
            output=decoder.output,
            medusa_heads=medusa_heads,
            output_hidden_states=decoder.output_hidden_states,
        )

    @property
    def num_medusa_heads(self) -> int:
        return len(self.medusa_heads)

    @property
    def medusa_token_map(self) -> Optional[torch.Tensor]:
        """``[N]`` token ids the heads score (see :class:`~torchtune_medusa.modules.MedusaHeadList`), or None when
        they score the whole vocabulary. Head logits index ``i`` stands for token ``medusa_token_map[i]``."""
        return getattr(self.medusa_heads, "token_map", None)

    def set_medusa_token_map(self, token_map: Optional[torch.Tensor]) -> None:
        """Restrict the heads to the tokens of ``token_map`` (sorted, distinct ids; e.g.
        :func:`~torchtune_medusa.generation.frequent_tokens` of the training data), or lift it with None."""
        if not hasattr(self.medusa_heads, "set_token_map"):
            raise TypeError("these heads are a plain nn.ModuleList: build them with medusa_heads() for a token map")
        self.medusa_heads.set_token_map(token_map, vocab_size=int(self._output_weight().shape[0]))

    def _output_weight(self) -> torch.Tensor:
        return self.output.weight if isinstance(self.output, nn.Linear) else self.output.tied_module.weight

    def _shared_head_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's output layer for heads without their own projection: restricted to the token map's rows
        when there is one."""
        token_map = self.medusa_token_map
        if token_map is None:
            return self.output(hidden)
        if getattr(self.output, "bias", None) is not None:
            raise ValueError("truncated-vocabulary heads need a bias-free output layer")
        return nn.functional.linear(hidden, self._output_weight()[token_map])

    def set_return_hidden(self, return_hidden: bool = True) -> None:
        """Make ``forward`` return the normed final hidden state ``[b, s, d]`` instead of logits.

        Used by the chunked Medusa losses, which call :meth:`project` chunk by chunk so that the
        ``(K + 1) x b x s x v`` logits never exist at once.
        """
        self.return_hidden = return_hidden

    @property
    def medusa_head_type(self) -> str:
        """``"hydra"`` when the heads read the tokens before their targets (see
        :class:`~torchtune_medusa.modules.MedusaHead`), else ``"medusa"``."""
        return getattr(self.medusa_heads, "head_type", "medusa")

    def prev_token_embeddings(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """``[..., k, d]`` input embeddings of ``prev_tokens [..., k]``, what Hydra heads read."""
        return self.tok_embeddings(prev_tokens)

    def project(self, hidden: torch.Tensor, head: int, prev_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Project a normed hidden state to vocabulary logits, in the model's dtype (no fp32 upcast).

        Args:
            hidden (torch.Tensor): normed final hidden state, shape ``[..., d]``.
            head (int): 0 for the backbone's own output layer, ``k`` in ``1..K`` for Medusa head k.
            prev_tokens (Optional[torch.Tensor]): ``[..., j]`` (``j >= k``) token ids after each position of
                ``hidden``: ``prev_tokens[..., 0]`` is the base model's next token, ``prev_tokens[..., i]`` the token
                ``i`` steps later. Hydra head k reads the first k; Medusa heads ignore them.

        Returns:
            torch.Tensor: logits with shape ``[..., v]``; for a Medusa head with a token map (see
            :attr:`medusa_token_map`), ``[..., N]`` over the map's tokens.

        Raises:
            IndexError: if ``head`` is not in ``0..K``.
            ValueError: a Hydra head without enough ``prev_tokens``.
        """
        if head == 0:
            return self.output(hidden)
        if not 1 <= head <= len(self.medusa_heads):
            raise IndexError(f"head must be in 0..{len(self.medusa_heads)} (0 = base output), got {head}")
        medusa_head = self.medusa_heads[head - 1]
        prev = self._prev_embeddings(medusa_head, prev_tokens)
        out = medusa_head(hidden, prev)
        return out if medusa_head.projection is not None else self._shared_head_output(out)

    def _prev_embeddings(self, head: nn.Module, prev_tokens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        k = getattr(head, "num_prev_tokens", 0)
        if not k:
            return None
        if prev_tokens is None or prev_tokens.size(-1) < k:
            got = None if prev_tokens is None else tuple(prev_tokens.shape)
            raise ValueError(
                f"Hydra head {k} reads the {k} tokens before its target: pass prev_tokens [..., >= {k}] (the base "
                f"model's next token first), got {got}"
            )
        return self.prev_token_embeddings(prev_tokens[..., :k])

    def medusa_logits(
        self, hidden: torch.Tensor, num_heads: Optional[int] = None, prev_tokens: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits of the first ``num_heads`` Medusa heads from a normed hidden state.

        Heads that share the backbone's output layer are projected together in one matmul, so the ``[v, d]``
        output weight is read once for all of them (on a memory-bound CPU or a batch-1 GPU step that read is
        what a projection costs).

        Args:
            hidden (torch.Tensor): normed final hidden state, shape ``[..., d]``.
            num_heads (Optional[int]): heads ``1..num_heads``; all K when None.
            prev_tokens (Optional[torch.Tensor]): ``[..., >= num_heads]`` tokens after each position, for Hydra
                heads (see :meth:`project`).

        Returns:
            torch.Tensor: fp32 logits with shape ``[num_heads, ..., v]`` (``v`` = N with a token map, see
            :attr:`medusa_token_map`); zero heads give an empty tensor.

        Raises:
            IndexError: if ``num_heads`` is not in ``0..K``.
        """
        n = len(self.medusa_heads) if num_heads is None else int(num_heads)
        if not 0 <= n <= len(self.medusa_heads):
            raise IndexError(f"num_heads must be in 0..{len(self.medusa_heads)}, got {num_heads}")
        if n == 0:
            return torch.empty(0, *hidden.shape[:-1], 0, device=hidden.device, dtype=torch.float32)
        heads = self.medusa_heads[:n]
        if all(head.projection is None for head in heads):
            states = [head(hidden, self._prev_embeddings(head, prev_tokens)) for head in heads]
            return self._shared_head_output(torch.stack(states)).float()
        return torch.stack([self.project(hidden, k, prev_tokens).float() for k in range(1, n + 1)])

    def unembed(self, h: torch.Tensor) -> Union[torch.Tensor, MedusaOutput]:
        # shape: [b, s, d]
        h = self.norm(h)
        if self.return_hidden:
            return h
        base = super().chunked_output(h) if self.num_output_chunks > 0 else self.output(h).float()
        prev_tokens = None
        if self._input_tokens is not None:
            prev_tokens = _next_tokens(self._input_tokens, len(self.medusa_heads))
        return MedusaOutput(logits=base, medusa_logits=self.medusa_logits(h, prev_tokens=prev_tokens))

    def forward(self, tokens: Optional[torch.Tensor], **kwargs):
        """As :meth:`torchtune.modules.TransformerDecoder.forward`. In logits mode Hydra heads read the input
        tokens after each position (teacher forcing), so the tokens are kept for :meth:`unembed`."""
        if self.return_hidden or self.medusa_head_type != "hydra":
            return super().forward(tokens, **kwargs)
        self._input_tokens = tokens
        try:
            return super().forward(tokens, **kwargs)
        finally:
            self._input_tokens = None


def _next_tokens(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, s, k]``: at position t, the input tokens ``t+1..t+k`` (past the end, the last token repeated: heads
    there predict beyond the sequence anyway)."""
    padded = torch.cat([tokens, tokens[:, -1:].expand(-1, k)], dim=1)
    return following_tokens(padded, 0, tokens.size(1), k)
