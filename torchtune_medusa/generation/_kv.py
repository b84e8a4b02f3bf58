# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""KV-cache helpers over torchtune's :class:`~torchtune.modules.KVCache`: scoped set-up, and eviction of the
rejected branches of a tree step.

torchtune's cache writes each forward at ``cache_pos[:s]`` and advances ``cache_pos`` (one position vector for
the whole batch, one per layer). A tree step writes all ``T`` tree tokens at slots ``L .. L+T-1``; after
verification :func:`evict_to_path` gathers the accepted nodes' K/V rows to the contiguous slots ``L .. L+n-1`` in
every layer and rolls ``cache_pos`` back by ``T - n`` in place, so the cache is exactly what plain decoding of the
accepted tokens would have produced (slot == position). Rows beyond the new length are stale but harmless: every
later mask row keeps slots ``>=`` the current length masked out until they are rewritten.
"""

import contextlib
from typing import Iterator, List, Sequence, Union

import torch
from torch import nn
from torchtune.modules import KVCache


def kv_caches(model: nn.Module) -> List[KVCache]:
    """Every :class:`~torchtune.modules.KVCache` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, KVCache)]


@contextlib.contextmanager
def scoped_kv_cache(model: nn.Module, *, batch_size: int, cache_len: int, dtype: torch.dtype) -> Iterator[None]:
    """Give ``model`` fresh KV caches of ``cache_len`` slots for the duration of the block, then delete them.

    Caches the model already had (a caller's own ``setup_caches``) are set aside and put back unchanged
    afterwards, so the decoders never overwrite or resize someone else's cache. Caches are allocated on the
    device of the model's parameters.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (or subclass).
        batch_size (int): cache batch size.
        cache_len (int): slots per cache (``decoder_max_seq_len``).
        dtype (torch.dtype): cache dtype.
    """
    attns = [m for m in model.modules() if hasattr(m, "kv_cache") and hasattr(m, "cache_enabled")]
    saved = [(a, a.kv_cache, a.cache_enabled) for a in attns]
    saved_len = getattr(model, "decoder_max_cache_seq_len", None)
    for a in attns:
        a.kv_cache = None
        a.cache_enabled = False
    device = next(model.parameters()).device
    try:
        with torch.device(device):
            model.setup_caches(batch_size, dtype, decoder_max_seq_len=cache_len)
        yield
    finally:
        for a, cache, enabled in saved:
            a.kv_cache = cache
            a.cache_enabled = enabled
        model.decoder_max_cache_seq_len = saved_len


def evict_to_path(
    caches: Sequence[KVCache], *, length: int, tree_size: int, accepted: Union[torch.Tensor, Sequence[int]]
) -> None:
    """Keep only an accepted root-to-node path of the tree just written at slots ``length .. length+tree_size-1``.

    The accepted nodes' K/V rows move to the contiguous slots ``length .. length+n-1`` (an advanced-indexing
    gather, which copies, so overlapping source and destination are safe) in every cache, and every
    ``cache_pos`` is rolled back in place by ``tree_size - n``. A path given as host ints that already sits in
    those slots (nodes ``0 .. n-1``: the root alone, or the root and node 1) moves nothing.

    Args:
        caches (Sequence[KVCache]): every layer's cache (see :func:`kv_caches`).
        length (int): committed tokens before the tree step (the tree's first slot).
        tree_size (int): tokens the tree step wrote.
        accepted (Union[torch.Tensor, Sequence[int]]): ``[n]`` tree-node indices of the accepted path, root first:
            a long tensor on the cache's device, or host ints. Node i was written at slot ``length + i``.
    """
    n = len(accepted)
    if not isinstance(accepted, torch.Tensor):
        if list(accepted) == list(range(n)):
            accepted = None
        else:
            accepted = torch.tensor(accepted, device=caches[0].k_cache.device)
    src = None if accepted is None else accepted + length
    for cache in caches:
        if src is not None:
            cache.k_cache[:, :, length : length + n] = cache.k_cache[:, :, src]
            cache.v_cache[:, :, length : length + n] = cache.v_cache[:, :, src]
        cache.cache_pos.sub_(tree_size - n)


def drop_finished_rows(caches: Sequence[KVCache], keep: torch.Tensor) -> None:
    """Shrink every cache's batch to the rows ``keep`` (``[b']`` long indices, in the order they stay in)."""
    for cache in caches:
        cache.k_cache = cache.k_cache[keep]
        cache.v_cache = cache.v_cache[keep]
        cache.batch_size = keep.numel()
