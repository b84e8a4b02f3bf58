# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The config checks of ``medusa_finetune`` that must fail before any heavy work (model build, checkpoint load,
tokenisation): unknown keys (with the nearest valid one), counts and rates, Medusa version against LoRA options,
stages, decode settings, data files, checkpoint folders and the head count of a head checkpoint that would be
loaded."""

import difflib
import inspect
import os
from pathlib import Path
from typing import Any, List, Optional, Set

from omegaconf import DictConfig, ListConfig
from torchtune.config._utils import _get_component_from_path
from torchtune.training import PROFILER_KEY

from torchtune_medusa.data._utils import check_local_data_file
from torchtune_medusa.generation._lookup import check_lookup_tokens, DEFAULT_LOOKUP_TOKENS
from torchtune_medusa.generation._settings import DTYPES
from torchtune_medusa.training._checkpointer import num_heads_in_sidecar
from torchtune_medusa.training._stages import parse_stages
from torchtune_medusa.training._validation import calibration_compile

__all__ = [
    "COMPONENT_KEYS",
    "RECIPE_KEYS",
    "TREE_COSTS",
    "VALIDATION_KEYS",
    "check_config",
    "check_config_keys",
    "check_numbers",
]

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
        "truncated_vocab_size",
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
        "decode_compile",
        "decode_dtype",
        "decode_with_calibrated_tree",
        "decode_only_at_end",
        "every_n_steps",
        "lookup_tokens",
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
            checkpoint in the checkpoint directories, an empty data file or an unreadable head checkpoint,
            ``head_targets`` or ``cache_hidden_states`` with Medusa-2, optimizer-in-backward with gradient
            accumulation or clipping.
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
    head_targets = cfg.get("head_targets", "labels")
    if head_targets not in ("labels", "base_greedy"):
        raise ValueError(f"head_targets must be 'labels' or 'base_greedy', got {head_targets!r}")
    if head_targets == "base_greedy" and version != 1:
        raise ValueError(
            "head_targets=base_greedy is a Medusa-1 option (frozen base); for Medusa-2 use "
            "MedusaSelfDistillationLoss(head_target=teacher_argmax)"
        )
    if cfg.get("cache_hidden_states", False) and version != 1:
        raise ValueError("cache_hidden_states needs a frozen backbone: it is a Medusa-1 (medusa_version=1) option")
    if cfg.get("optimizer_in_bwd", False) and (
        cfg.get("clip_grad_norm", None) is not None or cfg.get("gradient_accumulation_steps", 1) > 1
    ):
        raise ValueError("optimizer_in_bwd does not support clip_grad_norm or gradient_accumulation_steps > 1")
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
    if val is not None:
        check_lookup_tokens(val.get("lookup_tokens", DEFAULT_LOOKUP_TOKENS), "validation.lookup_tokens")
        try:
            calibration_compile(val.get("decode_compile", "auto"), "cpu")
        except ValueError as e:
            raise ValueError(f"validation.decode_compile: {e}") from None
    if val is not None and val.get("dataset", None) is not None:
        datasets.append(val.dataset)
    for ds in datasets:
        for key in ("data_files", "text_files"):
            _check_data_files(ds.get(key, None))
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
    head_type = cfg.model.get("medusa_head_type", "medusa")
    ck_type = cfg.checkpointer.get("medusa_head_type", "medusa")
    if head_type != ck_type:
        raise ValueError(
            f"model.medusa_head_type={head_type!r} but checkpointer.medusa_head_type={ck_type!r}; they must agree "
            f"(set checkpointer.medusa_head_type: ${{model.medusa_head_type}})"
        )
    if head_type == "hydra" and cfg.get("export_vllm", False):
        raise ValueError(
            "export_vllm=True but model.medusa_head_type='hydra': vLLM loads plain Medusa heads only; set "
            "export_vllm=False, or medusa_head_type='medusa' for heads that vLLM will serve"
        )
    for d in (cfg.checkpointer.get("medusa_checkpoint_dir", None), ckpt_dir):
        if d is None:
            continue
        found = num_heads_in_sidecar(Path(str(d)))
        if found is not None and want is not None and found != int(want):
            raise ValueError(
                f"the head checkpoint in {d} has {found} Medusa heads but model.medusa_num_heads={want}; set "
                f"model.medusa_num_heads={found} (and checkpointer.medusa_num_heads), or point "
                "checkpointer.medusa_checkpoint_dir elsewhere to start new heads"
            )
        if found is not None:
            break


def _check_data_files(files: Any) -> None:
    """Refuse a missing local data file (URLs and glob patterns are left to the loader)."""
    if files is None:
        return
    files = [files] if isinstance(files, str) else list(files.values() if isinstance(files, DictConfig) else files)
    for f in map(str, files):
        if "://" in f or any(c in f for c in "*?["):
            continue
        if not os.path.exists(f):
            hint = " (run `python -m torchtune_medusa.assets prepare` for the offline assets)" if "medusa" in f else ""
            raise FileNotFoundError(f"dataset file not found: {f}{hint}")
        check_local_data_file("medusa_finetune", f)
