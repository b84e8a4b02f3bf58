# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Load a trained Medusa model in one call: :func:`load_medusa`.

A ``medusa_finetune`` run writes ``output_dir/epoch_N/``: the base model in HF format (``config.json`` and
``model*.safetensors``, LoRA merged for Medusa-2, possibly sharded), the heads (``medusa_lm_head.safetensors`` +
``medusa_config.json``), the tokenizer files and the calibrated tree (``medusa_choices.json``). Everything needed to
rebuild the model is in that folder: the architecture comes from ``config.json``, the head shape from
``medusa_config.json``, and the weights go through torchtune's HF checkpointer (:class:`MedusaHFCheckpointer`).
"""

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torchtune import training
from torchtune.modules import TransformerDecoder

from torchtune_medusa.models._component_builders import wrap_with_medusa_heads
from torchtune_medusa.models._convert_weights import HEAD_FILE, MEDUSA_CONFIG_FILE
from torchtune_medusa.modules import MedusaTransformerDecoder

log = logging.getLogger(__name__)

EPOCH_DIR = re.compile(r"epoch_(\d+)")
#: Weight files of an HF folder that are not the base model.
NOT_BASE_WEIGHTS = (HEAD_FILE, "adapter_model.safetensors")
HF_CONFIG_FIX = "an HF-format model folder has the base model's config.json next to its weights"
#: Hugging Face ``LlamaConfig``'s defaults for keys an older ``config.json`` may leave out.
HF_LLAMA_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0}


class MedusaRun(NamedTuple):
    """What :func:`load_medusa` returns.

    Attributes:
        model (MedusaTransformerDecoder): the model with its trained heads, in eval mode.
        tokenizer (Optional[Any]): the folder's tokenizer (SmolLM2's ChatML tokenizer for a ``tokenizer.json``
            with ChatML tokens, torchtune's Llama 3 tokenizer for ``original/tokenizer.model``), or None when the
            folder holds neither.
        medusa_choices (Optional[List[Tuple[int, ...]]]): the tree calibrated in training (validated rank paths),
            or None when the folder has no ``medusa_choices.json``. An empty list means plain decoding was fastest.
        medusa_config (Dict[str, Any]): the heads' ``medusa_config.json``.
        checkpoint_dir (Path): the folder the model was loaded from (the latest ``epoch_N`` of a run).
    """

    model: MedusaTransformerDecoder
    tokenizer: Optional[Any]
    medusa_choices: Optional[List[Tuple[int, ...]]]
    medusa_config: Dict[str, Any]
    checkpoint_dir: Path


def latest_epoch_dir(run_or_epoch_dir: Union[str, Path]) -> Path:
    """The folder holding a model: ``run_or_epoch_dir`` itself when it holds ``medusa_config.json`` or model
    weights, else its ``epoch_N`` sub-folder with the largest N (a ``medusa_finetune`` output dir).

    Raises:
        FileNotFoundError: the folder does not exist, or holds neither model weights nor ``epoch_N`` folders.
    """
    path = Path(run_or_epoch_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such directory; give the output_dir of a medusa_finetune run or one of its epoch_N folders"
        )
    if (path / MEDUSA_CONFIG_FILE).is_file() or any(path.glob("*.safetensors")):
        return path
    epochs = [(int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := EPOCH_DIR.fullmatch(p.name))]
    if not epochs:
        raise FileNotFoundError(
            f"{path} holds neither model weights nor epoch_N folders: give the output_dir of a finished "
            "medusa_finetune run (it writes output_dir/epoch_N/ at the end of training) or an epoch_N folder"
        )
    return max(epochs)[1]


def _read_json(path: Path, fix: str) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object; {fix}")
    return data


def base_weight_files(checkpoint_dir: Path) -> List[str]:
    """The base model's safetensors files in an HF folder (one file or ``model-0000i-of-0000n`` shards), sorted;
    the head sidecar and LoRA adapters (already merged into a Medusa-2 run's base) left out.

    Raises:
        FileNotFoundError: no base weights in the folder.
    """
    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors") if p.name not in NOT_BASE_WEIGHTS)
    if not files:
        raise FileNotFoundError(
            f"{checkpoint_dir} has no base model weights (*.safetensors besides {HEAD_FILE}); give a folder written "
            "by medusa_finetune, or an HF-format model folder with the heads' files copied into it"
        )
    return files


def base_from_hf_config(hf_config: Dict[str, Any], source: Path) -> TransformerDecoder:
    """A torchtune Llama decoder with the architecture of an HF ``config.json`` (random weights).

    Llama 3.1/3.3 (``rope_scaling.rope_type == "llama3"``, untied output), Llama 3.2 (scaled RoPE, tied output),
    SmolLM2 (plain RoPE, tied output) and Llama 3 (plain RoPE, untied output) are recognised.

    Raises:
        ValueError: not a Llama config, or RoPE scaling of another kind (the message names ``source``).
    """
    from torchtune.models.llama3 import llama3
    from torchtune.models.llama3_1 import llama3_1
    from torchtune.models.llama3_2 import llama3_2

    from torchtune_medusa.models import smollm2

    if hf_config.get("model_type") != "llama":
        raise ValueError(
            f"{source}: model_type={hf_config.get('model_type')!r}; load_medusa builds Llama-architecture models "
            "(model_type 'llama': Llama 3.x, SmolLM2)"
        )
    c = {**HF_LLAMA_DEFAULTS, **hf_config}
    args = dict(
        vocab_size=c["vocab_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        embed_dim=c["hidden_size"],
        intermediate_dim=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"],
        rope_base=c["rope_theta"],
        norm_eps=c["rms_norm_eps"],
    )
    tied = bool(c.get("tie_word_embeddings", False))
    scaling = c.get("rope_scaling")
    if scaling is None:
        return smollm2(**args) if tied else llama3(**args)
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"{source}: rope_scaling={scaling} is not Llama 3's; load_medusa cannot build this model")
    if tied:
        return llama3_2(**args, scale_factor=scaling["factor"], tie_word_embeddings=True)
    return llama3_1(**args, scale_factor=scaling["factor"])


def resolve_load_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """``None`` (float32), a ``torch.dtype``, or a name: ``auto`` (bf16 where the device computes it natively),
    ``fp32``/``float32``, ``bf16``/``bfloat16``.

    Raises:
        ValueError: any other value.
    """
    from torchtune_medusa.generation._settings import decode_dtype

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return decode_dtype(dtype, device)


def load_tokenizer(*folders: Path) -> Optional[Any]:
    """The tokenizer of the first folder that has one: torchtune's Llama 3 tokenizer for
    ``original/tokenizer.model``, else SmolLM2's ChatML tokenizer for a ``tokenizer.json`` with ChatML tokens;
    None (with a warning) when no folder has either."""
    from torchtune.models.llama3 import llama3_tokenizer

    from torchtune_medusa.data import smollm2_tokenizer

    for folder in folders:
        if (folder / "original" / "tokenizer.model").is_file():
            return llama3_tokenizer(str(folder / "original" / "tokenizer.model"))
        if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
            try:
                return smollm2_tokenizer(str(folder))
            except ValueError as e:  # a tokenizer.json without ChatML's special tokens
                log.warning(f"{folder / 'tokenizer.json'}: not loaded ({e})")
    log.warning(f"no tokenizer found in {[str(f) for f in folders]}: MedusaRun.tokenizer is None")
    return None


def load_saved_tree(checkpoint_dir: Path, num_heads: int) -> Optional[List[Tuple[int, ...]]]:
    """The tree saved next to the heads (validated, and no deeper than the heads), or None.

    Raises:
        ValueError: an unreadable or invalid tree file, or one deeper than the heads (named).
    """
    from torchtune_medusa.generation._tree import load_tree, TREE_FILENAME

    path = checkpoint_dir / TREE_FILENAME
    if not path.is_file():
        return None
    tree, _ = load_tree(path)
    deepest = max(map(len, tree), default=0)
    if deepest > num_heads:
        raise ValueError(f"{path}: the tree is {deepest} deep but {MEDUSA_CONFIG_FILE} has {num_heads} heads")
    return tree


def _build(hf_config: Dict[str, Any], source: Path, device: torch.device, dtype: torch.dtype, **head_args: Any):
    """The model of ``hf_config`` (with Medusa heads when ``head_args`` are given), built in ``dtype`` on ``device``
    as torchtune's recipes build it."""
    with training.set_default_dtype(dtype), device:
        base = base_from_hf_config(hf_config, source)
        if not head_args:
            return base
        return wrap_with_medusa_heads(
            base, embed_dim=hf_config["hidden_size"], vocab_size=hf_config["vocab_size"], **head_args
        )


def load_hf_base(
    checkpoint_dir: Union[str, Path],
    *,
    device: Union[None, str, torch.device] = None,
    dtype: Union[None, str, torch.dtype] = None,
) -> TransformerDecoder:
    """A plain (no heads) Llama-architecture model from an HF-format folder (``config.json`` +
    ``model*.safetensors``), through torchtune's :class:`~torchtune.training.FullModelHFCheckpointer`, in eval mode.

    Args:
        checkpoint_dir (Union[str, Path]): the HF-format folder.
        device (Union[None, str, torch.device]): where the model goes. Default None: CPU.
        dtype (Union[None, str, torch.dtype]): as in :func:`load_medusa`. Default None: float32.

    Returns:
        TransformerDecoder: the model.

    Raises:
        FileNotFoundError: a missing ``config.json`` or no weights (named).
        ValueError: an unknown dtype or a model that is not a Llama.
    """
    from torchtune.training import FullModelHFCheckpointer

    device = torch.device(device or "cpu")
    dtype = resolve_load_dtype(dtype, device)
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    hf_config = _read_json(checkpoint_dir / "config.json", HF_CONFIG_FIX)
    model = _build(hf_config, checkpoint_dir / "config.json", device, dtype)  # checks the config first
    with tempfile.TemporaryDirectory() as unused_output_dir:  # loading writes nothing there
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_files=base_weight_files(checkpoint_dir),
            model_type="LLAMA3",
            output_dir=unused_output_dir,
        )
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    model.load_state_dict(state_dict)
    return model.eval()


def load_hf_medusa(
    checkpoint_dir: Union[str, Path],
    *,
    medusa_num_heads: int,
    medusa_num_layers: int = 1,
    medusa_projection: str = "own",
    medusa_head_type: str = "medusa",
    heads_dir: Union[None, str, Path] = None,
    device: Union[None, str, torch.device] = None,
    dtype: Union[None, str, torch.dtype] = None,
) -> Tuple[MedusaTransformerDecoder, Optional[Path]]:
    """A Medusa model from an HF-format folder, through :class:`MedusaHFCheckpointer`: the heads come from
    ``medusa_lm_head.safetensors`` in ``heads_dir`` (when given) or ``checkpoint_dir``, else they are freshly
    initialised as the checkpointer initialises them. :func:`load_medusa` is the one-call way to load a trained run.

    Args:
        checkpoint_dir (Union[str, Path]): the HF-format folder (``config.json`` + ``model*.safetensors``).
        medusa_num_heads (int): heads K (must match a sidecar).
        medusa_num_layers (int): residual blocks per head. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"``. Default ``"medusa"``.
        heads_dir (Union[None, str, Path]): a folder holding the sidecar. Default None: ``checkpoint_dir``.
        device (Union[None, str, torch.device]): where the model goes. Default None: CPU.
        dtype (Union[None, str, torch.dtype]): as in :func:`load_medusa`. Default None: float32.

    Returns:
        Tuple[MedusaTransformerDecoder, Optional[Path]]: the model in eval mode, and the sidecar its heads came
        from (None: freshly initialised).

    Raises:
        FileNotFoundError: a missing ``config.json``, no weights, or ``heads_dir`` without a sidecar (named).
        ValueError: an unknown dtype, a model that is not a Llama, or heads that do not fit it.
    """
    from torchtune_medusa.training import MedusaHFCheckpointer

    device = torch.device(device or "cpu")
    dtype = resolve_load_dtype(dtype, device)
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    hf_config = _read_json(checkpoint_dir / "config.json", HF_CONFIG_FIX)
    head_args = dict(
        medusa_num_heads=medusa_num_heads,
        medusa_num_layers=medusa_num_layers,
        medusa_projection=medusa_projection,
        medusa_head_type=medusa_head_type,
    )
    model = _build(hf_config, checkpoint_dir / "config.json", device, dtype, **head_args)  # checks the config first
    with tempfile.TemporaryDirectory() as unused_output_dir:  # loading writes nothing there
        checkpointer = MedusaHFCheckpointer(
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_files=base_weight_files(checkpoint_dir),
            model_type="LLAMA3",
            output_dir=unused_output_dir,
            medusa_checkpoint_dir=str(heads_dir) if heads_dir else None,
            **head_args,
        )
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    model.load_state_dict(state_dict)
    return model.eval(), checkpointer.medusa_heads_source


def head_args_from_config(medusa_config: Dict[str, Any], source: Path) -> Dict[str, Any]:
    """``medusa_num_heads``/``medusa_num_layers``/``medusa_projection``/``medusa_head_type`` of a
    ``medusa_config.json`` (FasterDecoding's ``version: "2"`` means the shared projection when ``medusa_projection``
    is absent).

    Raises:
        ValueError: no ``medusa_num_heads`` entry (names ``source``).
    """
    if "medusa_num_heads" not in medusa_config:
        raise ValueError(f"{source} has no 'medusa_num_heads' entry; it is not a Medusa heads config")
    projection = "shared" if str(medusa_config.get("version", "")) == "2" else "own"
    return dict(
        medusa_num_heads=int(medusa_config["medusa_num_heads"]),
        medusa_num_layers=int(medusa_config.get("medusa_num_layers", 1)),
        medusa_projection=medusa_config.get("medusa_projection", projection),
        medusa_head_type=medusa_config.get("medusa_head_type", "medusa"),
    )


def load_medusa(
    run_or_epoch_dir: Union[str, Path],
    *,
    device: Union[None, str, torch.device] = None,
    dtype: Union[None, str, torch.dtype] = None,
) -> MedusaRun:
    """Load a trained Medusa model, its tokenizer and its calibrated tree from a ``medusa_finetune`` output.

    Example:
        >>> from torchtune_medusa import load_medusa
        >>> from torchtune_medusa.generation import medusa_generate
        >>> run = load_medusa("output/smollm2_135m_medusa")  # the latest epoch_N
        >>> prompt = run.tokenizer.encode("The capital of France is", add_eos=False)
        >>> out = medusa_generate(run.model, [prompt], medusa_choices=run.medusa_choices, max_new_tokens=32)
        >>> print(run.tokenizer.decode(out.tokens[0]))

    Args:
        run_or_epoch_dir (Union[str, Path]): a run's ``output_dir`` (its latest ``epoch_N`` is loaded) or an
            ``epoch_N`` folder; any folder with an HF-format Llama model, ``medusa_lm_head.safetensors`` and
            ``medusa_config.json`` works.
        device (Union[None, str, torch.device]): where the model goes. Default None: CPU.
        dtype (Union[None, str, torch.dtype]): the model's dtype: a ``torch.dtype``, ``"fp32"``, ``"bf16"`` or
            ``"auto"`` (bf16 where the device computes it natively, else fp32). Default None: float32.

    Returns:
        MedusaRun: ``model`` (eval mode), ``tokenizer``, ``medusa_choices`` (None when no tree was saved),
        ``medusa_config`` and the ``checkpoint_dir`` loaded.

    Raises:
        FileNotFoundError: a missing folder, a run without ``epoch_N`` folders, or a folder without
            ``medusa_config.json``, ``config.json`` or base weights; the message names the path and the fix.
        ValueError: an unknown dtype, a malformed config, or heads that do not fit the base model.
    """
    device = torch.device(device or "cpu")
    dtype = resolve_load_dtype(dtype, device)
    checkpoint_dir = latest_epoch_dir(run_or_epoch_dir)
    config_path = checkpoint_dir / MEDUSA_CONFIG_FILE
    medusa_config = _read_json(
        config_path,
        f"it is written with the heads ({HEAD_FILE}) by medusa_finetune and export_heads; give a folder with "
        "trained heads",
    )
    head_args = head_args_from_config(medusa_config, config_path)
    model, _ = load_hf_medusa(checkpoint_dir, heads_dir=checkpoint_dir, device=device, dtype=dtype, **head_args)
    base_dir = Path(str(medusa_config.get("base_model_name_or_path") or checkpoint_dir))
    return MedusaRun(
        model=model,
        tokenizer=load_tokenizer(*dict.fromkeys([checkpoint_dir, base_dir])),
        medusa_choices=load_saved_tree(checkpoint_dir, head_args["medusa_num_heads"]),
        medusa_config=medusa_config,
        checkpoint_dir=checkpoint_dir,
    )
