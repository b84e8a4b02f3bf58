# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Data of ``medusa_finetune``: data sets built from their config sections, collate functions whose batches carry
the sample indices (:func:`~torchtune_medusa.training._hidden_cache.indexed_collate`), and the held-out batches
of validation."""

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import ListConfig
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config
from torchtune.config._utils import _get_component_from_path
from torchtune.data import padded_collate_packed
from torchtune.datasets import ConcatDataset

from torchtune_medusa.training._hidden_cache import indexed_collate, IndexedDataset

__all__ = ["build_dataset", "make_collate", "training_dataloader", "validation_batches"]


def build_dataset(cfg_dataset: Any, tokenizer: Any) -> Tuple[Dataset, bool]:
    """The data set of a ``dataset`` config section (a list of sections: their concatenation).

    Args:
        cfg_dataset (Any): a ``DictConfig`` or a ``ListConfig`` of them.
        tokenizer (Any): the model tokenizer.

    Returns:
        Tuple[Dataset, bool]: the data set and whether it is packed.
    """
    if isinstance(cfg_dataset, ListConfig):
        ds = ConcatDataset(datasets=[config.instantiate(c, tokenizer) for c in cfg_dataset])
        return ds, getattr(ds, "packed", False)
    return config.instantiate(cfg_dataset, tokenizer), cfg_dataset.get("packed", False)


def make_collate(collate_fn: Optional[str], packed: bool, *, padding_idx: int, ignore_idx: int) -> Callable:
    """The collate function of the training and validation batches (with ``_index`` and ``_length``).

    Args:
        collate_fn (Optional[str]): the config's ``collate_fn`` (None: ``torchtune.data.padded_collate_sft``).
        packed (bool): whether the data set is packed (then ``padded_collate_packed``).
        padding_idx (int): the tokenizer's pad id.
        ignore_idx (int): the loss's ignore index.

    Returns:
        Callable: the collate function.
    """
    if packed:
        base = padded_collate_packed
    else:
        fn = _get_component_from_path(collate_fn or "torchtune.data.padded_collate_sft")
        base = partial(fn, padding_idx=padding_idx, ignore_idx=ignore_idx)
    return indexed_collate(base)


def training_dataloader(
    ds: Dataset, collate: Callable, *, batch_size: int, shuffle: bool, seed: int, world_size: int, rank: int
) -> StatefulDataLoader:
    """The resumable training data loader: this rank's share of ``ds`` in a seeded order that is reshuffled every
    epoch (``sampler.set_epoch``), incomplete last batches dropped.

    Args:
        ds (Dataset): the (indexed) training data set.
        collate (Callable): from :func:`make_collate`.
        batch_size (int): per-rank batch size.
        shuffle (bool): shuffle the samples.
        seed (int): the shuffling seed.
        world_size (int): number of data-parallel processes.
        rank (int): this process's data-parallel rank.

    Returns:
        StatefulDataLoader: the data loader (its ``state_dict`` resumes mid-epoch).
    """
    sampler = StatefulDistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return StatefulDataLoader(dataset=ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True)


def validation_batches(
    ds: Dataset, collate: Callable, *, max_samples: int, batch_size: int, world_size: int, rank: int
) -> List[Dict[str, torch.Tensor]]:
    """This rank's share of the first ``max_samples`` held-out samples, collated into batches once.

    Args:
        ds (Dataset): the held-out data set.
        collate (Callable): from :func:`make_collate`.
        max_samples (int): ``validation.max_samples``.
        batch_size (int): ``validation.batch_size``.
        world_size (int): number of processes.
        rank (int): this process's rank.

    Returns:
        List[Dict[str, torch.Tensor]]: the batches.
    """
    n = min(len(ds), max_samples)
    sub = torch.utils.data.Subset(IndexedDataset(ds), list(range(n)))
    sampler = DistributedSampler(sub, num_replicas=world_size, rank=rank, shuffle=False)
    return list(torch.utils.data.DataLoader(sub, batch_size=batch_size, sampler=sampler, collate_fn=collate))
