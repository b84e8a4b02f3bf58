# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Parallelism of ``medusa_finetune``, applied to a model that knows nothing about it (as torchtitan's
``parallelize_llama``): the process group, ``torch.compile``, activation checkpointing and FSDP2 sharding
(:func:`parallelize_medusa`), the gathering of a tied output's parameters for calls outside the model's forward
(:class:`RootParameters`), and the unsharded copy that rank 0 decodes with (:func:`unsharded_model_copy`).
"""

import os
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config, modules, training

__all__ = [
    "RootParameters",
    "init_process_group_for_recipe",
    "medusa_shard_condition",
    "output_shard_condition",
    "parallelize_medusa",
    "unsharded_model_copy",
]

# ----------------------------------------------------------------------------------------------------------
# Process group.


def init_process_group_for_recipe(backend: str) -> None:
    """Initialise ``torch.distributed``; without ``torchrun`` (no ``RANK`` in the environment) start a
    one-process group on an in-memory store, so that the same FSDP code path runs single-process.

    Args:
        backend (str): ``"gloo"`` or ``"nccl"`` (torchtune's ``get_distributed_backend``).
    """
    if dist.is_initialized():
        return
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


# ----------------------------------------------------------------------------------------------------------
# FSDP.


def medusa_shard_condition(name: str, module: nn.Module) -> bool:
    """FSDP2 shard condition: every Medusa head (``medusa_heads.<i>``) is its own unit, together with its own
    vocabulary projection, so that calling ``model.project(hidden, k)`` from the chunked loss all-gathers just
    that head. The ``medusa_heads`` container itself (no forward) is left alone."""
    parts = name.split(".")
    return len(parts) == 2 and parts[0] == "medusa_heads" and parts[1].isdigit()


def output_shard_condition(name: str, module: nn.Module) -> bool:
    """FSDP2 shard condition for the base output layer when it is a module (untied models), so that
    ``model.project(hidden, 0)`` outside the model's forward all-gathers it."""
    return name == "output" and isinstance(module, nn.Module)


def parallelize_medusa(
    model: nn.Module,
    *,
    device_type: str,
    world_size: int,
    compile: bool = False,
    enable_activation_checkpointing: bool = False,
    custom_sharded_layers: Optional[List[str]] = None,
    fsdp_cpu_offload: bool = False,
    fsdp_reshard_after_forward: bool = True,
) -> bool:
    """Compile, checkpoint activations and shard ``model`` (on the meta device, before its weights load), in
    place. With more than one process every transformer layer, every Medusa head (with its own projection) and an
    untied output layer become FSDP2 units of a one-dimensional (``dp``) device mesh; one process is not sharded.

    Args:
        model (nn.Module): a ``MedusaTransformerDecoder``.
        device_type (str): ``"cpu"`` or ``"cuda"``: the device mesh's type.
        world_size (int): number of processes.
        compile (bool): ``torch.compile`` the layers (torchtune's ``compile_model``). Default False.
        enable_activation_checkpointing (bool): checkpoint every transformer layer. Default False.
        custom_sharded_layers (Optional[List[str]]): more module names to shard (torchtune's option). Default None.
        fsdp_cpu_offload (bool): offload parameters to CPU. Default False.
        fsdp_reshard_after_forward (bool): reshard after the forward pass. Default True.

    Returns:
        bool: whether the model is sharded.
    """
    is_rank_zero = dist.get_rank() == 0 if dist.is_initialized() else True
    if compile:
        training.compile_model(model, verbose=is_rank_zero)
    if enable_activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    if world_size <= 1:
        return False
    device_mesh = dist.init_device_mesh(device_type, mesh_shape=(world_size,), mesh_dim_names=("dp",))
    training.shard_model(
        model=model,
        shard_conditions=[
            partial(training.get_shard_conditions, names_to_match=custom_sharded_layers),
            medusa_shard_condition,
            output_shard_condition,
        ],
        cpu_offload=fsdp_cpu_offload,
        reshard_after_forward=fsdp_reshard_after_forward,
        dp_mesh=device_mesh["dp"],
    )
    return True


class RootParameters:
    """The parameters of a sharded model's root FSDP unit, for calls outside the model's forward.

    A tied output (``TiedLinear``) reads the token embedding, which belongs to the root FSDP unit, also when the
    loss or validation calls ``model.project(hidden, 0)`` outside the model's forward: the root's (small)
    parameters must be gathered for that call and resharded afterwards. Unsharded models and untied outputs (their
    own FSDP unit) need nothing; then every method does nothing.

    Args:
        model (nn.Module): the (possibly sharded) ``MedusaTransformerDecoder``.
        sharded (bool): whether ``model`` is sharded (:func:`parallelize_medusa`'s result).
    """

    def __init__(self, model: nn.Module, *, sharded: bool) -> None:
        self._model = model
        # Hydra heads read the token embedding (root unit) in the loss too
        hydra = getattr(model, "medusa_head_type", "medusa") == "hydra"
        self.need_gathering = sharded and (hydra or not isinstance(model.output, nn.Module))

    def gather(self) -> None:
        """All-gather the root unit's parameters (collective under FSDP: every rank calls it)."""
        if self.need_gathering:
            self._model.unshard()

    def release(self) -> None:
        """Reshard what :meth:`gather` gathered (after the backward pass that used it)."""
        if self.need_gathering:
            self._model.reshard()


def unsharded_model_copy(
    model: nn.Module, cfg_model: DictConfig, *, sharded: bool, dtype: torch.dtype, device: torch.device
) -> Optional[nn.Module]:
    """The model itself when unsharded; under FSDP, rank 0 gets an unsharded copy built from the gathered full
    state dict (simple and correct; needs the whole model in rank 0's memory), the other ranks None. Every rank
    must call it (the gather is collective). A QLoRA model is copied without quantising its base.

    Args:
        model (nn.Module): the training model.
        cfg_model (DictConfig): the ``model`` config section that built it.
        sharded (bool): whether ``model`` is sharded.
        dtype (torch.dtype): the training dtype.
        device (torch.device): the training device.

    Returns:
        Optional[nn.Module]: the model to decode with, in eval mode when it is a copy; None off rank 0.
    """
    if not sharded:
        return model
    is_rank_zero = dist.get_rank() == 0
    sd = training.gather_cpu_state_dict(model, is_rank_zero, device=device)
    if not is_rank_zero:
        return None
    cfg_model = OmegaConf.create(OmegaConf.to_container(cfg_model, resolve=True))
    if "quantize_base" in cfg_model:
        cfg_model.quantize_base = False
    with training.set_default_dtype(dtype), device:
        copy = config.instantiate(cfg_model)
    copy.load_state_dict(sd, strict=False)
    return copy.eval()
