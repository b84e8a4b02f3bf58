# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The files a Medusa run writes: their names, and the one way they are written.

Every trained-output file (head sidecar, its config, the calibrated tree, metrics, training states, exports) is
named here and written through :func:`write_json`, :func:`write_text`, :func:`write_bytes`,
:func:`save_safetensors` or :func:`save_torch`: the content goes to a temporary file in the target's folder
(``.tmp_<name>_XXXXXXXX``), is flushed and ``fsync``'ed, gets the permissions of the process umask and then
replaces the target with ``os.replace``. A reader sees the old file or the new one, never half of one; a write
that fails (disk full, an exception while serialising, a kill) leaves the old file as it was. Folders of several
files appear at once through :class:`atomic_directory`.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

__all__ = [
    "GENERATE_RESULTS_FILE",
    "HF_CONFIG_FILE",
    "LATEST_STATE_POINTER",
    "MEDUSA_CHOICES_FILE",
    "MEDUSA_CONFIG_FILE",
    "MEDUSA_HEADS_FILE",
    "METRICS_FILE",
    "OPTIMIZER_STATE_FILE",
    "RECIPE_STATE_FILE",
    "TEMP_PREFIX",
    "TRAINABLE_STATE_FILE",
    "TRAINING_STATE_DIR",
    "VLLM_WEIGHTS_FILE",
    "atomic_directory",
    "epoch_dir_name",
    "rank_state_file",
    "save_safetensors",
    "save_torch",
    "set_default_permissions",
    "write_bytes",
    "write_json",
    "write_text",
]

PathLike = Union[str, os.PathLike]

# ----------------------------------------------------------------------------------------------------------
# Names.

#: Medusa heads in FasterDecoding's key layout (``{i}.{j}.linear.weight|bias``, ``{i}.{L}.weight``).
MEDUSA_HEADS_FILE = "medusa_lm_head.safetensors"
#: The heads' config next to :data:`MEDUSA_HEADS_FILE` (FasterDecoding's keys plus ``medusa_projection``).
MEDUSA_CONFIG_FILE = "medusa_config.json"
#: The tree of candidate continuations (``medusa_choices``) calibrated for these heads.
MEDUSA_CHOICES_FILE = "medusa_choices.json"
#: HF-style model config of an export (FasterDecoding and vLLM layouts).
HF_CONFIG_FILE = "config.json"
#: Head weights of a vLLM export.
VLLM_WEIGHTS_FILE = "model.safetensors"
#: ``output_dir/metrics.json``: the final metrics of a training run.
METRICS_FILE = "metrics.json"
#: ``output_dir/generate_results.json``: the report of the ``medusa_generate`` recipe.
GENERATE_RESULTS_FILE = "generate_results.json"
#: Sub-directory of ``output_dir`` with the resumable training states (``step_0000123/``) and the pointer.
TRAINING_STATE_DIR = "training_state"
#: File in :data:`TRAINING_STATE_DIR` naming the newest complete training state.
LATEST_STATE_POINTER = "latest"
#: Files of one training state: trainable weights, optimizer states, counters and settings.
TRAINABLE_STATE_FILE = "trainable.pt"
OPTIMIZER_STATE_FILE = "optimizer.pt"
RECIPE_STATE_FILE = "recipe_state.pt"
#: Prefix of the temporary files and folders written here: ``.tmp_<final name>_<8 characters of [a-z0-9_]>``.
TEMP_PREFIX = ".tmp_"


def epoch_dir_name(epoch: int) -> str:
    """``epoch_{epoch}``: the folder of the checkpoint written at the end of epoch ``epoch`` (0-based)."""
    return f"epoch_{epoch}"


def rank_state_file(rank: int) -> str:
    """``rank_{rank}.pt``: one process's dataloader and RNG state in a training state."""
    return f"rank_{rank}.pt"


# ----------------------------------------------------------------------------------------------------------
# Permissions.


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_permissions(path: PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the permissions that ``mkdir`` and ``open``
    give under the process umask. ``tempfile``'s directories (0700) and files (0600) are private, and an atomic
    write keeps them private after the rename; checkpoints should be readable by whoever the user's umask allows.

    Args:
        path (PathLike): a file or directory the caller has just written.
    """
    path = Path(path)
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# ----------------------------------------------------------------------------------------------------------
# Safe writes of one file.


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform opens directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary path in ``path``'s folder, fsync it, give it the umask permissions and
    rename it over ``path``. On any exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}_", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        set_default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring).

    Args:
        path (PathLike): the file to write; its folder is created if needed.
        data (bytes): the content.

    Returns:
        Path: ``path``.
    """
    return _replace_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path (PathLike): the file to write; its folder is created if needed.
        text (str): the content.

    Returns:
        Path: ``path``.
    """
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (followed by a newline) to ``path`` atomically. The object is serialised before
    anything is written, so an object that is not JSON leaves the old file as it was.

    Args:
        path (PathLike): the file to write; its folder is created if needed.
        obj (Any): a JSON-serialisable object.
        indent (int): ``json.dumps`` indentation. Default 2.
        sort_keys (bool): sort the keys of every mapping. Default False.

    Returns:
        Path: ``path``.
    """
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def save_safetensors(
    path: PathLike, tensors: Dict[str, torch.Tensor], *, metadata: Optional[Dict[str, str]] = None
) -> Path:
    """Write ``tensors`` as a safetensors file to ``path`` atomically (contiguous copies, ``{"format": "pt"}``
    metadata unless other metadata is given).

    Args:
        path (PathLike): the file to write; its folder is created if needed.
        tensors (Dict[str, torch.Tensor]): the tensors by key.
        metadata (Optional[Dict[str, str]]): the file's metadata. Default ``{"format": "pt"}``.

    Returns:
        Path: ``path``.
    """
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {"format": "pt"} if metadata is None else metadata
    return _replace_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata=meta))


def save_torch(path: PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically.

    Args:
        path (PathLike): the file to write; its folder is created if needed.
        obj (Any): anything ``torch.save`` takes.

    Returns:
        Path: ``path``.
    """
    return _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


# ----------------------------------------------------------------------------------------------------------
# Folders that appear at once.


class atomic_directory:
    """Context manager giving a temporary directory next to ``final``; on success it replaces ``final`` with
    a rename (atomic on POSIX for a directory that does not exist yet; an existing one is first moved aside and
    removed after the rename). On an exception the temporary directory is removed and ``final`` is untouched.
    The directory and its files get the permissions of the process umask (not ``tempfile``'s private ones).

    Args:
        final (PathLike): the directory to create or replace.

    Example:
        >>> with atomic_directory(out / "step_000010") as tmp:
        ...     save_torch(tmp / "state.pt", state)
    """

    def __init__(self, final: PathLike) -> None:
        self.final = Path(final)
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{self.final.name}_", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        set_default_permissions(self.tmp)
        old = None
        if self.final.exists():
            old = self.final.with_name(f".old_{self.final.name}_{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        _fsync_directory(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
