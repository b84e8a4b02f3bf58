# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Optimizers of ``medusa_finetune``: the heads learn at ``lr * medusa_lr_multiplier`` (Medusa uses 4), the
adapters at ``lr``; one optimizer with two parameter groups, or optimizer-in-backward's one per parameter."""

from typing import List, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training

__all__ = ["build_optimizers"]


def build_optimizers(
    cfg_optimizer: DictConfig,
    named_params: Sequence[Tuple[str, nn.Parameter]],
    *,
    head_lr: float,
    model: nn.Module,
    in_backward: bool = False,
) -> List[torch.optim.Optimizer]:
    """The optimizers of the trainable parameters.

    Args:
        cfg_optimizer (DictConfig): the ``optimizer`` config section (its ``lr`` is the adapters').
        named_params (Sequence[Tuple[str, nn.Parameter]]): the trainable parameters by name.
        head_lr (float): the learning rate of the Medusa heads' parameters (``medusa_heads.*``).
        model (nn.Module): the model (optimizer-in-backward registers its hooks on it).
        in_backward (bool): one optimizer per parameter, stepped in the backward pass. Default False.

    Returns:
        List[torch.optim.Optimizer]: one optimizer (groups: adapters if any, then heads), or one per parameter.
    """
    base_lr = float(cfg_optimizer.lr)
    heads = [p for n, p in named_params if n.startswith("medusa_heads.")]
    others = [p for n, p in named_params if not n.startswith("medusa_heads.")]
    if in_backward:
        optim_dict = {}
        for p in others:
            optim_dict[p] = config.instantiate(cfg_optimizer, [p])
        for p in heads:
            optim_dict[p] = config.instantiate(cfg_optimizer, [{"params": [p], "lr": head_lr}])
        training.register_optim_in_bwd_hooks(model=model, optim_dict=optim_dict)
        return list(optim_dict.values())
    groups = []
    if others:
        groups.append({"params": others, "lr": base_lr})
    groups.append({"params": heads, "lr": head_lr})
    return [config.instantiate(cfg_optimizer, groups)]
