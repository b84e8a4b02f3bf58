# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Full (unsharded) tensors of trainable parameters and optimizer states, for training states that any number of
processes can write and read: gathered on rank 0 to save, sharded like their parameters to load."""

from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn
from torch.distributed.tensor import distribute_tensor, DTensor

__all__ = ["gather_full_tensors", "load_full_tensors_inplace", "load_optimizer_state", "save_optimizer_state"]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_full_tensors(named: Iterable[Tuple[str, torch.Tensor]], is_rank_zero: bool) -> Dict[str, torch.Tensor]:
    """Unshard (collective on every rank, same order) and move to CPU; returns the dict on rank 0, {} elsewhere."""
    out = {}
    for name, t in named:
        full = _full(t.detach())
        if is_rank_zero:
            out[name] = full.cpu().clone()
    return out


def load_full_tensors_inplace(model: nn.Module, full: Dict[str, torch.Tensor], device: torch.device) -> None:
    """Copy full tensors into the model's (possibly sharded) parameters **in place**, so that optimizers built
    over those parameters keep pointing at them (``load_state_dict(assign=True)`` would replace them).

    Raises:
        KeyError: if ``full`` names a parameter the model does not have.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in full.items():
            if name not in params:
                raise KeyError(f"training state has {name!r}, which the model does not have")
            p = params[name]
            value = value.to(device=device, dtype=p.dtype)
            if isinstance(p, DTensor):
                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)


def save_optimizer_state(
    optimizers: Sequence[torch.optim.Optimizer], param_names: Dict[nn.Parameter, str], is_rank_zero: bool
) -> List[Dict[str, Any]]:
    """Full optimizer states keyed by parameter name (collective). Works for one optimizer with several param
    groups and for optimizer-in-backward's one-optimizer-per-parameter alike, sharded (DTensor) or not.

    Returns:
        List[Dict[str, Any]]: per optimizer ``{"param_groups": [...hyperparameters, "params": [names]], "state":
        {name: {key: full tensor or value}}}``; only rank 0's list holds tensors.
    """
    out = []
    for opt in optimizers:
        groups, state = [], {}
        for group in opt.param_groups:
            names = [param_names[p] for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
            for p, name in zip(group["params"], names):
                if p not in opt.state:
                    continue
                entry = {}
                for key, value in sorted(opt.state[p].items()):
                    if isinstance(value, torch.Tensor):
                        value = _full(value)
                        value = value.cpu().clone() if is_rank_zero else None
                    entry[key] = value
                state[name] = entry
        out.append({"param_groups": groups, "state": state})
    return out


def load_optimizer_state(
    optimizers: Sequence[torch.optim.Optimizer],
    saved: Sequence[Dict[str, Any]],
    param_names: Dict[nn.Parameter, str],
    device: torch.device,
) -> None:
    """Inverse of :func:`save_optimizer_state`: shard each full state tensor like its parameter.

    Raises:
        ValueError: if the saved optimizer layout does not match the current one (other model or settings).
    """
    if len(saved) != len(optimizers):
        raise ValueError(
            f"training state has {len(saved)} optimizer(s), the recipe built {len(optimizers)}: "
            "resume with the same model, optimizer and optimizer_in_bwd settings"
        )
    for opt, opt_saved in zip(optimizers, saved):
        if len(opt_saved["param_groups"]) != len(opt.param_groups):
            raise ValueError("optimizer param groups differ from the training state being resumed")
        for group, group_saved in zip(opt.param_groups, opt_saved["param_groups"]):
            names = [param_names[p] for p in group["params"]]
            if names != group_saved["params"]:
                raise ValueError("optimizer parameters differ from the training state being resumed")
            for key, value in group_saved.items():
                if key != "params":
                    group[key] = value
            for p, name in zip(group["params"], names):
                if name not in opt_saved["state"]:
                    continue
                entry = {}
                for key, value in opt_saved["state"][name].items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == p.shape:
                        value = value.to(device=device, dtype=value.dtype)
                        if isinstance(p, DTensor):
                            value = distribute_tensor(value, p.device_mesh, p.placements)
                    elif isinstance(value, torch.Tensor):
                        # scalars such as Adam's `step` stay where the optimizer keeps them (CPU by default)
                        value = value.clone()
                    entry[key] = value
                opt.state[p] = entry
