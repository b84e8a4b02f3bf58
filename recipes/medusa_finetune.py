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

import copy
import difflib
import inspect
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.data import padded_collate_packed
from torchtune.datasets import ConcatDataset
from torchtune.modules.peft import (
    disable_adapter,
    DoRALinear,
    get_adapter_params,
    get_adapter_state_dict,
    get_merged_lora_ckpt,
    LoRALinear,
)
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import PROFILER_KEY
from tqdm import tqdm

from torchtune_medusa._config import register_resolvers
from torchtune_medusa.data._utils import check_local_data_file
from torchtune_medusa.generation import calibrate_tree, measure_step_cost
from torchtune_medusa.generation._settings import decode_dtype, decode_threads, DTYPES
from torchtune_medusa.modules.loss import medusa_loss_metrics, MedusaSelfDistillationLoss
from torchtune_medusa.training._recipe_utils import (
    atomic_directory,
    check_resume_settings,
    find_latest_training_state,
    gather_full_tensors,
    HiddenStateCache,
    indexed_collate,
    IndexedDataset,
    init_process_group_for_recipe,
    load_full_tensors_inplace,
    load_optimizer_state,
    load_training_state_file,
    medusa_shard_condition,
    output_shard_condition,
    parse_stages,
    remove_stale_temp_files,
    save_optimizer_state,
    Stage,
    stage_at,
    TRAINING_STATE_DIR,
    write_json_atomic,
)
from torchtune_medusa.training._validation import (
    evaluate_decoding,
    evaluate_heads,
    prompts_from_dataset,
    tree_of_size,
)

register_resolvers()

log = utils.get_logger("INFO")

_LORA_MODEL_KEYS = (
    "lora_attn_modules",
    "apply_lora_to_mlp",
    "apply_lora_to_output",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "use_dora",
    "quantize_base",
)


TREE_COSTS = ("none", "measured")

#: Top-level config keys the recipe reads; any other key is a typo (``epocs=2``) and is refused.
RECIPE_KEYS = frozenset(
    {
        "batch_size",
        "cache_hidden_states",
        "checkpointer",
        "clip_grad_norm",
        "collate_fn",
        "compile",
        "cudnn_deterministic_mode",
        "custom_sharded_layers",
        "dataset",
        "device",
        "dtype",
        "enable_activation_checkpointing",
        "epochs",
        "export_vllm",
        "fsdp_cpu_offload",
        "fsdp_reshard_after_forward",
        "gradient_accumulation_steps",
        "head_targets",
        "hidden_cache_max_gb",
        "hidden_cache_on_device",
        "keep_last_n_training_states",
        "log_every_n_steps",
        "log_peak_memory_stats",
        "loss",
        "lr_scheduler",
        "max_steps_per_epoch",
        "medusa_lr_multiplier",
        "medusa_version",
        "metric_logger",
        "model",
        "optimizer",
        "optimizer_in_bwd",
        "output_dir",
        PROFILER_KEY,
        "resume_from_checkpoint",
        "save_every_n_steps",
        "seed",
        "shuffle",
        "stages",
        "tokenizer",
        "validation",
    }
)

#: Keys of the ``validation`` section.
VALIDATION_KEYS = frozenset(
    {
        "batch_size",
        "calibrate_tree_nodes",
        "dataset",
        "decode_dtype",
        "decode_with_calibrated_tree",
        "every_n_steps",
        "max_new_tokens",
        "max_prompt_len",
        "max_samples",
        "medusa_choices",
        "num_prompts",
        "topk",
        "tree_cost",
    }
)

#: Sections built with ``config.instantiate``: their keys are the component's arguments.
COMPONENT_KEYS = (
    "model",
    "tokenizer",
    "checkpointer",
    "dataset",
    "loss",
    "optimizer",
    "lr_scheduler",
    "metric_logger",
    PROFILER_KEY,
)


def _component_arguments(path: str) -> Optional[Set[str]]:
    """Keyword arguments the component at ``path`` accepts (following ``**kwargs`` up a class's bases), or
    None when they cannot be known (a function taking ``**kwargs``, an unimportable path)."""
    try:
        component = _get_component_from_path(path)
    except Exception:
        return None  # config.instantiate reports it
    if inspect.isclass(component):
        targets = [c.__dict__["__init__"] for c in component.__mro__ if "__init__" in c.__dict__]
    else:
        targets = [component]
    names: Set[str] = set()
    for target in targets:
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def _unknown_key_line(key: str, valid: Set[str], prefix: str = "", rest: str = "") -> str:
    """``'epocs' (did you mean 'epochs'?)`` for the unknown key ``prefix + key``, shown as ``prefix + key + rest``
    (``rest``: the sub-key of an unknown section, ``.lora_rank`` of ``+model.lora_rank``)."""
    shown = f"{prefix}{key}{rest}"
    bare = key.lstrip("+")
    if bare != key and bare in valid:
        return f"{shown!r} (did you mean {prefix + bare + rest!r}? key=value overrides take no '+', also for new keys)"
    nearest = difflib.get_close_matches(bare, sorted(valid), n=1, cutoff=0.5)
    if nearest:
        return f"{shown!r} (did you mean {prefix + nearest[0] + rest!r}?)"
    return f"{shown!r} (no similar key)"


def _check_section_keys(section: Any, name: str, valid: Optional[Set[str]], unknown: List[str]) -> None:
    """Add to ``unknown`` the keys of config section ``name`` that are not in ``valid`` (None: the arguments of
    the section's ``_component_``, when they can be known)."""
    if not isinstance(section, DictConfig):
        return
    if valid is None and "_component_" in section:
        valid = _component_arguments(str(section._component_))
    if valid is None:
        return
    for key in section.keys():
        if key != "_component_" and key not in valid:
            unknown.append(_unknown_key_line(str(key), valid, prefix=f"{name}."))


def check_config_keys(cfg: DictConfig) -> None:
    """Refuse config keys that nothing reads: top-level keys the recipe does not know, ``validation`` keys, and
    keys of a component section that its ``_component_`` does not take (when its arguments are known).

    Raises:
        ValueError: naming every unknown key and the nearest valid one.
    """
    unknown: List[str] = []
    for key in cfg.keys():
        if key in RECIPE_KEYS:
            continue
        section = cfg.get(key)
        subkeys = list(section.keys()) if isinstance(section, DictConfig) and len(section) > 0 else [None]
        for sub in subkeys:
            unknown.append(_unknown_key_line(str(key), set(RECIPE_KEYS), rest="" if sub is None else f".{sub}"))
    for name in COMPONENT_KEYS:
        sections = cfg.get(name, None)
        for section in sections if isinstance(sections, ListConfig) else [sections]:
            _check_section_keys(section, name, None, unknown)
    val = cfg.get("validation", None)
    _check_section_keys(val, "validation", set(VALIDATION_KEYS), unknown)
    if isinstance(val, DictConfig):
        _check_section_keys(val.get("dataset", None), "validation.dataset", None, unknown)
    if unknown:
        raise ValueError(
            "medusa_finetune: unknown config key(s) "
            + "; ".join(unknown)
            + ": nothing reads them; fix the spelling, or remove them (`~key` on the command line)"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_numbers(cfg: DictConfig) -> None:
    """Counts and rates that must be positive: epochs, steps per epoch, batch size, accumulation, lr, saving.

    Raises:
        ValueError: naming the key, its value and the values it takes.
    """
    positive = {
        "epochs": cfg.get("epochs", None),
        "batch_size": cfg.get("batch_size", None),
        "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps", 1),
        "log_every_n_steps": cfg.get("log_every_n_steps", 1),
        "keep_last_n_training_states": cfg.get("keep_last_n_training_states", 2),
    }
    for key, value in positive.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {key}={value!r}; set {key}=1 or more")
    for key in ("max_steps_per_epoch", "save_every_n_steps"):
        value = cfg.get(key, None)
        if value is not None and (not _is_int(value) or value < 1):
            what = "a whole epoch" if key == "max_steps_per_epoch" else "saving at epoch ends only"
            raise ValueError(
                f"{key} must be a positive integer or null ({what}), got {key}={value!r}; set {key}=1 or more, "
                f"or {key}=null"
            )
    lr = cfg.optimizer.get("lr", None)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"optimizer.lr must be a positive number, got optimizer.lr={lr!r}; e.g. optimizer.lr=1e-3")


def check_config(cfg: DictConfig) -> None:
    """Config errors that must surface before any heavy work (model build, checkpoint load, tokenisation).

    Raises:
        ValueError: unknown config keys, a non-positive count or learning rate, an unknown ``medusa_version`` or
            stage, LoRA options on Medusa-1, a Medusa-2 model without LoRA, a head-count mismatch with the head
            checkpoint in the checkpoint directories, an empty data file or an unreadable head checkpoint.
        FileNotFoundError: a missing data file or checkpoint directory.
    """
    for key in (
        "model",
        "checkpointer",
        "dataset",
        "output_dir",
        "optimizer",
        "loss",
        "tokenizer",
        "epochs",
        "batch_size",
    ):
        if key not in cfg:
            raise ValueError(f"medusa_finetune: config is missing `{key}`; start from `tune cp` of a shipped config")
    version = cfg.get("medusa_version", 1)
    if version not in (1, 2):
        raise ValueError(
            f"medusa_version must be 1 (frozen backbone, heads only) or 2 (LoRA/QLoRA + heads), got {version!r}"
        )
    component = str(cfg.model.get("_component_", ""))
    lora_keys = [k for k in _LORA_MODEL_KEYS if k in cfg.model]
    is_lora = "lora" in component.rsplit(".", 1)[-1] or bool(lora_keys)
    if version == 1 and is_lora:
        raise ValueError(
            f"medusa_version=1 trains the heads on a frozen backbone, but the model config has LoRA options "
            f"({component}{', ' + ', '.join(lora_keys) if lora_keys else ''}); use a plain medusa_* builder, or "
            "medusa_version=2 for LoRA/QLoRA self-distillation"
        )
    if version == 2 and not is_lora:
        raise ValueError(
            f"medusa_version=2 trains LoRA adapters with the heads, but the model {component!r} has no LoRA; use a "
            "lora_medusa_* or qlora_medusa_* builder"
        )
    check_config_keys(cfg)  # after the LoRA checks, which say more about LoRA keys
    check_numbers(cfg)
    parse_stages(cfg.get("stages", None), medusa_version=version)
    if cfg.get("medusa_lr_multiplier", 1.0) <= 0:
        raise ValueError(f"medusa_lr_multiplier must be > 0, got {cfg.medusa_lr_multiplier}")
    # data files
    datasets = list(cfg.dataset) if isinstance(cfg.dataset, ListConfig) else [cfg.dataset]
    val = cfg.get("validation", None)
    if val is not None and val.get("tree_cost", "none") not in TREE_COSTS:
        raise ValueError(
            f"validation.tree_cost={val.tree_cost!r}; choose 'none' (grow calibrate_tree_nodes nodes by expected "
            "accepted tokens) or 'measured' (time tree steps here and keep the size with the most tokens/s)"
        )
    if val is not None and str(val.get("decode_dtype", "auto")) not in ("auto", *DTYPES):
        raise ValueError(
            f"validation.decode_dtype={val.decode_dtype!r}; choose auto (bf16 where the hardware computes it "
            "natively), float32 or bfloat16"
        )
    if val is not None and val.get("dataset", None) is not None:
        datasets.append(val.dataset)
    for ds in datasets:
        files = ds.get("data_files", None)
        if files is None:
            continue
        files = [files] if isinstance(files, str) else list(files.values() if isinstance(files, DictConfig) else files)
        for f in files:
            f = str(f)
            if "://" in f or any(c in f for c in "*?["):
                continue
            if not os.path.exists(f):
                hint = (
                    " (run `python -m torchtune_medusa.assets prepare` for the offline assets)" if "medusa" in f else ""
                )
                raise FileNotFoundError(f"dataset file not found: {f}{hint}")
            check_local_data_file("medusa_finetune", f)
    ckpt_dir = cfg.checkpointer.get("checkpoint_dir", None)
    if ckpt_dir is not None and not os.path.isdir(str(ckpt_dir)):
        raise FileNotFoundError(
            f"checkpointer.checkpoint_dir does not exist: {ckpt_dir}"
            + (" (run `python -m torchtune_medusa.assets prepare`)" if "medusa" in str(ckpt_dir) else "")
        )
    # head count vs. a head checkpoint that would be loaded
    want = cfg.model.get("medusa_num_heads", None)
    ck_heads = cfg.checkpointer.get("medusa_num_heads", None)
    if want is not None and ck_heads is not None and int(want) != int(ck_heads):
        raise ValueError(f"model.medusa_num_heads={want} but checkpointer.medusa_num_heads={ck_heads}; they must agree")
    for d in (cfg.checkpointer.get("medusa_checkpoint_dir", None), ckpt_dir):
        if d is None:
            continue
        found = _heads_in_sidecar(Path(str(d)))
        if found is not None and want is not None and found != int(want):
            raise ValueError(
                f"the head checkpoint in {d} has {found} Medusa heads but model.medusa_num_heads={want}; set "
                f"model.medusa_num_heads={found} (and checkpointer.medusa_num_heads), or point "
                "checkpointer.medusa_checkpoint_dir elsewhere to start new heads"
            )
        if found is not None:
            break


def _heads_in_sidecar(directory: Path) -> Optional[int]:
    """Number of heads in ``medusa_lm_head.safetensors`` in ``directory`` (header only), or None."""
    path = directory / "medusa_lm_head.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            heads = {k.split(".", 1)[0] for k in f.keys()}
    except Exception as e:
        raise ValueError(
            f"the head checkpoint {path} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
            "truncated or corrupt: restore or rewrite it, or move it away to start new heads"
        ) from e
    return len([h for h in heads if h.isdigit()]) or None


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
        ValueError: on the config errors of :func:`check_config`, fp16, or optimizer-in-backward with gradient
            accumulation or clipping.
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
        self.dp_size, self.dp_rank = self.world_size, self.rank

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
        if self._head_targets not in ("labels", "base_greedy"):
            raise ValueError(f"head_targets must be 'labels' or 'base_greedy', got {self._head_targets!r}")
        if self._head_targets == "base_greedy" and self._medusa_version != 1:
            raise ValueError(
                "head_targets=base_greedy is a Medusa-1 option (frozen base); for Medusa-2 use "
                "MedusaSelfDistillationLoss(head_target=teacher_argmax)"
            )
        if self._cache_hidden and self._medusa_version != 1:
            raise ValueError("cache_hidden_states needs a frozen backbone: it is a Medusa-1 (medusa_version=1) option")
        if self._optimizer_in_bwd and (self._clip_grad_norm is not None or self._gradient_accumulation_steps > 1):
            raise ValueError("optimizer_in_bwd does not support clip_grad_norm or gradient_accumulation_steps > 1")
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._compile = cfg.get("compile", False)
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.global_step = 0
        self._epoch_step = 0  # optimizer steps already taken in the current epoch (mid-epoch resume)
        self._dataloader_state: Optional[Dict[str, Any]] = None
        self._final_metrics: Dict[str, Any] = {}

        self._remove_stale_temp_files()
        # the training state to resume from, checked before any heavy work (None: a new run)
        self._resume_dir: Optional[Path] = None
        self._resume_state: Optional[Dict[str, Any]] = None
        seed = cfg.seed
        if self._resume_from_checkpoint:
            self._resume_dir, self._resume_state = self._check_training_state(cfg)
            if self._resume_state["seed"] != seed:
                utils.log_rank_zero(
                    log, f"seed {seed} differs from the training state's {self._resume_state['seed']}; using the latter"
                )
                seed = self._resume_state["seed"]
        self.seed = training.set_seed(seed=seed, debug_mode=cfg.get("cudnn_deterministic_mode", None))

    def _remove_stale_temp_files(self) -> None:
        """Rank 0 removes the temporary folders of killed runs in ``output_dir`` before anything is written."""
        if self._is_rank_zero:
            done = remove_stale_temp_files(self._output_dir)
            if done:
                log.info(
                    f"Cleaned up {len(done)} temporary path(s) left in {self._output_dir} by an interrupted run: "
                    + "; ".join(done)
                )
        dist.barrier()

    def _resume_settings(self, cfg: DictConfig) -> Dict[str, Any]:
        """This run's values of the settings that decide the data order (recorded in every training state)."""
        return {
            "batch_size": cfg.batch_size,
            "shuffle": cfg.shuffle,
            "gradient_accumulation_steps": self._gradient_accumulation_steps,
            "max_steps_per_epoch": self.max_steps_per_epoch,
        }

    def _check_training_state(self, cfg: DictConfig) -> Tuple[Path, Dict[str, Any]]:
        """Find and check the training state to resume from before any heavy work: it exists, its files open,
        and it was written by the same model, number of processes and data-order settings.

        Returns:
            Tuple[Path, Dict[str, Any]]: its directory and its ``recipe_state.pt``.

        Raises:
            FileNotFoundError: no training state, or one of its files is missing.
            RuntimeError: a corrupt file (named, with the newest earlier state that is intact).
            ValueError: a state from another model, number of processes or data order.
        """
        path = find_latest_training_state(self._output_dir)
        if path is None:
            raise FileNotFoundError(
                "resume_from_checkpoint=True but there is no training state in "
                f"{self._output_dir / TRAINING_STATE_DIR} (written every save_every_n_steps and at epoch ends); "
                "set resume_from_checkpoint=False to start a new run, or output_dir=<the run to resume>"
            )
        state = load_training_state_file(path, "recipe_state.pt")
        heads = cfg.model.get("medusa_num_heads", None)
        if heads is not None and state["num_heads"] != int(heads):
            raise ValueError(
                f"training state {path} has {state['num_heads']} heads, the model {heads}: resume with "
                f"model.medusa_num_heads={state['num_heads']} (and checkpointer.medusa_num_heads)"
            )
        if state["medusa_version"] != self._medusa_version:
            raise ValueError(
                f"training state {path} is a Medusa-{state['medusa_version']} run, this config Medusa-"
                f"{self._medusa_version}: resume with medusa_version={state['medusa_version']}"
            )
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"training state {path} was written by {state['world_size']} processes; resume with the same number "
                "(the dataloader order depends on it)"
            )
        check_resume_settings(path, state, self._resume_settings(cfg))
        for name in ("trainable.pt", "optimizer.pt", f"rank_{self.rank}.pt"):
            load_training_state_file(path, name, mmap=True)  # opens (cheap): a corrupt file fails here
        return path, state

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
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < self._steps_per_epoch:
            self._steps_per_epoch = self.max_steps_per_epoch
        if self._steps_per_epoch < 1:
            raise ValueError(
                f"the data set gives {len(self._dataloader)} batches of batch_size={cfg.batch_size} per rank, fewer "
                f"than gradient_accumulation_steps={self._gradient_accumulation_steps}: use more data, a smaller "
                "batch_size or fewer gradient_accumulation_steps"
            )
        self._total_steps = self.total_epochs * self._steps_per_epoch
        if self._resume_state is not None:
            check_resume_settings(self._resume_dir, self._resume_state, {"num_samples": len(self._dataset)})

        meta_model = self._build_meta_model(cfg)  # cheap: bad model arguments fail before the checkpoint loads
        self._checkpointer = config.instantiate(cfg.checkpointer)
        checkpoint_dict = self._checkpointer.load_checkpoint()
        self._model = self._setup_model(cfg, meta_model, checkpoint_dict[training.MODEL_KEY])
        del checkpoint_dict

        self._setup_optimizer(cfg.optimizer)
        self._lr_schedulers = self._setup_lr_schedulers(cfg.get("lr_scheduler", None))

        if self._resume_from_checkpoint:
            self._load_training_state()

        self._setup_validation(cfg)
        self._profiler = self._setup_profiler(cfg.get(PROFILER_KEY, None))

        self._hidden_cache: Optional[HiddenStateCache] = None
        if self._cache_hidden:
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
        self._head_param_names, self._lora_param_names = sorted(head_names), sorted(lora_names)
        self._lora_rank = self._lora_alpha = None
        for m in model.modules():
            if isinstance(m, (LoRALinear, DoRALinear)):
                self._lora_rank, self._lora_alpha = m.rank, m.alpha
                break

        if self._compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if self._enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})

        self._sharded = self.world_size > 1
        if self._sharded:
            device_mesh = dist.init_device_mesh(
                self._device.type, mesh_shape=(self.world_size,), mesh_dim_names=("dp",)
            )
            names = cfg.get("custom_sharded_layers", None)
            training.shard_model(
                model=model,
                shard_conditions=[
                    partial(training.get_shard_conditions, names_to_match=names),
                    medusa_shard_condition,
                    output_shard_condition,
                ],
                cpu_offload=self.fsdp_cpu_offload,
                reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
                dp_mesh=device_mesh["dp"],
            )
        self._unshard_root_for_loss = self._sharded and not isinstance(model.output, nn.Module)

        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()
        if lora_names:
            # LoRA params are not in the base checkpoint. Initialise them as torchtune's LoRALinear does (A:
            # kaiming-uniform, B: zeros) but as full tensors from a generator seeded with the config seed, so
            # that the initial adapters are the same for any number of processes (torchtune's LoRA recipe
            # initialises each rank's shard from that rank's RNG instead).
            gen = torch.Generator().manual_seed(int(self.seed))
            for name, p in model.named_parameters():
                if name not in lora_names or name in model_state_dict:
                    continue
                full = torch.zeros(p.shape, dtype=torch.float32)
                if "lora_a" in name:
                    nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
                elif "magnitude" in name:
                    full.fill_(1.0)  # replaced by initialize_dora_magnitude below
                model_state_dict[name] = full.to(self._dtype)
        training.load_from_full_model_state_dict(
            model, model_state_dict, self._device, strict=True, cpu_offload=self.fsdp_cpu_offload
        )
        if lora_names:
            for m in model.modules():
                if hasattr(m, "initialize_dora_magnitude"):
                    m.initialize_dora_magnitude()
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
        heads = [p for n, p in named if n.startswith("medusa_heads.")]
        others = [p for n, p in named if not n.startswith("medusa_heads.")]
        head_lr = base_lr * self._medusa_lr_multiplier
        if self._optimizer_in_bwd:
            optim_dict = {}
            for p in others:
                optim_dict[p] = config.instantiate(cfg_optimizer, [p])
            for p in heads:
                optim_dict[p] = config.instantiate(cfg_optimizer, [{"params": [p], "lr": head_lr}])
            training.register_optim_in_bwd_hooks(model=self._model, optim_dict=optim_dict)
            self._optimizers = list(optim_dict.values())
        else:
            groups = []
            if others:
                groups.append({"params": others, "lr": base_lr})
            groups.append({"params": heads, "lr": head_lr})
            self._optimizers = [config.instantiate(cfg_optimizer, groups)]
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

    def _build_dataset(self, cfg_dataset):
        if isinstance(cfg_dataset, ListConfig):
            ds = ConcatDataset(datasets=[config.instantiate(c, self._tokenizer) for c in cfg_dataset])
            packed = getattr(ds, "packed", False)
        else:
            ds = config.instantiate(cfg_dataset, self._tokenizer)
            packed = cfg_dataset.get("packed", False)
        return ds, packed

    def _make_collate(self, collate_fn: Optional[str], packed: bool):
        if packed:
            base = padded_collate_packed
        else:
            fn = _get_component_from_path(collate_fn or "torchtune.data.padded_collate_sft")
            base = partial(fn, padding_idx=self._tokenizer.pad_id, ignore_idx=self._ignore_index)
        return indexed_collate(base)

    def _setup_data(self, cfg_dataset, shuffle: bool, batch_size: int, collate_fn: Optional[str]):
        ds, packed = self._build_dataset(cfg_dataset)
        ds = IndexedDataset(ds)
        collate = self._make_collate(collate_fn, packed)
        sampler = StatefulDistributedSampler(
            ds, num_replicas=self.dp_size, rank=self.dp_rank, shuffle=shuffle, seed=self.seed
        )
        dataloader = StatefulDataLoader(
            dataset=ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True
        )
        utils.log_rank_zero(log, f"Dataset: {len(ds)} samples, {len(dataloader)} batches per rank and epoch")
        return dataloader, ds, collate

    def _setup_validation(self, cfg: DictConfig) -> None:
        val = cfg.get("validation", None)
        self._val_cfg = val
        self._val_batches: List[Dict[str, torch.Tensor]] = []
        self._val_prompts: List[List[int]] = []
        self._medusa_choices = None
        if val is None:
            return
        self._val_every = val.get("every_n_steps", None)
        if val.get("dataset", None) is not None:
            ds, packed = self._build_dataset(val.dataset)
            collate = self._make_collate(cfg.get("collate_fn", None), packed)
            n = min(len(ds), int(val.get("max_samples", 64)))
            sub = torch.utils.data.Subset(IndexedDataset(ds), list(range(n)))
            sampler = DistributedSampler(sub, num_replicas=self.world_size, rank=self.rank, shuffle=False)
            loader = torch.utils.data.DataLoader(
                sub, batch_size=int(val.get("batch_size", cfg.batch_size)), sampler=sampler, collate_fn=collate
            )
            self._val_batches = list(loader)
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

    def _project_outside_forward(self, hidden: torch.Tensor, head: int) -> torch.Tensor:
        """``model.project`` for callers outside the training loss (validation): a tied output under FSDP needs
        the root unit's parameters gathered (the loop reshards them afterwards)."""
        if head == 0 and self._unshard_root_for_loss:
            self._model.unshard()
        return self._model.project(hidden, head)

    def _teacher_project(self, hidden: torch.Tensor, head: int) -> torch.Tensor:
        with disable_adapter(self._model):
            return self._model.project(hidden, head)

    def _fill_hidden_cache(self, cfg: DictConfig, batch_size: int) -> None:
        dim = self._model.norm.scale.shape[-1] if hasattr(self._model.norm, "scale") else None
        max_bytes = float(cfg.get("hidden_cache_max_gb", 4.0)) * 2**30
        if dim is not None:
            need = HiddenStateCache.estimate_bytes(self._dataset, dim, self._dtype)
            if need > max_bytes:
                utils.log_rank_zero(
                    log,
                    f"cache_hidden_states: the data set needs {need / 2**30:.2f} GiB > hidden_cache_max_gb="
                    f"{max_bytes / 2**30:.2f}; hidden states are computed every step instead",
                )
                return
        store = self._device if cfg.get("hidden_cache_on_device", False) else torch.device("cpu")
        cache = HiddenStateCache(max_bytes=int(max_bytes), store_device=store)
        t0 = time.perf_counter()
        pbar = tqdm(total=len(self._dataset), desc="caching hidden states", disable=not self._is_rank_zero)
        cache.fill(
            self._dataset,
            greedy_fn=self._base_greedy if self._head_targets == "base_greedy" else None,
            collate_fn=self._collate,
            batch_size=batch_size,
            compute_hidden=self._backbone_hidden_no_grad,
            device=self._device,
            rank=self.rank,
            world_size=self.world_size,
            progress=lambda n: pbar.update(n - pbar.n),
        )
        pbar.close()
        if self._unshard_root_for_loss:
            self._model.reshard()
        self._hidden_cache = cache
        utils.log_rank_zero(
            log,
            f"Cached the hidden states of {len(cache)} samples ({cache.nbytes / 2**20:.1f} MiB) in "
            f"{time.perf_counter() - t0:.1f}s",
        )

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
            if self._unshard_root_for_loss:
                # A tied output (TiedLinear) reads the token embedding of the root FSDP unit outside the model's
                # forward: gather the root's (small) parameters for the loss; resharded after backward.
                self._model.unshard()
            out = self._loss_fn(
                hidden,
                labels,
                self._model.project,
                teacher_hidden,
                teacher_project,
                num_heads=self._model.num_medusa_heads,
            )
        else:
            if self._unshard_root_for_loss:
                # A tied output (TiedLinear) reads the token embedding of the root FSDP unit outside the model's
                # forward: gather the root's (small) parameters for the loss; resharded after backward.
                self._model.unshard()
            out = self._loss_fn(hidden, labels, self._model.project, num_heads=self._model.num_medusa_heads)
        return out, labels

    # ------------------------------------------------------------------------------------------------------
    # Training state (resume).

    def _save_training_state(self) -> None:
        """Atomically write ``output_dir/training_state/step_N`` and point ``latest`` at it (all ranks take part
        in the gathers; rank 0 writes the shared files, every rank its dataloader and RNG state)."""
        t0 = time.perf_counter()
        weights = gather_full_tensors(self._trainable_named_params(), self._is_rank_zero)
        opt_state = save_optimizer_state(self._optimizers, self._param_names, self._is_rank_zero)
        root = self._output_dir / TRAINING_STATE_DIR
        name = f"step_{self.global_step:07d}"
        rank_state = {
            "dataloader": self._dataloader.state_dict() if self._epoch_step > 0 else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self._device.type == "cuda" else None,
        }
        # every rank writes its own file into a shared staging dir created by rank 0
        staging = root / f".staging_{name}"
        if self._is_rank_zero:
            staging.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        torch.save(rank_state, staging / f"rank_{self.rank}.pt")
        dist.barrier()
        if self._is_rank_zero:
            with atomic_directory(root / name) as tmp:
                torch.save(weights, tmp / "trainable.pt")
                torch.save(opt_state, tmp / "optimizer.pt")
                torch.save(
                    {
                        "seed": self.seed,
                        "epochs_run": self.epochs_run,
                        "epoch_step": self._epoch_step,
                        "global_step": self.global_step,
                        "total_epochs": self.total_epochs,
                        **self._resume_settings(self._cfg),
                        "num_samples": len(self._dataset),
                        "world_size": self.world_size,
                        "medusa_version": self._medusa_version,
                        "num_heads": self._model.num_medusa_heads,
                        "lr_schedulers": [s.state_dict() for s in self._lr_schedulers],
                    },
                    tmp / "recipe_state.pt",
                )
                for f in staging.iterdir():
                    os.replace(f, tmp / f.name)
            staging.rmdir()
            pointer = root / "latest"
            tmp_ptr = root / ".latest.tmp"
            tmp_ptr.write_text(name + "\n")
            os.replace(tmp_ptr, pointer)
            states = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
            for old in states[: max(0, len(states) - int(self._keep_last_n))]:
                if old.name != name:
                    import shutil

                    shutil.rmtree(old, ignore_errors=True)
            log.info(f"Saved training state {root / name} in {time.perf_counter() - t0:.2f}s")
        dist.barrier()

    def _load_training_state(self) -> None:
        """Load the training state checked by :meth:`_check_training_state` into the model, optimizers, LR
        schedulers, counters, dataloader and RNG."""
        path, state = self._resume_dir, self._resume_state
        weights = load_training_state_file(path, "trainable.pt")
        load_full_tensors_inplace(self._model, weights, self._device)
        load_optimizer_state(
            self._optimizers, load_training_state_file(path, "optimizer.pt"), self._param_names, self._device
        )
        for sched, sd in zip(self._lr_schedulers, state["lr_schedulers"]):
            sched.load_state_dict(sd)
        self.epochs_run = state["epochs_run"]
        self._epoch_step = state["epoch_step"]
        self.global_step = state["global_step"]
        rank_state = load_training_state_file(path, f"rank_{self.rank}.pt")
        self._dataloader_state = rank_state["dataloader"]
        torch.set_rng_state(rank_state["rng"])
        if rank_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
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
                hidden_fn=self._backbone_hidden_no_grad,
                project=self._project_outside_forward,
                num_heads=self._model.num_medusa_heads,
                ignore_index=self._ignore_index,
                topk=topk,
                num_chunks=getattr(self._loss_fn, "num_output_chunks", 8),
                device=self._device,
                world_size=self.world_size,
            )
            if self._unshard_root_for_loss:
                self._model.reshard()
            metrics.update(res["metrics"])
            agreement = res["agreement"]
        num_nodes = self._val_cfg.get("calibrate_tree_nodes", None)
        measure_cost = self._val_cfg.get("tree_cost", "none") == "measured"
        if agreement is not None and num_nodes and not measure_cost:
            tree = tree_of_size(agreement, int(num_nodes))
            if tree:
                self._calibrated_tree = tree
        # real tree decoding on rank 0 with an unsharded model
        # the same decision on every rank: under FSDP the unsharded copy is gathered collectively
        if int(self._val_cfg.get("num_prompts", 0)) > 0:
            decode_model = self._unsharded_model_for_decoding()
            if self._is_rank_zero and agreement is not None and num_nodes and measure_cost:
                self._calibrated_tree = self._calibrate_tree_for_speed(decode_model, agreement, int(num_nodes))
            if self._is_rank_zero and self._val_prompts:
                choices = self._medusa_choices
                calibrated = getattr(self, "_calibrated_tree", None)
                if self._val_cfg.get("decode_with_calibrated_tree", True) and calibrated is not None:
                    choices = calibrated
                metrics.update(
                    evaluate_decoding(
                        decode_model,
                        self._val_prompts,
                        max_new_tokens=int(self._val_cfg.get("max_new_tokens", 64)),
                        medusa_choices=choices,
                        stop_tokens=getattr(self._tokenizer, "stop_tokens", ()),
                    )
                )
                metrics["val/tree_nodes"] = len(choices) if not isinstance(choices, str) else choices
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
        self._last_val_metrics = metrics
        self._last_agreement = agreement
        return metrics

    def _calibrate_tree_for_speed(self, model: nn.Module, agreement, max_nodes: int) -> List[List[int]]:
        """The tree with the most expected tokens per second on this machine: the measured agreement table and
        the measured cost of T-token tree steps (possibly the empty tree, when plain decoding is faster).

        Steps are timed as decoding will run them: in ``validation.decode_dtype`` (default auto: bf16 where the
        hardware computes it natively) and, on CPU, with the decoding thread count (every core but one). They
        are timed eagerly: compiling every size would cost minutes here."""
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_nodes + 1} & set(range(1, max_nodes + 2)))
        dtype = decode_dtype(str(self._val_cfg.get("decode_dtype", "auto")), self._device)
        timed = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
        threads = torch.get_num_threads()
        if self._device.type == "cpu":
            torch.set_num_threads(decode_threads("auto"))
        try:
            step_cost = measure_step_cost(
                timed, sizes, context_len=int(self._val_cfg.get("max_prompt_len", 128)), repeats=5
            )
        finally:
            torch.set_num_threads(threads)
        del timed
        best = calibrate_tree(agreement, step_cost, max_nodes=max_nodes)
        cost_ms = {t: round(c * 1e3, 2) for t, c in step_cost.items()}
        log.info(
            f"Tree calibrated on measured step costs: {len(best.medusa_choices)} nodes, expected tau "
            f"{best.expected_tokens_per_step:.2f}, step cost (ms) by tree tokens {cost_ms}"
        )
        return best.medusa_choices

    def _unsharded_model_for_decoding(self) -> Optional[nn.Module]:
        """The model itself when unsharded; under FSDP, rank 0 gets an unsharded copy built from the gathered
        full state dict (simple and correct; needs the whole model in rank 0's memory), others None."""
        if not self._sharded:
            return self._model
        sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        if not self._is_rank_zero:
            return None
        cfg_model = OmegaConf.create(OmegaConf.to_container(self._cfg.model, resolve=True))
        if "quantize_base" in cfg_model:
            cfg_model.quantize_base = False
        with training.set_default_dtype(self._dtype), self._device:
            copy = config.instantiate(cfg_model)
        copy.load_state_dict(sd, strict=False)
        return copy.eval()

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
        tokens_trained = 0
        self._last_val_metrics = {}
        self._last_agreement = None
        last_train_metrics: Dict[str, float] = {}
        current_stage = stage_at(self._stages, self.global_step)
        val_every = getattr(self, "_val_every", None)

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
                if self._unshard_root_for_loss:
                    self._model.reshard()

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
                tokens_trained += n_tok
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
                if val_every and self.global_step % int(val_every) == 0 and not last_step:
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
            "train_tokens": tokens_trained,
            "train_tokens_per_second": tokens_trained / max(train_time, 1e-9),
            "world_size": self.world_size,
            "train": {k: v for k, v in last_train_metrics.items()},
            "validation": {k: v for k, v in final_val.items() if isinstance(v, (int, float, str))},
        }
        if getattr(self, "_calibrated_tree", None) is not None:
            self._final_metrics["medusa_choices"] = self._calibrated_tree
        if self._last_agreement is not None:
            self._final_metrics["agreement_table"] = self._last_agreement
        self.save_checkpoint(epoch=self.epochs_run - 1)

    def save_checkpoint(self, epoch: int) -> None:
        """Write the final HF-format checkpoint (LoRA merged), head sidecar, calibrated tree, optional vLLM heads
        and ``metrics.json``; the epoch directory appears atomically."""
        t0 = time.perf_counter()
        sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        if self._is_rank_zero:
            ckpt = {}
            # gather_cpu_state_dict returns the live tensors for unsharded CPU models, and the LoRA merge works in
            # place: copy first so that the model being trained is never touched
            sd = {k: v.clone() for k, v in sd.items()}
            if self._lora_param_names:
                adapter_sd = get_adapter_state_dict(sd)
                sd = get_merged_lora_ckpt(sd, rank=self._lora_rank, alpha=self._lora_alpha)
                ckpt[training.ADAPTER_KEY] = adapter_sd
                ckpt[training.ADAPTER_CONFIG] = {
                    "r": self._lora_rank,
                    "lora_alpha": self._lora_alpha,
                    "target_modules": sorted({n.split(".")[-3] for n in self._lora_param_names if "lora_a" in n}),
                    "peft_type": "LORA",
                }
            ckpt[training.MODEL_KEY] = sd
            final_dir = self._output_dir / f"epoch_{epoch}"
            real_out = getattr(self._checkpointer, "_output_dir", None)
            with atomic_directory(final_dir) as tmp:
                self._checkpointer._output_dir = Path(tmp)
                try:
                    self._checkpointer.save_checkpoint(ckpt, epoch=epoch, intermediate_checkpoint=False)
                finally:
                    self._checkpointer._output_dir = real_out
                written = Path(tmp) / f"epoch_{epoch}"
                if written.is_dir():  # flatten tmp/epoch_N/* into tmp/*
                    for f in written.iterdir():
                        os.replace(f, Path(tmp) / f.name)
                    written.rmdir()
                tree = getattr(self, "_calibrated_tree", None)
                if tree is not None:  # an empty tree says plain decoding is fastest
                    write_json_atomic(Path(tmp) / "medusa_choices.json", {"medusa_choices": tree})
                if self._cfg.get("export_vllm", False):
                    self._export_vllm(sd, Path(tmp) / "vllm_medusa")
            self._final_metrics["output_dir"] = str(final_dir)
            write_json_atomic(self._output_dir / "metrics.json", self._final_metrics)
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
