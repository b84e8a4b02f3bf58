# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Medusa head checkpoint formats: import and export.

Inside this package the heads are the ``medusa_heads.*`` part of a :class:`MedusaTransformerDecoder` state dict;
without the prefix this is exactly FasterDecoding's layout: ``{i}.{j}.linear.weight`` ``[D, D]`` and
``{i}.{j}.linear.bias`` ``[D]`` for block ``j < L`` of head ``i``, and ``{i}.{L}.weight`` ``[V, D]`` for a
head's own projection. The formats on disk:

==================== ================================ ===================== =========================================
format               weights file                     config file           notes
==================== ================================ ===================== =========================================
``torchtune``        ``medusa_lm_head.safetensors``   ``medusa_config.json`` FasterDecoding keys, either layout; what
                                                                            :class:`MedusaHFCheckpointer` writes
``fasterdecoding_v1`` ``medusa_lm_head.safetensors``  ``config.json``       own projections (a shared model needs
                                                                            ``base_output_weight``, copied per head)
``fasterdecoding_v2`` ``medusa_lm_head.safetensors``  ``config.json``       blocks only, ``"version": "2"``
``vllm``             ``model.safetensors``            ``config.json``       ``blocks.{i}.layers.{j}.weight|bias``,
                                                                            ``lm_heads.{i}.weight``; biases kept
                                                                            (``medusa_fc_bias: true``); shared:
                                                                            ``original_lm_head: true`` and
                                                                            ``lm_heads.0.weight`` = base output
``tgi_v1``           as ``fasterdecoding_v1``         ``config.json``       needs ``base_model_name_or_path``
``tgi_v2``           as ``fasterdecoding_v2``         ``config.json``       needs ``base_model_name_or_path``, L == 1
``tensorrt_llm``     as ``fasterdecoding_v1``         ``config.json``       own projections required
==================== ================================ ===================== =========================================

FasterDecoding configs carry ``medusa_num_heads``, ``medusa_num_layers``, ``base_model_name_or_path`` and, from
us, ``hidden_size`` and ``vocab_size`` (never ``architectures``: TGI would take the folder for an MLP
speculator).

Note:
    FasterDecoding's own code repeats *one* residual block L times in a head (shared weights); the files
    nevertheless store ``{i}.{j}.linear.*`` for every j, and we load each j into its own independent block.
    With L == 1 (every released checkpoint) there is no difference.
"""

import json
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import safe_open, SafetensorError
from safetensors.torch import load_file
from torch import nn

from torchtune_medusa._files import (
    HF_CONFIG_FILE,
    MEDUSA_CONFIG_FILE,
    MEDUSA_HEADS_FILE,
    save_safetensors,
    VLLM_WEIGHTS_FILE,
    write_json,
)

#: The head sidecar (the name is owned by :mod:`torchtune_medusa._files`).
HEAD_FILE = MEDUSA_HEADS_FILE
LEGACY_HEAD_FILE = "medusa_lm_head.pt"
PREFIX = "medusa_heads."
#: The heads' token map (truncated vocabulary), as vLLM names it: ``medusa_heads.token_map`` in a state dict.
TOKEN_MAP_KEY = "token_map"

HEAD_FORMATS = (
    "torchtune",
    "fasterdecoding_v1",
    "fasterdecoding_v2",
    "vllm",
    "tgi_v1",
    "tgi_v2",
    "tensorrt_llm",
)
_ALIASES = {
    "ours": "torchtune",
    "fd_v1": "fasterdecoding_v1",
    "fd_v2": "fasterdecoding_v2",
    "fd1": "fasterdecoding_v1",
    "fd2": "fasterdecoding_v2",
    "tgi1": "tgi_v1",
    "tgi2": "tgi_v2",
    "trtllm": "tensorrt_llm",
    "trt_llm": "tensorrt_llm",
}
_OWN_FORMATS = ("fasterdecoding_v1", "tgi_v1", "tensorrt_llm")
_SHARED_FORMATS = ("fasterdecoding_v2", "tgi_v2")

_FD_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
_VLLM_KEY = re.compile(r"^(?:blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)|lm_heads\.(\d+)\.weight|lm_head\.weight)$")
_FD_EXPECTED = "'{i}.{j}.linear.weight', '{i}.{j}.linear.bias' (block j of head i) or '{i}.{L}.weight' (projection)"
_VLLM_EXPECTED = "'blocks.{i}.layers.{j}.weight|bias', 'lm_heads.{i}.weight' or 'lm_head.weight'"


@dataclass(frozen=True)
class MedusaHeadConfig:
    """Shape of a set of Medusa heads.

    Attributes:
        num_heads (int): heads K.
        num_layers (int): residual blocks per head L.
        hidden_size (int): hidden size D of the backbone.
        vocab_size (Optional[int]): vocabulary size V (None only for shared heads read from a file that does
            not record it).
        projection (str): ``"own"`` or ``"shared"``.
        base_model_name_or_path (Optional[str]): the base model, as FasterDecoding records it.
        truncated_vocab_size (Optional[int]): N when the heads score only the N tokens of a ``token_map`` (vLLM's
            name; own projections then have N rows), None when they score the whole vocabulary.
        head_type (str): ``"medusa"``, or ``"hydra"`` when head k's first block also reads k token embeddings
            (weight ``[D, (k + 1) D]``); only the ``torchtune`` format holds Hydra heads.
    """

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: Optional[int]
    projection: str
    base_model_name_or_path: Optional[str] = None
    truncated_vocab_size: Optional[int] = None
    head_type: str = "medusa"

    def fasterdecoding_json(self) -> Dict[str, Any]:
        """FasterDecoding-style config (also read by TGI and TensorRT-LLM)."""
        out: Dict[str, Any] = {
            "medusa_num_heads": self.num_heads,
            "medusa_num_layers": self.num_layers,
            "base_model_name_or_path": self.base_model_name_or_path,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
        }
        if self.projection == "shared":
            out["version"] = "2"
        return out

    def torchtune_json(self) -> Dict[str, Any]:
        """Our ``medusa_config.json``: FasterDecoding's keys plus ``medusa_projection`` (and vLLM's
        ``truncated_vocab_size`` for heads with a token map)."""
        out = {**self.fasterdecoding_json(), "medusa_projection": self.projection}
        if self.truncated_vocab_size is not None:
            out["truncated_vocab_size"] = self.truncated_vocab_size
        if self.head_type != "medusa":
            out["medusa_head_type"] = self.head_type
        return out


def _unreadable(path: Path, error: Exception) -> ValueError:
    kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
    return ValueError(
        f"{path} is not a readable {kind} file, it is truncated or corrupt ({type(error).__name__}: {error}); "
        "copy or export it again"
    )


def _load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors or ``torch.save`` file.

    Raises:
        ValueError: the file is truncated or corrupt (the message names it), or not a flat state dict.
    """
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise _unreadable(path, e) from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise _unreadable(path, e) from e
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return dict(sd)


def safetensors_keys(path: Union[str, Path]) -> List[str]:
    """The tensor names of a safetensors file, without reading the tensors.

    Raises:
        ValueError: the file is truncated or corrupt (the message names it).
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise _unreadable(path, e) from e


def export_files(format: str) -> Tuple[str, str]:
    """The files :func:`export_heads` writes for ``format``: ``(weights file, config file)``."""
    fmt = _canonical_format(format)
    if fmt == "vllm":
        return VLLM_WEIGHTS_FILE, HF_CONFIG_FILE
    return HEAD_FILE, MEDUSA_CONFIG_FILE if fmt == "torchtune" else HF_CONFIG_FILE


def is_head_file(path: Union[str, Path]) -> bool:
    """Whether a file holds Medusa heads or a Medusa config and nothing else, so that replacing it loses nothing
    but heads: a safetensors file whose keys are all head keys (any format), or a JSON config with Medusa fields.
    A file that cannot be read is not a head file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            keys = safetensors_keys(path)
            fd_keys = _strip_prefix(dict.fromkeys(keys))
            return bool(keys) and (all(_FD_KEY.match(k) for k in fd_keys) or all(_VLLM_KEY.match(k) for k in fd_keys))
        if path.suffix == ".json":
            cfg = _read_json(path)
            return isinstance(cfg, dict) and (
                "medusa_num_heads" in cfg or cfg.get("model_type") == "medusa" or "medusa_projection" in cfg
            )
    except (ValueError, OSError):
        return False
    return False


def _check_overwrite(out_dir: Path, names: Tuple[str, ...]) -> None:
    """Refuse to replace a file of ``out_dir`` that is not a head file (e.g. a base model's ``model.safetensors``
    or ``config.json``)."""
    foreign = [name for name in names if (out_dir / name).exists() and not is_head_file(out_dir / name)]
    if foreign:
        raise FileExistsError(
            f"{out_dir} already holds {', '.join(foreign)}, which {'is' if len(foreign) == 1 else 'are'} not Medusa "
            "head files (a base model's files?) and will not be overwritten; write the heads to another folder"
        )


# ------------------------------------------------------------------------------------- layout (FD keys) helpers


def _canonical_format(fmt: str) -> str:
    f = fmt.strip().lower().replace("-", "_")
    f = _ALIASES.get(f, f)
    if f not in HEAD_FORMATS:
        raise ValueError(f"unknown Medusa head format {fmt!r}; choose one of {', '.join(HEAD_FORMATS)}")
    return f


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Heads part of a state dict, FasterDecoding keys (prefix ``medusa_heads.`` / ``medusa_head.`` removed).

    A dict without any prefixed key is taken to be in FasterDecoding layout already.
    """
    for prefix in (PREFIX, "medusa_head."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def infer_head_config(
    fd_sd: Mapping[str, torch.Tensor],
    *,
    vocab_size: Optional[int] = None,
    base_model_name_or_path: Optional[str] = None,
    source: str = "state dict",
) -> MedusaHeadConfig:
    """Check that FasterDecoding-layout head tensors form K complete heads and return their shape.

    Args:
        fd_sd (Mapping[str, torch.Tensor]): head tensors without prefix.
        vocab_size (Optional[int]): vocabulary size, needed only for shared heads (checked for own heads).
        base_model_name_or_path (Optional[str]): recorded in the result.
        source (str): what to call the input in error messages.

    Returns:
        MedusaHeadConfig: the heads' shape.

    Raises:
        ValueError: unknown keys, missing keys, inconsistent shapes, or an own projection on some heads only.
    """
    if not fd_sd:
        raise ValueError(f"{source} holds no Medusa head tensors (expected keys {_FD_EXPECTED})")
    token_map = fd_sd.get(TOKEN_MAP_KEY)
    if token_map is not None:
        _check_token_map(token_map, vocab_size, source)
    entries: Dict[int, Dict[int, Dict[str, torch.Tensor]]] = {}
    for key, value in fd_sd.items():
        if key == TOKEN_MAP_KEY:
            continue
        m = _FD_KEY.match(key)
        if m is None:
            raise ValueError(f"unexpected key {key!r} in {source}; expected {_FD_EXPECTED}")
        i, j, kind = int(m.group(1)), int(m.group(2)), m.group(3)
        entries.setdefault(i, {}).setdefault(j, {})[kind] = value
    num_heads = len(entries)
    if sorted(entries) != list(range(num_heads)):
        raise ValueError(f"{source}: head indices must be 0..K-1 without gaps, found {sorted(entries)}")
    layouts = set()
    head_types = set()
    hidden_size = None
    vocab = vocab_size
    for i, blocks in sorted(entries.items()):
        idx = sorted(blocks)
        if idx != list(range(len(idx))):
            raise ValueError(f"{source}: head {i} has block indices {idx}; expected 0..L (no gaps)")
        last = blocks[idx[-1]]
        has_proj = set(last) == {"weight"}
        n_blocks = len(idx) - 1 if has_proj else len(idx)
        for j in range(n_blocks):
            kinds = blocks[j]
            if set(kinds) != {"linear.weight", "linear.bias"}:
                missing = {"linear.weight", "linear.bias"} - set(kinds)
                raise ValueError(
                    f"{source}: head {i} block {j} is incomplete: has {sorted(kinds)}, missing "
                    f"{sorted(f'{i}.{j}.{m}' for m in missing) or 'nothing'}; only the last index of a head may be "
                    f"its projection '{i}.{{L}}.weight'"
                )
            w, b = kinds["linear.weight"], kinds["linear.bias"]
            if hidden_size is None:
                hidden_size = w.shape[0]
            # a Hydra head i (0-based) reads i + 1 token embeddings besides the hidden state in its first block
            inputs = (hidden_size, hidden_size * (i + 2)) if j == 0 else (hidden_size,)
            if (
                w.dim() != 2
                or w.shape[0] != hidden_size
                or w.shape[1] not in inputs
                or tuple(b.shape) != (hidden_size,)
            ):
                raise ValueError(
                    f"{source}: '{i}.{j}.linear.weight' has shape {tuple(w.shape)} and bias {tuple(b.shape)}; "
                    f"expected ({hidden_size}, {hidden_size}) and ({hidden_size},) (hidden size {hidden_size})"
                    + (f", or ({hidden_size}, {hidden_size * (i + 2)}) for a Hydra head" if j == 0 else "")
                )
            if j == 0:
                head_types.add("hydra" if w.shape[1] != hidden_size else "medusa")
        if has_proj:
            p = last["weight"]
            if hidden_size is None:
                hidden_size = p.shape[-1]
            if vocab is None and token_map is None:
                vocab = p.shape[0]
            rows = vocab if token_map is None else token_map.numel()
            if p.dim() != 2 or tuple(p.shape) != (rows, hidden_size):
                what = "vocab size" if token_map is None else "tokens in token_map"
                raise ValueError(
                    f"{source}: projection '{i}.{n_blocks}.weight' has shape {tuple(p.shape)}; expected "
                    f"({rows}, {hidden_size}) ({what}, hidden size)"
                )
        layouts.add((n_blocks, has_proj))
    if len(layouts) != 1:
        raise ValueError(
            f"{source}: heads differ in layout (blocks per head, own projection): {sorted(layouts)}; all heads must "
            "have the same number of blocks and either all or none must have an own projection"
        )
    ((num_layers, has_proj),) = layouts
    if len(head_types) > 1:
        raise ValueError(f"{source}: some heads are Hydra heads (their first block reads token embeddings), some not")
    if hidden_size is None:
        raise ValueError(f"{source}: heads have neither blocks nor projections; nothing to convert")
    return MedusaHeadConfig(
        num_heads=num_heads,
        num_layers=num_layers,
        hidden_size=int(hidden_size),
        vocab_size=None if vocab is None else int(vocab),
        projection="own" if has_proj else "shared",
        base_model_name_or_path=base_model_name_or_path,
        truncated_vocab_size=None if token_map is None else int(token_map.numel()),
        head_type=head_types.pop() if head_types else "medusa",
    )


def _check_token_map(token_map: torch.Tensor, vocab_size: Optional[int], source: str) -> None:
    ok = token_map.dim() == 1 and token_map.numel() > 0 and not token_map.is_floating_point()
    if ok and token_map.numel() > 1:
        ok = bool((token_map[1:] > token_map[:-1]).all())
    if not ok:
        raise ValueError(f"{source}: '{TOKEN_MAP_KEY}' must be a 1-D tensor of sorted, distinct token ids")
    if int(token_map[0]) < 0 or (vocab_size is not None and int(token_map[-1]) >= vocab_size):
        raise ValueError(
            f"{source}: '{TOKEN_MAP_KEY}' holds ids outside the vocabulary 0..{vocab_size}: made for another tokenizer"
        )


def base_output_weight_of(model_or_sd: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    """The base model's output weight ``[V, D]`` (``output.weight``, or ``tok_embeddings.weight`` when the output
    is tied) of a torchtune model or state dict, or None when it has neither."""
    if isinstance(model_or_sd, nn.Module):
        out = getattr(model_or_sd, "output", None)
        w = getattr(out, "weight", None)
        if w is None and hasattr(out, "tied_module"):
            w = out.tied_module.weight
        return None if w is None else w.detach()
    for key in ("output.weight", "tok_embeddings.weight"):
        if key in model_or_sd:
            return model_or_sd[key]
    return None


def needs_base_output_weight(cfg: MedusaHeadConfig, format: str) -> bool:
    """Whether writing heads of shape ``cfg`` as ``format`` needs the base model's output weight: shared heads
    written to a format with a projection per head (``fasterdecoding_v1``, ``tgi_v1``, ``tensorrt_llm``) or to
    ``vllm`` (whose file carries the base output layer)."""
    return cfg.projection == "shared" and _canonical_format(format) in _OWN_FORMATS + ("vllm",)


# -------------------------------------------------------------------------------------------------- export


def export_heads(
    state_dict_or_model: Union[nn.Module, Mapping[str, torch.Tensor]],
    out_dir: Union[str, Path],
    format: str = "torchtune",
    *,
    base_output_weight: Optional[torch.Tensor] = None,
    base_model_name_or_path: Optional[str] = None,
    vocab_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> MedusaHeadConfig:
    """Write Medusa heads in a serving format (see the module docstring for the table).

    Args:
        state_dict_or_model: a :class:`MedusaTransformerDecoder`, its (full, gathered) state dict, or a dict
            of head tensors in FasterDecoding layout (with or without the ``medusa_heads.`` prefix).
        out_dir (Union[str, Path]): folder to write to (created; existing head files of the same names are
            replaced atomically, any other file of those names is never touched: ``FileExistsError``).
        format (str): one of :data:`HEAD_FORMATS`. Default ``"torchtune"``.
        base_output_weight (Optional[torch.Tensor]): the base model's output weight ``[V, D]``. Needed to write
            shared heads to a format with per-head projections (``fasterdecoding_v1``, ``tgi_v1``,
            ``tensorrt_llm``: copied into every head, which is the same model) or to ``vllm`` (stored as
            ``lm_heads.0.weight`` with ``original_lm_head: true``). Taken from the model or a full state dict
            when not given.
        base_model_name_or_path (Optional[str]): recorded in the config; required by TGI.
        vocab_size (Optional[int]): vocabulary size for shared heads when it cannot be inferred.
        dtype (Optional[torch.dtype]): cast the tensors (e.g. ``torch.bfloat16``); default keeps theirs.

    Returns:
        MedusaHeadConfig: the shape of the written heads (with the written projection layout).

    Raises:
        ValueError: unknown format, malformed heads, or a layout the format cannot hold.
        FileExistsError: ``out_dir`` holds a file of an output name that is not a head file.
    """
    fmt = _canonical_format(format)
    out_dir = Path(out_dir)
    if isinstance(state_dict_or_model, nn.Module):
        if not hasattr(state_dict_or_model, "medusa_heads"):
            raise ValueError("the model has no 'medusa_heads'; pass a MedusaTransformerDecoder or its state dict")
        fd_sd = {k: v.detach() for k, v in state_dict_or_model.medusa_heads.state_dict().items()}
        if vocab_size is None and len(state_dict_or_model.medusa_heads):
            vocab_size = getattr(state_dict_or_model.medusa_heads[0], "vocab_size", None)
    else:
        fd_sd = _strip_prefix(state_dict_or_model)
    if base_output_weight is None:
        base_output_weight = base_output_weight_of(state_dict_or_model)
    if base_output_weight is not None:
        base_output_weight = base_output_weight.detach().cpu()
        if vocab_size is None:
            vocab_size = base_output_weight.shape[0]
    fd_sd = {k: v.detach().cpu() for k, v in fd_sd.items()}
    if dtype is not None:
        fd_sd = {k: v.to(dtype) for k, v in fd_sd.items()}
        if base_output_weight is not None:
            base_output_weight = base_output_weight.to(dtype)
    cfg = infer_head_config(fd_sd, vocab_size=vocab_size, base_model_name_or_path=base_model_name_or_path)
    if base_output_weight is not None and tuple(base_output_weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(
            f"base_output_weight has shape {tuple(base_output_weight.shape)}; the heads need "
            f"({cfg.vocab_size}, {cfg.hidden_size}) (vocab size, hidden size)"
        )
    K, L = cfg.num_heads, cfg.num_layers
    if cfg.head_type != "medusa" and fmt != "torchtune":
        raise ValueError(
            f"these are {cfg.head_type.capitalize()} heads (head k also reads the k tokens before its target), which "
            f"format {fmt!r} cannot describe: its loaders build plain Medusa heads. Export as 'torchtune' and decode "
            "with this package, or train medusa_head_type='medusa' heads for a serving engine"
        )
    token_map = fd_sd.get(TOKEN_MAP_KEY)
    if token_map is not None and fmt not in ("torchtune", "vllm"):
        raise ValueError(
            f"format {fmt!r} has no place for a token map, and these heads score only the {token_map.numel()} "
            "tokens of one (truncated vocabulary): export as 'vllm' (truncated_vocab_size + token_map) or "
            "'torchtune'"
        )

    if fmt in _OWN_FORMATS and cfg.projection == "shared":
        if base_output_weight is None:
            raise ValueError(
                f"format {fmt!r} needs a vocabulary projection per head, but these heads share the base output "
                "layer (medusa_projection='shared'); pass base_output_weight (the base model's output.weight, "
                "or tok_embeddings.weight when tied) to copy it into every head, or export as 'fasterdecoding_v2' "
                "/ 'tgi_v2' / 'vllm'"
            )
        fd_sd = dict(fd_sd)
        for i in range(K):
            fd_sd[f"{i}.{L}.weight"] = base_output_weight.clone()
        cfg = MedusaHeadConfig(**{**asdict(cfg), "projection": "own"})
    if fmt in _SHARED_FORMATS and cfg.projection == "own":
        raise ValueError(
            f"format {fmt!r} stores only the residual blocks (the base output layer is reused), but these heads "
            "have their own trained projections, which would be lost; export as 'fasterdecoding_v1', 'tgi_v1', "
            "'tensorrt_llm' or 'vllm'"
        )
    if fmt == "tgi_v2" and L != 1:
        raise ValueError(f"TGI's v2 Medusa loader requires medusa_num_layers == 1, these heads have {L}")
    if fmt in ("tgi_v1", "tgi_v2") and not base_model_name_or_path:
        raise ValueError(
            "TGI loads the base model from the Medusa config's 'base_model_name_or_path'; pass "
            "base_model_name_or_path (a hub id or a local folder)"
        )

    if fmt == "vllm":
        tensors: Dict[str, torch.Tensor] = {}
        for i in range(K):
            for j in range(L):
                tensors[f"blocks.{i}.layers.{j}.weight"] = fd_sd[f"{i}.{j}.linear.weight"]
                tensors[f"blocks.{i}.layers.{j}.bias"] = fd_sd[f"{i}.{j}.linear.bias"]
            if cfg.projection == "own":
                tensors[f"lm_heads.{i}.weight"] = fd_sd[f"{i}.{L}.weight"]
        if cfg.projection == "shared":
            if base_output_weight is None:
                raise ValueError(
                    "vLLM's MedusaModel is loaded on its own, so shared heads need the base output weight in the "
                    "file (lm_heads.0.weight with original_lm_head: true); pass base_output_weight"
                )
            if token_map is None:
                tensors["lm_heads.0.weight"] = base_output_weight.clone()
            else:  # the map's rows of the shared output, as every head's own truncated projection
                rows = base_output_weight[token_map.long()]
                for i in range(K):
                    tensors[f"lm_heads.{i}.weight"] = rows.clone()
        if token_map is not None:
            tensors[TOKEN_MAP_KEY] = token_map
        config = {
            "model_type": "medusa",
            "architectures": ["MedusaModel"],
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "num_heads": K,
            "num_hidden_layers": L,
            "truncated_vocab_size": cfg.truncated_vocab_size,
            "original_lm_head": cfg.projection == "shared" and token_map is None,
            "medusa_fc_bias": True,
            "logit_scale": 1.0,
        }
        if base_model_name_or_path:
            config["base_model_name_or_path"] = base_model_name_or_path
        _check_overwrite(out_dir, export_files(fmt))
        save_safetensors(out_dir / VLLM_WEIGHTS_FILE, tensors)
        write_json(out_dir / HF_CONFIG_FILE, config)
        return cfg

    _check_overwrite(out_dir, export_files(fmt))
    save_safetensors(out_dir / HEAD_FILE, fd_sd)
    if fmt == "torchtune":
        write_json(out_dir / MEDUSA_CONFIG_FILE, cfg.torchtune_json())
    else:
        write_json(out_dir / HF_CONFIG_FILE, cfg.fasterdecoding_json())
    return cfg


# -------------------------------------------------------------------------------------------------- import


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or replace the file") from e


def detect_format(path: Union[str, Path]) -> str:
    """Guess the format of a head folder (or weights file): ``torchtune``, ``vllm``, ``fasterdecoding_v1`` or
    ``fasterdecoding_v2`` (TGI and TensorRT-LLM folders are FasterDecoding folders).

    Raises:
        FileNotFoundError: no head weights found.
        ValueError: the keys match no known layout.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        if (folder / MEDUSA_CONFIG_FILE).is_file():
            return "torchtune"
        cfg = _read_json(folder / HF_CONFIG_FILE) or {}
        if cfg.get("model_type") == "medusa" or "MedusaModel" in (cfg.get("architectures") or []):
            return "vllm"
        if "medusa_num_heads" in cfg:
            return "fasterdecoding_v2" if str(cfg.get("version")) == "2" else "fasterdecoding_v1"
        weights = _find_weights(folder)
    else:
        weights = path
    keys = _keys_of(weights)
    if any(k.startswith("blocks.") or k.startswith("lm_heads.") for k in keys):
        return "vllm"
    fd_keys = set(_strip_prefix({k: None for k in keys}))  # type: ignore[arg-type]
    if fd_keys and all(_FD_KEY.match(k) for k in fd_keys):
        has_proj = any(_FD_KEY.match(k).group(3) == "weight" for k in fd_keys)
        return "fasterdecoding_v1" if has_proj else "fasterdecoding_v2"
    raise ValueError(f"cannot tell the Medusa head format of {weights}: keys {sorted(keys)[:6]}...")


def _find_weights(folder: Path) -> Path:
    for name in (HEAD_FILE, VLLM_WEIGHTS_FILE, LEGACY_HEAD_FILE):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"no Medusa head weights in {folder}: expected {HEAD_FILE}, {VLLM_WEIGHTS_FILE} or {LEGACY_HEAD_FILE}"
    )


def _keys_of(path: Path) -> List[str]:
    if path.suffix == ".safetensors":
        return safetensors_keys(path)
    return list(_load_tensors(path))


def import_heads(
    path: Union[str, Path], format: Optional[str] = None
) -> Tuple[Dict[str, torch.Tensor], MedusaHeadConfig]:
    """Read Medusa heads written in any supported format.

    Args:
        path (Union[str, Path]): the head folder (or its weights file).
        format (Optional[str]): one of :data:`HEAD_FORMATS`; None detects it (:func:`detect_format`).

    Returns:
        Tuple[Dict[str, torch.Tensor], MedusaHeadConfig]: the heads as a state dict under ``medusa_heads.*``
        (ready for ``model.load_state_dict(..., strict=False)``) and their shape. Heads stored with the base
        output copied in (vLLM ``original_lm_head``) come back as shared heads; the base weight is not returned.

    Raises:
        FileNotFoundError: no weights found.
        ValueError: unknown keys, inconsistent shapes, or a config that disagrees with the weights (the message
            names the key or field and what was expected).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Medusa heads at {path}")
    fmt = _canonical_format(format) if format else detect_format(path)
    folder = path if path.is_dir() else path.parent
    weights = _find_weights(folder) if path.is_dir() else path
    tensors = _load_tensors(weights)
    source = str(weights)

    if fmt == "vllm":
        cfg_json = _read_json(folder / HF_CONFIG_FILE) or {}
        fd_sd, vocab = _vllm_to_fd(_strip_prefix(tensors), cfg_json, source)
        cfg = infer_head_config(
            fd_sd, vocab_size=vocab, base_model_name_or_path=cfg_json.get("base_model_name_or_path"), source=source
        )
        _check_config(
            cfg, cfg_json, source=str(folder / HF_CONFIG_FILE), heads_key="num_heads", layers_key="num_hidden_layers"
        )
    else:
        cfg_file = folder / (MEDUSA_CONFIG_FILE if fmt == "torchtune" else HF_CONFIG_FILE)
        cfg_json = _read_json(cfg_file) or {}
        fd_sd = _strip_prefix(tensors)
        cfg = infer_head_config(
            fd_sd,
            vocab_size=cfg_json.get("vocab_size"),
            base_model_name_or_path=cfg_json.get("base_model_name_or_path"),
            source=source,
        )
        _check_config(cfg, cfg_json, source=str(cfg_file), heads_key="medusa_num_heads", layers_key="medusa_num_layers")
        want = cfg_json.get("medusa_projection") or (
            "shared" if fmt in _SHARED_FORMATS or str(cfg_json.get("version")) == "2" else None
        )
        if fmt in _OWN_FORMATS and cfg.projection != "own":
            raise ValueError(
                f"{source}: format {fmt!r} needs a projection '{{i}}.{cfg.num_layers}.weight' per head, "
                "none found (a v2 file? use format 'fasterdecoding_v2')"
            )
        if want and want != cfg.projection:
            raise ValueError(
                f"{cfg_file} says projection {want!r} but {source} holds "
                f"{'per-head projections' if cfg.projection == 'own' else 'no projections'} ({cfg.projection!r})"
            )
        if cfg_json.get("medusa_head_type", "medusa") != cfg.head_type:
            raise ValueError(
                f"{cfg_file} says medusa_head_type {cfg_json.get('medusa_head_type', 'medusa')!r} but the first blocks "
                f"in {source} are {cfg.head_type!r} blocks"
            )
    return {PREFIX + k: v for k, v in fd_sd.items()}, cfg


def _check_config(
    cfg: MedusaHeadConfig, cfg_json: Dict[str, Any], *, source: str, heads_key: str, layers_key: str
) -> None:
    checks = ((heads_key, cfg.num_heads), (layers_key, cfg.num_layers), ("hidden_size", cfg.hidden_size))
    for key, actual in checks:
        if cfg_json.get(key) is not None and int(cfg_json[key]) != actual:
            raise ValueError(f"{source}: {key} is {cfg_json[key]} but the weights have {actual}")
    vocab = cfg_json.get("vocab_size")
    if vocab is not None and cfg.vocab_size is not None and vocab != cfg.vocab_size:
        raise ValueError(f"{source}: vocab_size is {cfg_json['vocab_size']} but the weights have {cfg.vocab_size}")


def _vllm_to_fd(
    tensors: Dict[str, torch.Tensor], cfg_json: Dict[str, Any], source: str
) -> Tuple[Dict[str, torch.Tensor], Optional[int]]:
    trunc = cfg_json.get("truncated_vocab_size")
    token_map = tensors.pop(TOKEN_MAP_KEY, None)
    if trunc is not None and trunc != cfg_json.get("vocab_size") and token_map is None:
        raise ValueError(
            f"{source}: truncated_vocab_size is {trunc} but the file has no '{TOKEN_MAP_KEY}' to say which tokens"
        )
    if token_map is not None and trunc is not None and int(trunc) != token_map.numel():
        raise ValueError(f"{source}: truncated_vocab_size is {trunc} but '{TOKEN_MAP_KEY}' has {token_map.numel()}")
    original_lm_head = bool(cfg_json.get("original_lm_head", False))
    blocks: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
    lm_heads: Dict[int, torch.Tensor] = {}
    base_lm_head = None
    for key, value in tensors.items():
        m = _VLLM_KEY.match(key)
        if m is None:
            raise ValueError(f"unexpected key {key!r} in {source}; expected {_VLLM_EXPECTED}")
        if m.group(1) is not None:
            blocks.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = value
        elif m.group(4) is not None:
            lm_heads[int(m.group(4))] = value
        else:
            base_lm_head = value
    fd: Dict[str, torch.Tensor] = {}
    for (i, j), kinds in blocks.items():
        if "weight" not in kinds:
            raise ValueError(f"{source}: 'blocks.{i}.layers.{j}.bias' has no matching weight")
        fd[f"{i}.{j}.linear.weight"] = kinds["weight"]
        # vLLM's default medusa_fc_bias is False: such files have no biases, which equals zero biases.
        w = kinds["weight"]
        fd[f"{i}.{j}.linear.bias"] = kinds.get("bias", torch.zeros(w.shape[0], dtype=w.dtype))
    num_heads = 1 + max([i for i, _ in blocks] + list(lm_heads) + [-1])
    if cfg_json.get("num_heads") is not None:
        num_heads = int(cfg_json["num_heads"])
    num_layers = cfg_json.get("num_hidden_layers")
    vocab = cfg_json.get("vocab_size")
    if original_lm_head:
        w = lm_heads.pop(0, None) if base_lm_head is None else base_lm_head
        if lm_heads:
            raise ValueError(
                f"{source}: original_lm_head is true, so only lm_heads.0.weight is expected; found "
                f"lm_heads.{sorted(lm_heads)}"
            )
        if token_map is not None and w is not None and w.shape[0] == token_map.numel():
            if num_layers is None:  # a truncated original head: every head's own projection
                num_layers = 1 + max([j for _, j in blocks] + [-1])
            for i in range(num_heads):
                fd[f"{i}.{num_layers}.weight"] = w
        elif w is not None:
            vocab = w.shape[0]
    else:
        if base_lm_head is not None:
            raise ValueError(f"{source}: 'lm_head.weight' is only valid with original_lm_head: true")
        if num_layers is None:
            num_layers = 1 + max([j for _, j in blocks] + [-1])
        for i, w in lm_heads.items():
            fd[f"{i}.{num_layers}.weight"] = w
        missing = [i for i in range(num_heads) if i not in lm_heads]
        if missing:
            raise ValueError(
                f"{source}: missing 'lm_heads.{missing[0]}.weight' (config num_heads = {num_heads}, "
                "original_lm_head false)"
            )
    if token_map is not None:
        fd[TOKEN_MAP_KEY] = token_map
    return fd, vocab


__all__ = [
    "HEAD_FILE",
    "HEAD_FORMATS",
    "MEDUSA_CONFIG_FILE",
    "MedusaHeadConfig",
    "base_output_weight_of",
    "detect_format",
    "export_files",
    "export_heads",
    "import_heads",
    "infer_head_config",
    "is_head_file",
    "needs_base_output_weight",
    "safetensors_keys",
]
