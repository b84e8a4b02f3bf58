# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The Medusa-1 hidden-state cache: with a frozen backbone the normed hidden state of a sample never changes, so
it is computed once, before training, and reused by every epoch. Samples carry their index through the data
loader (:class:`IndexedDataset`, :func:`indexed_collate`), which keys the cache."""

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torchtune import utils
from tqdm import tqdm

__all__ = [
    "HiddenStateCache",
    "IndexedDataset",
    "fill_hidden_state_cache",
    "indexed_collate",
    "load_saved_hidden_states",
    "saved_hidden_states",
]

log = utils.get_logger("INFO")

# ----------------------------------------------------------------------------------------------------------
# Data: sample indices travel with the batch (the hidden-state cache is keyed by them).


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that every sample also carries its index (key ``"_index"``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["_index"] = index
        return sample

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def indexed_collate(collate_fn: Callable[[List[Dict[str, Any]]], Dict[str, Any]]) -> Callable:
    """Wrap a torchtune collate function: drop ``_index`` before collating and add ``batch["_index"]`` (``[b]``
    int64) and ``batch["_length"]`` (``[b]``, unpadded sample lengths) after it."""

    def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        indices = [s["_index"] for s in samples]
        lengths = [len(s["tokens"]) for s in samples]
        batch = collate_fn([{k: v for k, v in s.items() if k != "_index"} for s in samples])
        batch["_index"] = torch.tensor(indices, dtype=torch.long)
        batch["_length"] = torch.tensor(lengths, dtype=torch.long)
        return batch

    return collate


# ----------------------------------------------------------------------------------------------------------
# Medusa-1 hidden-state cache.


class HiddenStateCache:
    """Normed final hidden states of a frozen backbone, one ``[len_i, d]`` tensor per dataset sample, kept in
    memory (in the model dtype, on CPU or the training device), bounded by ``max_bytes``.

    The cache is filled once, before training, by :meth:`fill` (all ranks in lock step; under FSDP every rank
    computes its share and the shares are all-gathered, so that every rank holds every sample, because the
    sampler reshuffles samples across ranks each epoch). Training batches then read their hidden states with
    :meth:`batch`, bit-identical to what the backbone computed in the fill pass.
    """

    def __init__(self, *, max_bytes: int, store_device: torch.device) -> None:
        self.max_bytes = int(max_bytes)
        self.store_device = store_device
        self._data: Dict[int, torch.Tensor] = {}
        self._greedy: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._data.values())

    @staticmethod
    def estimate_bytes(dataset: Dataset, dim: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(len(dataset[i]["tokens"]) for i in range(len(dataset))) * dim * itemsize

    def fill(
        self,
        dataset: Dataset,
        *,
        collate_fn: Callable,
        batch_size: int,
        compute_hidden: Callable[[Dict[str, Any]], torch.Tensor],
        device: torch.device,
        rank: int,
        world_size: int,
        progress: Optional[Callable[[int], None]] = None,
        greedy_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        """Compute and store the hidden state of every sample of ``dataset`` that the cache does not hold yet.

        Args:
            dataset (Dataset): an :class:`IndexedDataset`.
            collate_fn (Callable): the training collate (wrapped by :func:`indexed_collate`).
            batch_size (int): samples per forward.
            compute_hidden (Callable): ``batch -> [b, s, d]`` normed hidden state (no grad).
            device (torch.device): training device.
            rank (int): this rank.
            world_size (int): number of ranks.
            progress (Optional[Callable[[int], None]]): called with the number of samples done.
            greedy_fn (Optional[Callable]): ``hidden -> [b, s]`` base greedy tokens, stored too (see
                :meth:`greedy_batch`).
        """
        n = len(dataset)
        mine = [i for i in range(n) if i not in self._data][rank::world_size]  # every rank holds the same samples
        steps = (len(mine) + batch_size - 1) // batch_size
        if world_size > 1:  # all ranks must run the same number of (collective) forwards
            t = torch.tensor([steps], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            steps = int(t.item())
        for step in range(steps):
            chunk = mine[step * batch_size : (step + 1) * batch_size] or mine[:1] or [0]
            batch = collate_fn([dataset[i] for i in chunk])
            indices, lengths = batch.pop("_index"), batch.pop("_length")
            batch.pop("labels", None)
            hidden = compute_hidden({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            greedy = greedy_fn(hidden) if greedy_fn is not None else None
            if world_size > 1:
                if greedy is not None:  # carried through the float gather exactly (token ids < 2**24)
                    hidden = torch.cat([hidden, greedy.unsqueeze(-1).to(hidden.dtype)], dim=-1)
                hidden, indices, lengths = _all_gather_padded(hidden, indices.to(device), lengths.to(device))
                if greedy is not None:
                    hidden, greedy = hidden[..., :-1], hidden[..., -1].long()
            for r, (h, i, length) in enumerate(zip(hidden, indices.tolist(), lengths.tolist())):
                if i not in self._data:
                    self._data[i] = h[:length].to(self.store_device).clone()
                    if greedy is not None:
                        self._greedy[i] = greedy[r, :length].to(torch.int32).cpu().clone()
            if progress is not None:
                progress(min(len(self._data), n))

    def batch(self, indices: torch.Tensor, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
        """``[b, seq_len, d]`` hidden states of the samples ``indices`` (zeros past each sample's length, where
        every label is ignored), or None when a sample is missing."""
        rows = []
        for i in indices.tolist():
            t = self._data.get(i)
            if t is None or t.size(0) > seq_len:
                return None
            rows.append(t)
        out = rows[0].new_zeros(len(rows), seq_len, rows[0].size(-1), device=device)
        for r, t in enumerate(rows):
            out[r, : t.size(0)] = t.to(device)
        return out

    def greedy_batch(self, indices: torch.Tensor, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
        """``[b, seq_len]`` cached base greedy tokens (0 past each sample's length), or None when missing."""
        rows = [self._greedy.get(i) for i in indices.tolist()]
        if any(t is None or t.size(0) > seq_len for t in rows):
            return None
        out = torch.zeros(len(rows), seq_len, dtype=torch.long, device=device)
        for r, t in enumerate(rows):
            out[r, : t.size(0)] = t.to(device=device, dtype=torch.long)
        return out


def fill_hidden_state_cache(
    dataset: Dataset,
    *,
    dim: Optional[int],
    dtype: torch.dtype,
    max_gb: float,
    store_device: torch.device,
    compute_hidden: Callable[[Dict[str, Any]], torch.Tensor],
    greedy_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
    collate_fn: Callable,
    batch_size: int,
    device: torch.device,
    cache: Optional[HiddenStateCache] = None,
) -> Optional[HiddenStateCache]:
    """Compute and cache the hidden states of the whole (indexed) data set, all ranks in lock step, with a
    progress bar on rank 0; or, when the data set would need more than ``max_gb``, say so and cache nothing.
    With ``cache`` (e.g. saved states of some of the samples, :func:`load_saved_hidden_states`), only the samples
    it does not hold are computed, into it.

    Args:
        dataset (Dataset): an :class:`IndexedDataset`.
        dim (Optional[int]): the model's hidden size (None: unknown, the size is not estimated beforehand).
        dtype (torch.dtype): the hidden states' dtype.
        max_gb (float): the cache's bound in GiB (``hidden_cache_max_gb``).
        store_device (torch.device): where the cache is kept.
        compute_hidden (Callable[[Dict[str, Any]], torch.Tensor]): a batch's ``[b, s, d]`` hidden states.
        greedy_fn (Optional[Callable[[torch.Tensor], torch.Tensor]]): the base model's greedy tokens after every
            position, cached too (``head_targets: base_greedy``), or None.
        collate_fn (Callable): the training collate function (:func:`indexed_collate`).
        batch_size (int): batch size of the fill pass.
        device (torch.device): the training device.
        cache (Optional[HiddenStateCache]): a cache holding some samples already; None: a new one.

    Returns:
        Optional[HiddenStateCache]: the filled cache, or None when it would not fit.
    """
    max_bytes = max_gb * 2**30
    if dim is not None:
        need = HiddenStateCache.estimate_bytes(dataset, dim, dtype)
        if need > max_bytes and cache is not None:
            raise ValueError(
                f"cache_hidden_states: with the saved hidden states, the data set needs {need / 2**30:.2f} GiB > "
                f"hidden_cache_max_gb={max_bytes / 2**30:.2f}, and saved states are only read from the cache: raise "
                "hidden_cache_max_gb or train on fewer samples"
            )
        if need > max_bytes:
            utils.log_rank_zero(
                log,
                f"cache_hidden_states: the data set needs {need / 2**30:.2f} GiB > hidden_cache_max_gb="
                f"{max_bytes / 2**30:.2f}; hidden states are computed every step instead",
            )
            return None
    world_size, rank = utils.get_world_size_and_rank()
    if cache is None:
        cache = HiddenStateCache(max_bytes=int(max_bytes), store_device=store_device)
    cache.max_bytes = int(max_bytes)
    t0 = time.perf_counter()
    pbar = tqdm(total=len(dataset), initial=len(cache), desc="caching hidden states", disable=rank != 0)
    cache.fill(
        dataset,
        greedy_fn=greedy_fn,
        collate_fn=collate_fn,
        batch_size=batch_size,
        compute_hidden=compute_hidden,
        device=device,
        rank=rank,
        world_size=world_size,
        progress=lambda n: pbar.update(n - pbar.n),
    )
    pbar.close()
    utils.log_rank_zero(
        log,
        f"Cached the hidden states of {len(cache)} samples ({cache.nbytes / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f}s",
    )
    return cache


def _carries_saved_states(dataset: Dataset) -> bool:
    return callable(getattr(dataset, "hidden_state", None))


def saved_hidden_states(dataset: Dataset) -> List[Tuple[int, Dataset]]:
    """The parts of ``dataset`` (an :class:`IndexedDataset`) that carry saved hidden states
    (:class:`~torchtune_medusa.data.SelfDistilledHiddenStates`), each with the index of its first sample: the data
    set itself, or its members that do when it is a data set list (torchtune's ``ConcatDataset``). Empty when none
    does."""
    inner = getattr(dataset, "dataset", dataset)
    parts = getattr(inner, "_datasets", None)  # torchtune's ConcatDataset (a `dataset` list in the config)
    if parts is None:
        return [(0, inner)] if _carries_saved_states(inner) else []
    found, start = [], 0
    for part in parts:
        if _carries_saved_states(part):
            found.append((start, part))
        start += len(part)
    return found


def load_saved_hidden_states(
    saved: List[Tuple[int, Dataset]], *, model: torch.nn.Module, dtype: torch.dtype, store_device: torch.device
) -> HiddenStateCache:
    """A cache holding the hidden states that self-distillation saved with the replies (no backbone pass), and,
    for greedy replies, their tokens as the base model's greedy targets (``head_targets: base_greedy``). The other
    samples of a data set list are not in it: :func:`fill_hidden_state_cache` computes them.

    Args:
        saved (List[Tuple[int, Dataset]]): the :class:`~torchtune_medusa.data.SelfDistilledHiddenStates` parts of
            the training data, each with the training index of its first sample (:func:`saved_hidden_states`).
        model (torch.nn.Module): the model being trained: its backbone must be the one that decoded the replies.
        dtype (torch.dtype): the cache dtype (the training dtype).
        store_device (torch.device): where the cache is kept.

    Returns:
        HiddenStateCache: the saved samples' states, keyed by training index.

    Raises:
        ValueError: states of another backbone (weights fingerprint) or hidden size.
    """
    from torchtune_medusa.data import weights_fingerprint

    fingerprint = weights_fingerprint(model)
    dim = getattr(getattr(model, "norm", None), "scale", None)
    for _, part in saved:
        if part.fingerprint != fingerprint:
            raise ValueError(
                f"the dataset's hidden states were computed by other weights (fingerprint {part.fingerprint}) than "
                f"this run's backbone ({fingerprint}): self-distil again with this checkpoint (self_distill "
                "--save-hidden --model-dir <checkpoint_dir>), or point checkpointer.checkpoint_dir at the model that "
                "wrote them"
            )
        if dim is not None and part.hidden_state(0).size(-1) != dim.shape[-1]:
            raise ValueError(
                f"the dataset's hidden states have size {part.hidden_state(0).size(-1)}, the model {dim.shape[-1]}"
            )
    t0 = time.perf_counter()
    cache = HiddenStateCache(max_bytes=0, store_device=store_device)
    total = sum(len(part) for _, part in saved)
    pbar = tqdm(total=total, desc="loading saved hidden states", disable=utils.get_world_size_and_rank()[1] != 0)
    for start, part in saved:
        for i in range(len(part)):
            cache._data[start + i] = part.hidden_state(i).to(device=store_device, dtype=dtype)
            if part.greedy_targets:  # greedy replies: token j is the base model's greedy pick after position j
                cache._greedy[start + i] = torch.tensor(part[i]["labels"][1:] + [0], dtype=torch.int32)
            pbar.update()
    pbar.close()
    cache.max_bytes = cache.nbytes
    utils.log_rank_zero(
        log,
        f"Loaded the saved hidden states of {len(cache)} samples ({cache.nbytes / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f}s",
    )
    return cache


def _all_gather_padded(
    hidden: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather ``[b, s, d]`` hidden states whose ``b`` and ``s`` differ across ranks."""
    world = dist.get_world_size()
    shape = torch.tensor([hidden.size(0), hidden.size(1)], device=hidden.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    b_max = max(int(s[0]) for s in shapes)
    s_max = max(int(s[1]) for s in shapes)
    padded = hidden.new_zeros(b_max, s_max, hidden.size(-1))
    padded[: hidden.size(0), : hidden.size(1)] = hidden
    idx = torch.full((b_max,), -1, dtype=torch.long, device=hidden.device)
    idx[: indices.numel()] = indices
    lens = torch.zeros(b_max, dtype=torch.long, device=hidden.device)
    lens[: lengths.numel()] = lengths
    outs = [torch.empty_like(padded) for _ in range(world)]
    idxs = [torch.empty_like(idx) for _ in range(world)]
    lenss = [torch.empty_like(lens) for _ in range(world)]
    dist.all_gather(outs, padded)
    dist.all_gather(idxs, idx)
    dist.all_gather(lenss, lens)
    hidden_all, idx_all, len_all = torch.cat(outs), torch.cat(idxs), torch.cat(lenss)
    keep = idx_all >= 0
    return hidden_all[keep], idx_all[keep], len_all[keep]
