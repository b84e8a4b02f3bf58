# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The token map of truncated-vocabulary heads (the recipe's ``truncated_vocab_size``).

Heads that score only the N most frequent target tokens of the training data cost N / V of a full-vocabulary
projection to train and to run, and on chat data a few thousand tokens cover nearly every target. See
:class:`~torchtune_medusa.modules.MedusaHeadList`.
"""

import logging
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from torchtune_medusa.generation._step import most_frequent, token_counts

log = logging.getLogger(__name__)

#: Where a model state dict holds the token map (a buffer of the ``medusa_heads`` container).
TOKEN_MAP_STATE_KEY = "medusa_heads.token_map"


def target_tokens(dataset: Any, ignore_index: int, progress: bool = False):
    """The trained target tokens (labels that are not ``ignore_index``) of every sample of ``dataset``."""
    for sample in tqdm(dataset, desc="counting target tokens", disable=not progress):
        labels = torch.as_tensor(sample["labels"])
        yield labels[labels != ignore_index].tolist()


def head_token_map(
    size: Optional[int],
    *,
    saved: Optional[torch.Tensor],
    dataset: Any,
    vocab_size: int,
    ignore_index: int,
    progress: bool = False,
) -> Optional[torch.Tensor]:
    """The heads' token map: the one the loaded heads were trained with, else the ``size`` most frequent target
    tokens of ``dataset``; None for full-vocabulary heads (``size`` None and nothing saved).

    Args:
        size (Optional[int]): N, the configured ``truncated_vocab_size``; None keeps what was saved.
        saved (Optional[torch.Tensor]): the token map stored with the loaded heads, if any.
        dataset (Any): training samples with ``labels``.
        vocab_size (int): the backbone's vocabulary.
        ignore_index (int): label of untrained positions.
        progress (bool): show a progress bar while counting.

    Returns:
        Optional[torch.Tensor]: ``[N]`` sorted token ids, or None.

    Raises:
        ValueError: a size outside ``1..vocab_size``, or one that differs from the loaded heads' map.
    """
    if size is not None and (not isinstance(size, int) or not 1 <= size <= vocab_size):
        raise ValueError(
            f"truncated_vocab_size must be an int in 1..{vocab_size} (the vocabulary), or null for heads over the "
            f"whole vocabulary; got {size!r}"
        )
    if saved is not None:
        if size is not None and size != saved.numel():
            raise ValueError(
                f"the loaded Medusa heads score {saved.numel()} tokens (their token map) but truncated_vocab_size="
                f"{size}: set truncated_vocab_size={saved.numel()} (or null) to continue them, or start new heads"
            )
        log.info(f"Medusa heads score the {saved.numel()} tokens of their saved token map")
        return saved.long()
    if size is None:
        return None
    counts = token_counts(target_tokens(dataset, ignore_index, progress), vocab_size)
    token_map = most_frequent(counts, size)
    coverage = counts[token_map].sum().item() / max(counts.sum().item(), 1)
    log.info(
        f"Medusa heads score the {size} most frequent target tokens of the training data ({coverage:.1%} of its "
        "targets)"
    )
    return token_map


def set_head_token_map(
    model: nn.Module,
    size: Optional[int],
    *,
    saved: Optional[torch.Tensor],
    dataset: Any,
    ignore_index: int,
    progress: bool = False,
) -> None:
    """The recipe's ``truncated_vocab_size``: give ``model``'s heads the token map of :func:`head_token_map`.

    Raises:
        ValueError: a size for heads with their own projections (they would need rebuilding), or a bad size.
    """
    if size is not None and any(head.projection is not None for head in model.medusa_heads):
        raise ValueError(
            f"truncated_vocab_size={size} needs heads that share the base output layer: set "
            "model.medusa_projection=shared (and checkpointer.medusa_projection), or truncated_vocab_size=null"
        )
    token_map = head_token_map(
        size,
        saved=saved,
        dataset=dataset,
        vocab_size=int(model.tok_embeddings.num_embeddings),
        ignore_index=ignore_index,
        progress=progress,
    )
    if token_map is not None:
        model.set_medusa_token_map(token_map)
