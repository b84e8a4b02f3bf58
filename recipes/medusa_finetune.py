# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""``medusa_finetune``: train Medusa heads (Medusa-1) or heads + a LoRA/QLoRA backbone (Medusa-2).

A fork of torchtune 0.6.1's ``full_finetune_distributed`` (copy-and-hack). Launch with ``tune run``::

    tune run medusa_finetune --config smollm2/135M_medusa
    tune run --nproc_per_node 8 medusa_finetune --config llama3_3/llama_medusa.yaml
"""

import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtune import config, training, utils
from torchtune.modules.peft import disable_adapter, get_adapter_params
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import PROFILER_KEY
from tqdm import tqdm

from torchtune_medusa._config import register_resolvers
from torchtune_medusa._files import atomic_directory, epoch_dir_name, MEDUSA_CHOICES_FILE, METRICS_FILE, write_json
from torchtune_medusa.modules.loss import medusa_loss_metrics, MedusaSelfDistillationLoss
from torchtune_medusa.training._config_checks import check_config
from torchtune_medusa.training._data import build_dataset, make_collate, training_dataloader, validation_batches
from torchtune_medusa.training._head_vocab import set_head_token_map, TOKEN_MAP_STATE_KEY
from torchtune_medusa.training._hidden_cache import (
    fill_hidden_state_cache,
    HiddenStateCache,
    IndexedDataset,
    load_saved_hidden_states,
    saved_hidden_states,
)
from torchtune_medusa.training._lora import (
    init_adapter_weights,
    initialize_dora_magnitudes,
    lora_rank_and_alpha,
    merged_checkpoint,
)
from torchtune_medusa.training._optim import build_optimizers
from torchtune_medusa.training._parallelize import (
    init_process_group_for_recipe,
    parallelize_medusa,
    RootParameters,
    unsharded_model_copy,
)
from torchtune_medusa.training._stages import parse_stages, Stage, stage_at, steps_per_epoch
from torchtune_medusa.training._state import (
    check_resume_settings,
    check_training_state,
    load_training_state,
    remove_stale_temp_files,
    resume_settings,
    save_training_state,
)
from torchtune_medusa.training._validation import (
    curve_point,
    evaluate_heads,
    HeldOutHiddenStates,
    prompts_from_dataset,
    tree_of_size,
    validate_decoding,
)

register_resolvers()

log = utils.get_logger("INFO")


class MedusaFinetuneRecipe(FTRecipeInterface):
    """Medusa training recipe: Medusa-1 (heads on a frozen backbone) and Medusa-2 (heads + LoRA/QLoRA backbone
    with self-distillation), forked from torchtune's ``full_finetune_distributed``.

    Features:
        - Medusa-1 (``medusa_version: 1``): backbone parameters frozen (``requires_grad=False``), the backbone runs
          under ``torch.no_grad`` and the heads learn from its detached normed hidden state. With
          ``cache_hidden_states: True`` the hidden states of the whole data set are computed once, before
          training, kept in memory (bounded by ``hidden_cache_max_gb``; caching is switched off with a warning
          when the data set does not fit) and reused by every epoch, so that an epoch costs only the heads.
        - Medusa-2 (``medusa_version: 2``): a LoRA/QLoRA model; the heads and the adapters train, the base head
          by self-distillation (``MedusaSelfDistillationLoss``) against the same model with its adapters disabled
          (``disable_adapter``: no second model). ``stages`` runs a heads-only warm-up (backbone without autograd,
          as in Medusa-1) for N steps, then the joint stage, in one run. The heads get
          ``lr * medusa_lr_multiplier`` (Medusa uses 4).
        - FSDP2 under ``torchrun`` (``tune run --nproc_per_node N``): every transformer layer, every Medusa head
          (with its own projection) and an untied output layer are FSDP units; single process (no ``torchrun``)
          uses a one-process group on an in-memory store and no sharding. CPU (gloo) and CUDA (nccl).
        - Activation checkpointing, bf16, gradient accumulation (exact: losses are token sums normalised by the
          global token count), gradient clipping, ``compile``, optimizer-in-backward (no clipping/accumulation).
        - Resume: ``save_every_n_steps`` (and every epoch end) writes ``output_dir/training_state/step_N/`` with
          the trainable weights (heads, adapters), optimizer state, per-rank dataloader state, RNG and counters,
          atomically (temporary directory + rename, then the ``latest`` pointer). ``resume_from_checkpoint: True``
          continues from ``latest``, mid-epoch included; the weights equal those of an uninterrupted run.
        - Validation every ``validation.every_n_steps`` and at the end: per-head loss / top-k accuracy and the
          head-vs-greedy agreement table on held-out data (all ranks), and real greedy tree decoding with KV-cache
          eviction on held-out prompts (rank 0; under FSDP on an unsharded copy built from the gathered state
          dict) reporting tau and per-head acceptance. The tree calibrated from the agreement table is saved.
        - Output (``output_dir/epoch_N``): HF-format base (LoRA merged for Medusa-2), head sidecar
          ``medusa_lm_head.safetensors`` (FasterDecoding layout) and config, the calibrated ``medusa_choices.json``,
          optionally the vLLM head layout (``export_vllm: True``); ``output_dir/metrics.json`` holds the final
          metrics.

    Args:
        cfg (DictConfig): the parsed config.

    Raises:
        ValueError: on the config errors of :func:`check_config`, or fp16.
    """

    def __init__(self, cfg: DictConfig) -> None:
        check_config(cfg)
        self._cfg = cfg
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 training is not supported; use bf16 or fp32")
        self.fsdp_cpu_offload = cfg.get("fsdp_cpu_offload", False)
        init_process_group_for_recipe(
            training.get_distributed_backend(self._device.type, offload_ops_to_cpu=self.fsdp_cpu_offload)
        )
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0

        self._medusa_version = int(cfg.get("medusa_version", 1))
        self._stages: List[Stage] = parse_stages(cfg.get("stages", None), medusa_version=self._medusa_version)
        self._output_dir = Path(cfg.output_dir)
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False) and self._device.type == "cuda"
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._optimizer_in_bwd = cfg.get("optimizer_in_bwd", False)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._medusa_lr_multiplier = float(cfg.get("medusa_lr_multiplier", 1.0))
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._keep_last_n = cfg.get("keep_last_n_training_states", 2)
        self._cache_hidden = cfg.get("cache_hidden_states", False)
        self._head_targets = cfg.get("head_targets", "labels")
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._compile = cfg.get("compile", False)
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.global_step = 0
        self._epoch_step = 0  # optimizer steps already taken in the current epoch (mid-epoch resume)
        self._dataloader_state: Optional[Dict[str, Any]] = None
        self._final_metrics: Dict[str, Any] = {}
        # built by setup()
        self._metric_logger: Any = None  # rank 0 only
        self._tokenizer: Any = None
        self._loss_fn: Any = None
        self._self_distill = False
        self._ignore_index = -100
        self._dataloader: Optional[StatefulDataLoader] = None
        self._dataset: Optional[IndexedDataset] = None
        self._collate: Any = None
        self._steps_per_epoch = 0
        self._total_steps = 0
        self._checkpointer: Any = None
        self._model: Optional[nn.Module] = None
        self._sharded = False
        self._root_params: Optional[RootParameters] = None  # a tied output's parameters, gathered outside forward
        self._lora_param_names: List[str] = []
        self._lora_rank: Optional[int] = None
        self._lora_alpha: Optional[float] = None
        self._optimizers: List[torch.optim.Optimizer] = []
        self._param_names: Dict[nn.Parameter, str] = {}
        self._lr_schedulers: List[Any] = []
        self._profiler: Any = None
        self._hidden_cache: Optional[HiddenStateCache] = None
        self._val_cfg: Optional[DictConfig] = None
        self._val_every: Optional[int] = None
        self._val_batches: List[Dict[str, torch.Tensor]] = []
        self._val_prompts: List[List[int]] = []
        self._medusa_choices: Any = None  # the tree validation decodes with, unless calibrated
        # set by validation
        self._calibrated_tree: Optional[List[List[int]]] = None  # an empty tree says plain decoding is fastest
        self._last_agreement: Optional[List[List[float]]] = None
        self._tokens_trained = 0  # by this process run (a resumed run counts from its resume point)
        self._learning_curve: List[Dict[str, float]] = []  # held-out head top-1 at every validation
        self._val_hidden = HeldOutHiddenStates(self._backbone_hidden_no_grad)  # Medusa-1: computed once

        if self._is_rank_zero:  # what killed runs left half-written, before anything is written
            remove_stale_temp_files(self._output_dir)
        dist.barrier()
        # the training state to resume from, checked before any heavy work (None: a new run)
        self._resume_dir: Optional[Path] = None
        self._resume_state: Optional[Dict[str, Any]] = None
        seed = cfg.seed
        if self._resume_from_checkpoint:
            self._resume_dir, self._resume_state = check_training_state(
                self._output_dir,
                num_heads=cfg.model.get("medusa_num_heads", None),
                medusa_version=self._medusa_version,
                world_size=self.world_size,
                rank=self.rank,
                settings=resume_settings(cfg),
            )
            if self._resume_state["seed"] != seed:
                utils.log_rank_zero(
                    log, f"seed {seed} differs from the training state's {self._resume_state['seed']}; using the latter"
                )
                seed = self._resume_state["seed"]
        self.seed = training.set_seed(seed=seed, debug_mode=cfg.get("cudnn_deterministic_mode", None))

    # ------------------------------------------------------------------------------------------------------
    # Setup.

    def setup(self, cfg: DictConfig) -> None:
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        # data first: its errors must not wait for the checkpoint to load
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = config.instantiate(cfg.loss)
        self._self_distill = isinstance(self._loss_fn, MedusaSelfDistillationLoss)
        if self._compile:
            training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)
        self._ignore_index = self._loss_fn.ignore_index

        self._dataloader, self._dataset, self._collate = self._setup_data(
            cfg.dataset, shuffle=cfg.shuffle, batch_size=cfg.batch_size, collate_fn=cfg.get("collate_fn", None)
        )
        self._steps_per_epoch = steps_per_epoch(
            len(self._dataloader),
            gradient_accumulation_steps=self._gradient_accumulation_steps,
            max_steps_per_epoch=self.max_steps_per_epoch,
            batch_size=cfg.batch_size,
        )
        self._total_steps = self.total_epochs * self._steps_per_epoch
        if self._resume_state is not None:
            check_resume_settings(self._resume_dir, self._resume_state, {"num_samples": len(self._dataset)})

        meta_model = self._build_meta_model(cfg)  # cheap: bad model arguments fail before the checkpoint loads
        self._checkpointer = config.instantiate(cfg.checkpointer)
        checkpoint_dict = self._checkpointer.load_checkpoint()
        saved_token_map = checkpoint_dict[training.MODEL_KEY].pop(TOKEN_MAP_STATE_KEY, None)
        self._model = self._setup_model(cfg, meta_model, checkpoint_dict[training.MODEL_KEY])
        del checkpoint_dict
        set_head_token_map(
            self._model,
            cfg.get("truncated_vocab_size", None),
            saved=saved_token_map,
            dataset=self._dataset,
            ignore_index=self._ignore_index,
            progress=self._is_rank_zero,
        )

        self._setup_optimizer(cfg.optimizer)
        self._lr_schedulers = self._setup_lr_schedulers(cfg.get("lr_scheduler", None))

        if self._resume_from_checkpoint:
            self._load_training_state()

        self._setup_validation(cfg)
        self._profiler = self._setup_profiler(cfg.get(PROFILER_KEY, None))

        saved = saved_hidden_states(self._dataset)
        if saved and not (self._cache_hidden and self._medusa_version == 1):
            raise ValueError(
                f"{cfg.dataset._component_} holds saved hidden states, which only train Medusa-1 heads from the "
                "hidden-state cache: set medusa_version=1 and cache_hidden_states=True, or train on the replies' text "
                "with torchtune_medusa.data.medusa_chat_dataset"
            )
        if saved:
            self._hidden_cache = load_saved_hidden_states(
                saved, model=self._model, dtype=self._dtype, store_device=self._hidden_store_device(cfg)
            )
            if len(self._hidden_cache) < len(self._dataset):  # the rest of a dataset list: computed by the backbone
                self._fill_hidden_cache(cfg, batch_size=cfg.batch_size)
        elif self._cache_hidden:
            self._fill_hidden_cache(cfg, batch_size=cfg.batch_size)

    def _build_meta_model(self, cfg: DictConfig) -> nn.Module:
        """The model on the meta device (no memory, no weights)."""
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        if not hasattr(model, "medusa_heads") or not hasattr(model, "project"):
            raise ValueError(f"{cfg.model._component_} does not build a MedusaTransformerDecoder")
        return model

    def _setup_model(self, cfg: DictConfig, model: nn.Module, model_state_dict: Dict[str, Any]) -> nn.Module:
        init_start = time.perf_counter()
        head_names = {f"medusa_heads.{n}" for n, _ in model.medusa_heads.named_parameters()}
        lora_names = {n for n in get_adapter_params(model) if n not in head_names}
        if self._medusa_version == 1 and lora_names:
            raise ValueError("medusa_version=1 needs a model without LoRA adapters")
        if self._medusa_version == 2 and not lora_names:
            raise ValueError("medusa_version=2 needs a LoRA/QLoRA model (no adapter parameters found)")
        ck_heads = {k.split(".")[1] for k in model_state_dict if k.startswith("medusa_heads.")}
        if ck_heads and len(ck_heads) != model.num_medusa_heads:
            raise ValueError(
                f"the checkpoint has {len(ck_heads)} Medusa heads, the model {model.num_medusa_heads}: set "
                "model.medusa_num_heads (and checkpointer.medusa_num_heads) to match"
            )
        trainable = head_names | lora_names
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        self._lora_param_names = sorted(lora_names)
        self._lora_rank, self._lora_alpha = lora_rank_and_alpha(model)

        self._sharded = parallelize_medusa(
            model,
            device_type=self._device.type,
            world_size=self.world_size,
            compile=self._compile,
            enable_activation_checkpointing=self._enable_activation_checkpointing,
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
            fsdp_cpu_offload=self.fsdp_cpu_offload,
            fsdp_reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
        )
        self._root_params = RootParameters(model, sharded=self._sharded)

        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()
        if lora_names:
            init_adapter_weights(model, model_state_dict, lora_names, seed=self.seed, dtype=self._dtype)
        training.load_from_full_model_state_dict(
            model, model_state_dict, self._device, strict=True, cpu_offload=self.fsdp_cpu_offload
        )
        if lora_names:
            initialize_dora_magnitudes(model)
        training.validate_no_params_on_meta_device(model)
        model.set_return_hidden(True)
        utils.log_rank_zero(
            log,
            f"Model ready in {time.perf_counter() - init_start:.2f}s: Medusa-{self._medusa_version}, "
            f"{model.num_medusa_heads} heads, {len(head_names)} head + {len(lora_names)} adapter tensors trainable, "
            f"world size {self.world_size}{' (FSDP2)' if self._sharded else ''}",
        )
        if self._is_rank_zero and self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        dist.barrier()
        return model

    def _trainable_named_params(self) -> List[Tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]

    def _setup_optimizer(self, cfg_optimizer: DictConfig) -> None:
        named = self._trainable_named_params()
        self._param_names = {p: n for n, p in named}
        base_lr = float(cfg_optimizer.lr)
        head_lr = base_lr * self._medusa_lr_multiplier
        self._optimizers = build_optimizers(
            cfg_optimizer, named, head_lr=head_lr, model=self._model, in_backward=self._optimizer_in_bwd
        )
        utils.log_rank_zero(
            log, f"Optimizer ready: lr {base_lr:g} (adapters), {head_lr:g} (heads, x{self._medusa_lr_multiplier:g})"
        )

    def _setup_lr_schedulers(self, cfg_lr_scheduler: Optional[DictConfig]) -> list:
        if cfg_lr_scheduler is None:
            return []
        return [
            config.instantiate(cfg_lr_scheduler, opt, num_training_steps=self._total_steps, last_epoch=-1)
            for opt in self._optimizers
        ]

    def _setup_profiler(self, cfg_profiler: Optional[DictConfig]):
        if cfg_profiler is None:
            cfg_profiler = DictConfig({"enabled": False})
        if cfg_profiler.get("_component_", None) is None:
            cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
        profiler, _ = config.instantiate(cfg_profiler)
        return profiler

    def _make_collate(self, collate_fn: Optional[str], packed: bool):
        return make_collate(collate_fn, packed, padding_idx=self._tokenizer.pad_id, ignore_idx=self._ignore_index)

    def _setup_data(self, cfg_dataset, shuffle: bool, batch_size: int, collate_fn: Optional[str]):
        ds, packed = build_dataset(cfg_dataset, self._tokenizer)
        ds = IndexedDataset(ds)
        collate = self._make_collate(collate_fn, packed)
        dataloader = training_dataloader(
            ds,
            collate,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.seed,
            world_size=self.world_size,
            rank=self.rank,
        )
        utils.log_rank_zero(log, f"Dataset: {len(ds)} samples, {len(dataloader)} batches per rank and epoch")
        return dataloader, ds, collate

    def _setup_validation(self, cfg: DictConfig) -> None:
        val = self._val_cfg = cfg.get("validation", None)
        if val is None:
            return
        self._val_every = val.get("every_n_steps", None)
        if val.get("dataset", None) is not None:
            ds, packed = build_dataset(val.dataset, self._tokenizer)
            self._val_batches = validation_batches(
                ds,
                self._make_collate(cfg.get("collate_fn", None), packed),
                max_samples=int(val.get("max_samples", 64)),
                batch_size=int(val.get("batch_size", cfg.batch_size)),
                world_size=self.world_size,
                rank=self.rank,
            )
            if self._is_rank_zero and val.get("num_prompts", 0) > 0:
                self._val_prompts = prompts_from_dataset(
                    ds, int(val.num_prompts), self._ignore_index, int(val.get("max_prompt_len", 256))
                )
        self._medusa_choices = val.get("medusa_choices", None)
        if self._medusa_choices is not None and not isinstance(self._medusa_choices, str):
            self._medusa_choices = OmegaConf.to_container(self._medusa_choices)
        if self._medusa_choices is None:
            self._medusa_choices = [[0] * d for d in range(1, self._model.num_medusa_heads + 1)]  # a chain
        utils.log_rank_zero(
            log, f"Validation: {len(self._val_batches)} batches per rank, {len(self._val_prompts)} prompts"
        )

    # ------------------------------------------------------------------------------------------------------
    # Forward passes.

    def _model_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {k: batch[k] for k in ("tokens", "mask", "input_pos") if k in batch}

    def _backbone_hidden_no_grad(self, batch: Dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return self._model(**self._model_inputs(batch)).detach()

    @torch.no_grad()
    def _base_greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` base model's greedy token after every position (chunked projection, no grad)."""
        chunks = max(1, getattr(self._loss_fn, "num_output_chunks", 8))
        return torch.cat([self._project_outside_forward(h, 0).argmax(-1) for h in hidden.chunk(chunks, dim=1)], dim=1)

    def _project_outside_forward(
        self, hidden: torch.Tensor, head: int, prev_tokens: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``model.project`` for callers outside the training loss (validation): a tied output, or the token
        embedding that Hydra heads read, under FSDP needs the root unit's parameters gathered (the loop reshards
        them afterwards)."""
        if head == 0 or prev_tokens is not None:
            self._root_params.gather()
        return self._model.project(hidden, head, prev_tokens)

    def _teacher_project(self, hidden: torch.Tensor, head: int) -> torch.Tensor:
        with disable_adapter(self._model):
            return self._model.project(hidden, head)

    def _fill_hidden_cache(self, cfg: DictConfig, batch_size: int) -> None:
        self._hidden_cache = fill_hidden_state_cache(
            self._dataset,
            dim=self._model.norm.scale.shape[-1] if hasattr(self._model.norm, "scale") else None,
            dtype=self._dtype,
            max_gb=float(cfg.get("hidden_cache_max_gb", 4.0)),
            store_device=self._hidden_store_device(cfg),
            compute_hidden=self._backbone_hidden_no_grad,
            greedy_fn=self._base_greedy if self._head_targets == "base_greedy" else None,
            collate_fn=self._collate,
            batch_size=batch_size,
            device=self._device,
            cache=self._hidden_cache,
        )
        self._root_params.release()  # gathered by _base_greedy

    def _hidden_store_device(self, cfg: DictConfig) -> torch.device:
        return self._device if cfg.get("hidden_cache_on_device", False) else torch.device("cpu")

    def _loss_step(self, batch: Dict[str, Any], stage: Stage):
        labels = batch.pop("labels")
        labels = torch.hstack((labels[..., 1:], torch.full_like(labels[..., :1], self._ignore_index)))
        heads_only = stage.name == "heads"
        if heads_only:
            hidden = None
            if self._hidden_cache is not None:
                hidden = self._hidden_cache.batch(batch["_index"], batch["tokens"].size(1), self._device)
            if hidden is None:
                hidden = self._backbone_hidden_no_grad(batch)
            if self._head_targets == "base_greedy":
                # Medusa-1 self-distillation on the fly: labels[:, t] becomes the base model's greedy pick after
                # position t wherever the data has a trained label, so head k at t learns the base's greedy token
                # k steps later (what greedy Medusa decoding accepts).
                greedy = None
                if self._hidden_cache is not None:
                    greedy = self._hidden_cache.greedy_batch(batch["_index"], labels.size(1), self._device)
                if greedy is None:
                    greedy = self._base_greedy(hidden)
                labels = torch.where(labels != self._ignore_index, greedy, labels)
        else:
            hidden = self._model(**self._model_inputs(batch))
        if self._self_distill:
            if self._lora_param_names:
                with torch.no_grad(), disable_adapter(self._model):
                    teacher_hidden = self._model(**self._model_inputs(batch))
                teacher_project = self._teacher_project
            else:  # Medusa-1: the frozen model is its own teacher
                teacher_hidden, teacher_project = hidden.detach(), self._model.project
            self._root_params.gather()  # a tied output reads the root unit's embedding in the loss (see RootParameters)
            out = self._loss_fn(
                hidden,
                labels,
                self._model.project,
                teacher_hidden,
                teacher_project,
                num_heads=self._model.num_medusa_heads,
                **self._hydra_tokens(batch),
            )
        else:
            self._root_params.gather()  # a tied output reads the root unit's embedding in the loss (see RootParameters)
            out = self._loss_fn(
                hidden, labels, self._model.project, num_heads=self._model.num_medusa_heads, **self._hydra_tokens(batch)
            )
        return out, labels

    def _hydra_tokens(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Hydra heads read the input tokens after each position (the loss's ``tokens``); Medusa heads nothing."""
        return {"tokens": batch["tokens"]} if self._model.medusa_head_type == "hydra" else {}

    # ------------------------------------------------------------------------------------------------------
    # Training state (resume).

    def _save_training_state(self) -> None:
        """Write ``output_dir/training_state/step_N`` (every rank takes part; see :func:`save_training_state`)."""
        save_training_state(
            self._output_dir,
            global_step=self.global_step,
            trainable=self._trainable_named_params(),
            optimizers=self._optimizers,
            param_names=self._param_names,
            recipe_state={
                "seed": self.seed,
                "epochs_run": self.epochs_run,
                "epoch_step": self._epoch_step,
                "global_step": self.global_step,
                "total_epochs": self.total_epochs,
                **resume_settings(self._cfg),
                "num_samples": len(self._dataset),
                "world_size": self.world_size,
                "medusa_version": self._medusa_version,
                "num_heads": self._model.num_medusa_heads,
                "lr_schedulers": [s.state_dict() for s in self._lr_schedulers],
            },
            dataloader_state=self._dataloader.state_dict() if self._epoch_step > 0 else None,
            device=self._device,
            keep_last_n=int(self._keep_last_n),
        )

    def _load_training_state(self) -> None:
        """Load the training state checked in ``__init__`` into the model, optimizers, LR schedulers, counters,
        dataloader and RNG."""
        path, state = self._resume_dir, self._resume_state
        self._dataloader_state = load_training_state(
            path,
            state,
            model=self._model,
            optimizers=self._optimizers,
            lr_schedulers=self._lr_schedulers,
            param_names=self._param_names,
            device=self._device,
        )
        self.epochs_run = state["epochs_run"]
        self._epoch_step = state["epoch_step"]
        self.global_step = state["global_step"]
        utils.log_rank_zero(
            log, f"Resumed from {path}: epoch {self.epochs_run}, step {self.global_step} ({self._epoch_step} in epoch)"
        )

    # ------------------------------------------------------------------------------------------------------
    # Validation.

    def _validate(self, final: bool = False) -> Dict[str, Any]:
        if self._val_cfg is None:
            return {}
        t0 = time.perf_counter()
        self._model.eval()
        topk = int(self._val_cfg.get("topk", 10))
        metrics: Dict[str, Any] = {}
        agreement = None
        if self._val_batches:
            batches = [
                {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in b.items()} for b in self._val_batches
            ]
            res = evaluate_heads(
                batches=batches,
                hidden_fn=self._val_hidden.bind(batches)
                if self._medusa_version == 1
                else self._backbone_hidden_no_grad,
                project=self._project_outside_forward,
                num_heads=self._model.num_medusa_heads,
                ignore_index=self._ignore_index,
                topk=topk,
                num_chunks=getattr(self._loss_fn, "num_output_chunks", 8),
                device=self._device,
                world_size=self.world_size,
                token_map=self._model.medusa_token_map,
                head_type=self._model.medusa_head_type,
                base_results=self._val_hidden.base_results if self._medusa_version == 1 else None,
            )
            self._root_params.release()
            metrics.update(res["metrics"])
            agreement = res["agreement"]
            self._learning_curve.append(curve_point(self.global_step, self._tokens_trained, res["metrics"]))
        num_nodes = self._val_cfg.get("calibrate_tree_nodes", None)
        measure_cost = self._val_cfg.get("tree_cost", "none") == "measured"
        if agreement is not None and num_nodes and not measure_cost:
            tree = tree_of_size(agreement, int(num_nodes))
            if tree:
                self._calibrated_tree = tree
        # real tree decoding on rank 0 with an unsharded model
        # the same decision on every rank: under FSDP the unsharded copy is gathered collectively
        # decoding (and measured tree calibration) can be kept for the end, so that frequent validations (the
        # learning curve) cost only the teacher-forced head metrics
        if int(self._val_cfg.get("num_prompts", 0)) > 0 and (final or not self._val_cfg.get("decode_only_at_end")):
            decode_model = unsharded_model_copy(
                self._model, self._cfg.model, sharded=self._sharded, dtype=self._dtype, device=self._device
            )
            if self._is_rank_zero:
                decoding, self._calibrated_tree = validate_decoding(
                    decode_model,
                    self._val_prompts,
                    val_cfg=self._val_cfg,
                    medusa_choices=self._medusa_choices,
                    calibrated_tree=self._calibrated_tree,
                    agreement=agreement,
                    stop_tokens=getattr(self._tokenizer, "stop_tokens", ()),
                    device=self._device,
                )
                metrics.update(decoding)
            if decode_model is not self._model:
                del decode_model
            dist.barrier()
        self._model.train()
        self._model.set_return_hidden(True)
        metrics["val/wall_s"] = time.perf_counter() - t0
        if self._is_rank_zero:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self._metric_logger.log_dict(scalars, step=self.global_step)
            if "val/tau" in metrics:
                log.info(
                    f"Validation at step {self.global_step}: tau {metrics['val/tau']:.3f}, per-head acceptance "
                    + ", ".join(f"{metrics[k]:.2f}" for k in sorted(metrics) if k.startswith("val/acceptance/"))
                )
        self._last_agreement = agreement
        return metrics

    # ------------------------------------------------------------------------------------------------------
    # Training.

    def _zero_grad(self) -> None:
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=True)

    def train(self) -> None:
        if self._device.type == "cuda":
            training.cleanup_before_training()
        self._zero_grad()
        t_start = time.perf_counter()
        t0 = time.perf_counter()
        running_loss = torch.zeros((), device=self._device)
        num_tokens = torch.zeros((), device=self._device, dtype=torch.long)
        head_sums = head_correct = head_counts = None
        last_train_metrics: Dict[str, float] = {}
        current_stage = stage_at(self._stages, self.global_step)

        if self.epochs_run >= self.total_epochs:
            utils.log_rank_zero(
                log, f"All {self.total_epochs} epochs are trained (step {self.global_step}): final validation and save"
            )
        self._profiler.start()
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            self._dataloader.sampler.set_epoch(curr_epoch)
            if self._dataloader_state is not None:
                self._dataloader.load_state_dict(self._dataloader_state)
                self._dataloader_state = None
            else:
                self._epoch_step = 0
            pbar = tqdm(total=self._steps_per_epoch, initial=self._epoch_step, disable=not self._is_rank_zero)
            for idx, batch in enumerate(self._dataloader):
                if self._epoch_step >= self._steps_per_epoch:
                    break
                stage = stage_at(self._stages, self.global_step)
                if stage.name != current_stage.name:
                    utils.log_rank_zero(
                        log, f"Stage switch at step {self.global_step}: {current_stage.name} -> {stage.name}"
                    )
                    current_stage = stage
                if hasattr(self._loss_fn, "set_step"):
                    self._loss_fn.set_step(self.global_step, max(1, self._total_steps))
                utils.batch_to_device(batch, self._device)
                out, labels = self._loss_step(batch, stage)
                current_num_tokens = (labels != self._ignore_index).sum()
                num_tokens += current_num_tokens
                current_loss = out.loss * current_num_tokens
                running_loss += current_loss.detach()
                if head_sums is None:
                    head_sums, head_correct, head_counts = (
                        out.head_loss_sums.clone(),
                        out.head_topk_correct.clone(),
                        out.head_counts.clone(),
                    )
                else:
                    head_sums += out.head_loss_sums
                    head_correct += out.head_topk_correct
                    head_counts += out.head_counts
                if self._optimizer_in_bwd:
                    dist.all_reduce(num_tokens)
                    dist.all_reduce(running_loss)
                    current_loss = current_loss * (self.world_size / num_tokens)
                if current_loss.requires_grad:
                    current_loss.backward()
                self._root_params.release()  # gathered for the loss

                if (idx + 1) % self._gradient_accumulation_steps != 0:
                    continue
                grad_norm = None
                if not self._optimizer_in_bwd:
                    dist.all_reduce(num_tokens)
                    dist.all_reduce(running_loss)
                    training.scale_grads(self._model, self.world_size / num_tokens.clamp(min=1))
                    if self._clip_grad_norm is not None:
                        params = [p for _, p in self._trainable_named_params() if p.grad is not None]
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=float(self._clip_grad_norm))
                        if isinstance(grad_norm, DTensor):
                            grad_norm = grad_norm.full_tensor()
                    for opt in self._optimizers:
                        opt.step()
                    self._zero_grad()
                for sched in self._lr_schedulers:
                    sched.step()
                self.global_step += 1
                self._epoch_step += 1
                for t in (head_sums, head_correct, head_counts):
                    dist.all_reduce(t)
                n_tok = int(num_tokens.item())
                self._tokens_trained += n_tok
                loss_to_log = running_loss.item() / max(1, n_tok)
                pbar.update(1)
                pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|{stage.name}|Loss: {loss_to_log:.4f}")
                if self.global_step % self._log_every_n_steps == 0 and self._is_rank_zero:
                    time_per_step = time.perf_counter() - t0
                    log_dict = {
                        "loss": loss_to_log,
                        "lr": self._optimizers[0].param_groups[0]["lr"],
                        "lr_heads": self._optimizers[-1].param_groups[-1]["lr"],
                        "stage": float(self._stages.index(stage)),
                        "tokens_per_second_per_gpu": n_tok / (time_per_step * self.world_size),
                    }
                    log_dict.update(medusa_loss_metrics(head_sums, head_correct, head_counts, self._loss_fn.topk))
                    if grad_norm is not None:
                        log_dict["grad_norm"] = float(grad_norm)
                    if self._log_peak_memory_stats:
                        log_dict.update(training.get_memory_stats(device=self._device))
                    self._metric_logger.log_dict(log_dict, step=self.global_step)
                    last_train_metrics = log_dict
                running_loss = torch.zeros((), device=self._device)
                num_tokens = torch.zeros((), device=self._device, dtype=torch.long)
                head_sums = head_correct = head_counts = None
                t0 = time.perf_counter()
                self._profiler.step()

                last_step = self.global_step >= self._total_steps
                if self._val_every and self.global_step % int(self._val_every) == 0 and not last_step:
                    self._validate()
                    t0 = time.perf_counter()
                if (
                    self._save_every_n_steps
                    and self.global_step % int(self._save_every_n_steps) == 0
                    and self._epoch_step < self._steps_per_epoch
                ):
                    self._save_training_state()
                    t0 = time.perf_counter()
                if self._epoch_step >= self._steps_per_epoch:
                    break
            pbar.close()
            self.epochs_run += 1
            self._epoch_step = 0
            # also after the last epoch: a failure in the final validation or save loses no training
            self._save_training_state()
        self._profiler.stop()
        train_time = time.perf_counter() - t_start

        final_val = self._validate(final=True)
        self._final_metrics = {
            "medusa_version": self._medusa_version,
            "num_heads": self._model.num_medusa_heads,
            "global_step": self.global_step,
            "epochs": self.epochs_run,
            "train_time_s": train_time,
            "train_tokens": self._tokens_trained,
            "train_tokens_per_second": self._tokens_trained / max(train_time, 1e-9),
            "world_size": self.world_size,
            "train": {k: v for k, v in last_train_metrics.items()},
            "validation": {k: v for k, v in final_val.items() if isinstance(v, (int, float, str))},
        }
        if self._calibrated_tree is not None:
            self._final_metrics["medusa_choices"] = self._calibrated_tree
        if self._last_agreement is not None:
            self._final_metrics["agreement_table"] = self._last_agreement
        if self._learning_curve:
            self._final_metrics["learning_curve"] = self._learning_curve
        self.save_checkpoint(epoch=self.epochs_run - 1)

    def save_checkpoint(self, epoch: int) -> None:
        """Write the final HF-format checkpoint (LoRA merged), head sidecar, calibrated tree, optional vLLM heads
        and ``metrics.json``; the epoch directory appears atomically."""
        t0 = time.perf_counter()
        sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        if self._is_rank_zero:
            ckpt = merged_checkpoint(sd, self._lora_param_names, rank=self._lora_rank, alpha=self._lora_alpha)
            sd = ckpt[training.MODEL_KEY]
            final_dir = self._output_dir / epoch_dir_name(epoch)
            with atomic_directory(final_dir) as tmp:
                self._checkpointer.save_checkpoint_to(tmp, ckpt, epoch=epoch)
                if self._calibrated_tree is not None:  # an empty tree says plain decoding is fastest
                    write_json(tmp / MEDUSA_CHOICES_FILE, {"medusa_choices": self._calibrated_tree}, sort_keys=True)
                if self._cfg.get("export_vllm", False):
                    self._export_vllm(sd, tmp / "vllm_medusa")
            self._final_metrics["output_dir"] = str(final_dir)
            write_json(self._output_dir / METRICS_FILE, self._final_metrics, sort_keys=True)
            log.info(f"Saved {final_dir} and metrics.json in {time.perf_counter() - t0:.2f}s")
        dist.barrier()

    def _export_vllm(self, sd: Dict[str, torch.Tensor], out_dir: Path) -> None:
        from torchtune_medusa.models import export_heads

        export_heads(sd, out_dir, format="vllm")

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()
        dist.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run medusa_finetune --config <config> [key=value ...]``."""
    config.log_config(recipe_name="MedusaFinetuneRecipe", cfg=cfg)
    recipe = MedusaFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
