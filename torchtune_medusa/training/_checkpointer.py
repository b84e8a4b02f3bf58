# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""An HF checkpointer that also loads, initialises and saves Medusa heads."""

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torchtune import training
from torchtune.training.checkpointing import FullModelHFCheckpointer

from torchtune_medusa._files import epoch_dir_name, MEDUSA_CONFIG_FILE, save_safetensors, write_json
from torchtune_medusa.models._component_builders import validate_medusa_args
from torchtune_medusa.models._convert_weights import (
    HEAD_FILE,
    import_heads,
    infer_head_config,
    MedusaHeadConfig,
    PREFIX,
)

logger = logging.getLogger(__name__)

#: Optional top-level key of the state dict given to :meth:`MedusaHFCheckpointer.save_checkpoint`: the head
#: tensors (``medusa_heads.*`` keys), for saves that carry no full model (``adapter_only=True``).
MEDUSA_KEY = "medusa_heads"

#: Seed of the head-bias initialisation, the same on every rank.
HEAD_INIT_SEED = 0


def num_heads_in_sidecar(directory: Path) -> Optional[int]:
    """Number of heads in the head sidecar ``medusa_lm_head.safetensors`` in ``directory`` (its header only: a
    cheap check before the base checkpoint loads), or None when there is none.

    Args:
        directory (Path): a checkpoint folder.

    Returns:
        Optional[int]: the number of heads, or None.

    Raises:
        ValueError: the sidecar is not a readable safetensors file.
    """
    path = Path(directory) / HEAD_FILE
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


class MedusaHFCheckpointer(FullModelHFCheckpointer):
    """:class:`~torchtune.training.FullModelHFCheckpointer` for Medusa models.

    The base weights go through torchtune's HF path unchanged. The heads live in a sidecar
    ``medusa_lm_head.safetensors`` (FasterDecoding's key layout: ``{i}.{j}.linear.weight|bias``, ``{i}.{L}.weight``)
    with a ``medusa_config.json`` next to the base weights.

    Loading (:meth:`load_checkpoint`): the sidecar is looked for in the epoch folder being resumed from, then in
    ``medusa_checkpoint_dir``, then in ``checkpoint_dir``. If found it is checked against the Medusa arguments and
    the base weights and added to the model state dict under ``medusa_heads.*``. If not, heads are initialised
    as Medusa does: residual weights zero, biases ``nn.Linear``'s default uniform init drawn from a generator
    seeded with :data:`HEAD_INIT_SEED` (identical on every rank), and, for ``medusa_projection="own"``, every
    projection a copy of the base output weight (``tok_embeddings.weight`` for tied models). Either way the
    returned model state dict holds every key of the Medusa model, so ``load_state_dict(strict=True)`` works.

    Saving (:meth:`save_checkpoint`): ``medusa_heads.*`` keys are taken out of ``state_dict[MODEL_KEY]`` (and out
    of ``state_dict[ADAPTER_KEY]`` and ``state_dict[MEDUSA_KEY]``, see below) before torchtune's save, then the
    sidecar and ``medusa_config.json`` are written atomically to ``output_dir/epoch_{epoch}``.

    LoRA / QLoRA: torchtune's adapter state dict keeps only keys containing ``lora``/``magnitude``, and
    ``adapter_only=True`` saves carry no model state dict, so heads would be lost. Give them to the checkpointer
    explicitly: ``state_dict[MEDUSA_KEY] = {k: v for k, v in full_sd.items() if k.startswith("medusa_heads.")}``
    (or leave them in the merged model state dict). On resume torchtune reloads the *base* weights from
    ``checkpoint_dir`` and the adapter from the latest epoch folder; the heads come back from the sidecar in that
    same epoch folder. A save with no heads anywhere logs a warning.

    Args:
        checkpoint_dir (str): as in :class:`~torchtune.training.FullModelHFCheckpointer`.
        checkpoint_files (Union[List[str], Dict[str, str]]): as in the base class.
        model_type (str): as in the base class (e.g. ``LLAMA3``).
        output_dir (str): as in the base class.
        medusa_num_heads (int): heads K of the model. Default 4.
        medusa_num_layers (int): residual blocks per head L. Default 1.
        medusa_projection (str): ``"own"`` or ``"shared"``. Default ``"own"``.
        medusa_head_type (str): ``"medusa"`` or ``"hydra"`` (head k's first block also reads k token embeddings).
            Default ``"medusa"``.
        medusa_checkpoint_dir (Optional[str]): a folder holding trained heads (``medusa_lm_head.safetensors``),
            e.g. a Medusa-1 run's epoch folder to start Medusa-2 from. Default None.
        **kwargs: the other base-class arguments (``adapter_checkpoint``, ``recipe_checkpoint``,
            ``resume_from_checkpoint``, ``safe_serialization``, ``should_load_recipe_state``).

    Raises:
        ValueError: invalid Medusa arguments.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Union[List[str], Dict[str, str]],
        model_type: str,
        output_dir: str,
        *,
        medusa_num_heads: int = 4,
        medusa_num_layers: int = 1,
        medusa_projection: str = "own",
        medusa_head_type: str = "medusa",
        medusa_checkpoint_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        validate_medusa_args(medusa_num_heads, medusa_num_layers, medusa_projection, medusa_head_type)
        super().__init__(
            checkpoint_dir=checkpoint_dir,
            checkpoint_files=checkpoint_files,
            model_type=model_type,
            output_dir=output_dir,
            **kwargs,
        )
        self.medusa_num_heads = medusa_num_heads
        self.medusa_num_layers = medusa_num_layers
        self.medusa_projection = medusa_projection
        self.medusa_head_type = medusa_head_type
        self.medusa_checkpoint_dir = Path(medusa_checkpoint_dir) if medusa_checkpoint_dir else None
        #: where the heads of the last :meth:`load_checkpoint` came from (None: freshly initialised).
        self.medusa_heads_source: Optional[Path] = None

    # ------------------------------------------------------------------------------------------------ loading

    def _sidecar_search_dirs(self) -> List[Path]:
        dirs: List[Path] = []
        if self._should_load_recipe_state:
            if self._adapter_checkpoint is not None:
                dirs.append(Path(self._adapter_checkpoint).parent)
            else:
                dirs.append(Path(self._checkpoint_paths[0]).parent)
        if self.medusa_checkpoint_dir is not None:
            dirs.append(self.medusa_checkpoint_dir)
        dirs.append(self._checkpoint_dir)
        return dirs

    def find_sidecar(self) -> Optional[Path]:
        """The head sidecar :meth:`load_checkpoint` would use, or None."""
        if self.medusa_checkpoint_dir is not None and not self.medusa_checkpoint_dir.is_dir():
            raise FileNotFoundError(f"medusa_checkpoint_dir {self.medusa_checkpoint_dir} does not exist")
        for d in self._sidecar_search_dirs():
            if (d / HEAD_FILE).is_file():
                return d / HEAD_FILE
        if self.medusa_checkpoint_dir is not None:
            raise FileNotFoundError(
                f"medusa_checkpoint_dir is set but {self.medusa_checkpoint_dir / HEAD_FILE} is missing"
            )
        return None

    def load_checkpoint(self) -> Dict[str, Any]:
        """Load the base checkpoint (torchtune's HF path) and add the Medusa heads under ``medusa_heads.*``.

        Returns:
            Dict[str, Any]: torchtune's checkpoint dict; ``MODEL_KEY`` holds base and head weights.

        Raises:
            ValueError: a sidecar whose heads do not fit the model (head count, layers, projection layout,
                hidden size or vocabulary size); the message names the mismatch and the fix.
        """
        state_dict = super().load_checkpoint()
        model_sd = state_dict[training.MODEL_KEY]
        base_w = self._base_output_weight(model_sd)
        sidecar = self.find_sidecar()
        if sidecar is not None:
            heads, cfg = import_heads(sidecar, format="torchtune")
            self._validate(cfg, base_w, sidecar)
            logger.info(f"Loaded {cfg.num_heads} Medusa heads from {sidecar}")
        else:
            heads = self.init_heads(base_w)
            logger.info(
                f"No {HEAD_FILE} found in {[str(d) for d in self._sidecar_search_dirs()]}: initialised "
                f"{self.medusa_num_heads} Medusa heads (zero residual weights"
                f"{', projections copied from the base output' if self.medusa_projection == 'own' else ''})"
            )
        self.medusa_heads_source = sidecar
        model_sd.update(heads)
        return state_dict

    @staticmethod
    def _base_output_weight(model_sd: Dict[str, torch.Tensor]) -> torch.Tensor:
        for key in ("output.weight", "tok_embeddings.weight"):
            if key in model_sd:
                return model_sd[key]
        raise ValueError("the base checkpoint has neither output.weight nor tok_embeddings.weight")

    def _validate(self, cfg: MedusaHeadConfig, base_w: torch.Tensor, sidecar: Path) -> None:
        vocab, dim = base_w.shape
        where = f"Medusa heads in {sidecar}"
        if cfg.num_heads != self.medusa_num_heads:
            raise ValueError(
                f"{where} has {cfg.num_heads} heads but the checkpointer was given medusa_num_heads="
                f"{self.medusa_num_heads}; set medusa_num_heads={cfg.num_heads} (checkpointer and model) or point "
                "medusa_checkpoint_dir at matching heads"
            )
        if cfg.num_layers != self.medusa_num_layers:
            raise ValueError(
                f"{where} has {cfg.num_layers} residual blocks per head but medusa_num_layers="
                f"{self.medusa_num_layers}; set medusa_num_layers={cfg.num_layers} (checkpointer and model)"
            )
        if cfg.projection != self.medusa_projection:
            raise ValueError(
                f"{where} has the {cfg.projection!r} projection layout but medusa_projection="
                f"{self.medusa_projection!r}; set medusa_projection={cfg.projection!r} (checkpointer and model)"
            )
        if cfg.head_type != self.medusa_head_type:
            raise ValueError(
                f"{where} are {cfg.head_type!r} heads but medusa_head_type={self.medusa_head_type!r}; set "
                f"medusa_head_type={cfg.head_type!r} (checkpointer and model)"
            )
        if cfg.hidden_size != dim:
            raise ValueError(
                f"{where} has hidden size {cfg.hidden_size} but the base model in {self._checkpoint_dir} has {dim}; "
                "these heads were trained for another base model"
            )
        if cfg.vocab_size is not None and cfg.vocab_size != vocab:
            raise ValueError(
                f"{where} has vocabulary size {cfg.vocab_size} but the base model in {self._checkpoint_dir} has "
                f"{vocab}; these heads were trained for another base model"
            )

    def init_heads(self, base_output_weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Freshly initialised heads (keys ``medusa_heads.*``), as Medusa initialises them.

        Args:
            base_output_weight (torch.Tensor): the base output weight ``[V, D]``.

        Returns:
            Dict[str, torch.Tensor]: head tensors in the dtype of ``base_output_weight``.
        """
        vocab, dim = base_output_weight.shape
        dtype = base_output_weight.dtype
        gen = torch.Generator().manual_seed(HEAD_INIT_SEED)
        heads: Dict[str, torch.Tensor] = {}
        L = self.medusa_num_layers
        for i in range(self.medusa_num_heads):
            for j in range(L):
                # a Hydra head i (0-based) also reads i + 1 token embeddings in its first block
                fan_in = dim * (i + 2) if j == 0 and self.medusa_head_type == "hydra" else dim
                bound = 1.0 / fan_in**0.5  # nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                heads[f"{PREFIX}{i}.{j}.linear.weight"] = torch.zeros(dim, fan_in, dtype=dtype)
                bias = torch.empty(dim, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
                heads[f"{PREFIX}{i}.{j}.linear.bias"] = bias.to(dtype)
            if self.medusa_projection == "own":
                heads[f"{PREFIX}{i}.{L}.weight"] = base_output_weight.detach().clone()
        return heads

    # ------------------------------------------------------------------------------------------------- saving

    def save_checkpoint(
        self,
        state_dict: Dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> None:
        """Save the base weights through torchtune's HF path and the heads as a sidecar in ``epoch_{epoch}``.

        Head tensors are taken (and removed) from ``state_dict[MEDUSA_KEY]``, ``state_dict[MODEL_KEY]`` and
        ``state_dict[ADAPTER_KEY]`` (``medusa_heads.*`` keys), in that order of precedence.

        Args:
            state_dict (Dict[str, Any]): as in the base class, optionally with :data:`MEDUSA_KEY`.
            epoch (int): epoch number (output folder ``epoch_{epoch}``).
            intermediate_checkpoint (bool): as in the base class.
            adapter_only (bool): as in the base class.
        """
        heads: Dict[str, torch.Tensor] = {}
        for key in (training.ADAPTER_KEY, training.MODEL_KEY):
            sd = state_dict.get(key)
            if isinstance(sd, dict):
                for k in [k for k in sd if k.startswith(PREFIX)]:
                    heads[k] = sd.pop(k)
        extra = state_dict.pop(MEDUSA_KEY, None)
        if extra:
            heads.update({k if k.startswith(PREFIX) else PREFIX + k: v for k, v in extra.items()})
        super().save_checkpoint(
            state_dict, epoch, intermediate_checkpoint=intermediate_checkpoint, adapter_only=adapter_only
        )
        if not heads:
            logger.warning(
                f"save_checkpoint(epoch={epoch}) got no Medusa head tensors (no 'medusa_heads.*' keys in the model "
                f"or adapter state dict, no state_dict['{MEDUSA_KEY}']): no {HEAD_FILE} written"
            )
            return
        self.save_heads(heads, self._output_dir / epoch_dir_name(epoch))

    def save_checkpoint_to(self, directory: Union[str, Path], state_dict: Dict[str, Any], *, epoch: int) -> None:
        """:meth:`save_checkpoint` (final, not intermediate) into ``directory`` itself instead of
        ``output_dir/epoch_{epoch}``: a caller can write an epoch folder elsewhere first (e.g. a temporary folder
        that is renamed into place once complete).

        Args:
            directory (Union[str, Path]): the folder to hold the checkpoint files.
            state_dict (Dict[str, Any]): as in :meth:`save_checkpoint`.
            epoch (int): epoch number (recorded by torchtune's save).
        """
        directory = Path(directory)
        real_output_dir = self._output_dir
        self._output_dir = directory
        try:
            self.save_checkpoint(state_dict, epoch=epoch, intermediate_checkpoint=False)
        finally:
            self._output_dir = real_output_dir
        written = directory / epoch_dir_name(epoch)
        if written.is_dir():  # flatten directory/epoch_N/* into directory/*
            for f in written.iterdir():
                os.replace(f, directory / f.name)
            written.rmdir()

    def save_heads(self, heads: Dict[str, torch.Tensor], out_dir: Union[str, Path]) -> Path:
        """Write ``heads`` (``medusa_heads.*`` keys) as ``medusa_lm_head.safetensors`` + ``medusa_config.json``
        (atomically, with the permissions of the process umask).

        Returns:
            Path: the sidecar's path.
        """
        out_dir = Path(out_dir)
        fd_sd = {k[len(PREFIX) :]: v.detach().cpu() for k, v in heads.items()}
        vocab = self._config.get("vocab_size")
        cfg = infer_head_config(
            fd_sd,
            vocab_size=vocab,
            base_model_name_or_path=self.repo_id or str(self._checkpoint_dir),
            source="heads to save",
        )
        if (cfg.num_heads, cfg.num_layers, cfg.projection, cfg.head_type) != (
            self.medusa_num_heads,
            self.medusa_num_layers,
            self.medusa_projection,
            self.medusa_head_type,
        ):
            logger.warning(
                f"saving {cfg.num_heads} heads x {cfg.num_layers} blocks ({cfg.projection}) although the checkpointer "
                f"was configured for {self.medusa_num_heads} x {self.medusa_num_layers} ({self.medusa_projection})"
            )
        path = out_dir / HEAD_FILE
        save_safetensors(path, fd_sd)  # readable as the umask allows, like torchtune's files
        write_json(out_dir / MEDUSA_CONFIG_FILE, cfg.torchtune_json())
        logger.info(f"Medusa heads ({cfg.num_heads} x {cfg.num_layers} blocks, {cfg.projection}) saved to {path}")
        return path


__all__ = ["HEAD_INIT_SEED", "MEDUSA_KEY", "MedusaHFCheckpointer", "num_heads_in_sidecar"]
