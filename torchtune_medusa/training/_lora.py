# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""LoRA/DoRA adapters of a Medusa-2 model: their rank and alpha, their initial values (the same for any number of
processes) and the checkpoint with the adapters merged into the base weights."""

import math
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torchtune import training
from torchtune.modules.peft import DoRALinear, get_adapter_state_dict, get_merged_lora_ckpt, LoRALinear

__all__ = ["init_adapter_weights", "initialize_dora_magnitudes", "lora_rank_and_alpha", "merged_checkpoint"]


def lora_rank_and_alpha(model: nn.Module) -> Tuple[Optional[int], Optional[float]]:
    """The rank and alpha of the model's first LoRA/DoRA layer, or ``(None, None)`` without adapters."""
    for m in model.modules():
        if isinstance(m, (LoRALinear, DoRALinear)):
            return m.rank, m.alpha
    return None, None


def init_adapter_weights(
    model: nn.Module, state_dict: Dict[str, Any], adapter_names: Set[str], *, seed: int, dtype: torch.dtype
) -> None:
    """Add the initial values of the adapter parameters missing from ``state_dict`` (in place).

    LoRA params are not in the base checkpoint. Initialise them as torchtune's LoRALinear does (A: kaiming-uniform,
    B: zeros) but as full tensors from a generator seeded with the config seed, so that the initial adapters are
    the same for any number of processes (torchtune's LoRA recipe initialises each rank's shard from that rank's
    RNG instead). DoRA magnitudes get 1 here and their real value from :func:`initialize_dora_magnitudes` once the
    base weights are loaded.

    Args:
        model (nn.Module): the (possibly sharded, meta-device) model.
        state_dict (Dict[str, Any]): the full model state dict to complete.
        adapter_names (Set[str]): names of the adapter parameters.
        seed (int): the config seed.
        dtype (torch.dtype): the training dtype.
    """
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in model.named_parameters():
        if name not in adapter_names or name in state_dict:
            continue
        full = torch.zeros(p.shape, dtype=torch.float32)
        if "lora_a" in name:
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        elif "magnitude" in name:
            full.fill_(1.0)  # replaced by initialize_dora_magnitude below
        state_dict[name] = full.to(dtype)


def initialize_dora_magnitudes(model: nn.Module) -> None:
    """Set every DoRA magnitude from its loaded base weight (no-op for LoRA)."""
    for m in model.modules():
        if hasattr(m, "initialize_dora_magnitude"):
            m.initialize_dora_magnitude()


def merged_checkpoint(
    state_dict: Dict[str, torch.Tensor],
    adapter_names: Sequence[str],
    *,
    rank: Optional[int],
    alpha: Optional[float],
) -> Dict[str, Any]:
    """torchtune's checkpoint dict of a full state dict: the model weights with the adapters merged (``MODEL_KEY``)
    and, with adapters, the adapter weights and their PEFT config (``ADAPTER_KEY``, ``ADAPTER_CONFIG``).

    Args:
        state_dict (Dict[str, torch.Tensor]): the full (gathered) model state dict; not modified.
        adapter_names (Sequence[str]): names of the adapter parameters (empty: no adapters).
        rank (Optional[int]): the LoRA rank.
        alpha (Optional[float]): the LoRA alpha.

    Returns:
        Dict[str, Any]: the checkpoint dict for ``save_checkpoint``.
    """
    ckpt: Dict[str, Any] = {}
    # gather_cpu_state_dict returns the live tensors for unsharded CPU models, and the LoRA merge works in
    # place: copy first so that the model being trained is never touched
    sd = {k: v.clone() for k, v in state_dict.items()}
    if adapter_names:
        adapter_sd = get_adapter_state_dict(sd)
        sd = get_merged_lora_ckpt(sd, rank=rank, alpha=alpha)
        ckpt[training.ADAPTER_KEY] = adapter_sd
        ckpt[training.ADAPTER_CONFIG] = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted({n.split(".")[-3] for n in adapter_names if "lora_a" in n}),
            "peft_type": "LORA",
        }
    ckpt[training.MODEL_KEY] = sd
    return ckpt
