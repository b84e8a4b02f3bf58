# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The resumable training state of ``medusa_finetune``: ``output_dir/training_state/step_N/`` holds the trainable
weights (heads, adapters), the optimizer states, the counters and data-order settings, and every rank's
dataloader and RNG state. It is written atomically (temporary directory + rename, then the ``latest`` pointer), so
that a killed run never leaves a half-written state behind; the temporary folders of killed runs are removed at
the next start, and a corrupt state file is reported by name together with the newest earlier state that is
intact.
"""

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchtune import utils

from torchtune_medusa._files import (
    atomic_directory,
    LATEST_STATE_POINTER,
    OPTIMIZER_STATE_FILE,
    rank_state_file,
    RECIPE_STATE_FILE,
    save_torch,
    TRAINABLE_STATE_FILE,
    TRAINING_STATE_DIR,
    write_text,
)
from torchtune_medusa.training._full_state import (
    gather_full_tensors,
    load_full_tensors_inplace,
    load_optimizer_state,
    save_optimizer_state,
)

__all__ = [
    "RESUME_SETTINGS",
    "TRAINING_STATE_DIR",
    "check_resume_settings",
    "check_training_state",
    "find_latest_training_state",
    "load_training_state",
    "load_training_state_file",
    "remove_stale_temp_files",
    "resume_settings",
    "save_training_state",
]

log = utils.get_logger("INFO")

# ----------------------------------------------------------------------------------------------------------
# What killed runs leave behind.

#: Temporary names the recipe gives to what it is still writing, by folder (relative to ``output_dir``): the
#: ``tempfile`` names of :mod:`torchtune_medusa._files` (8 characters of ``[a-z0-9_]`` after the prefix), the
#: per-rank staging folder and the ``latest`` pointer of a training state (``.latest.tmp``: its name before the
#: pointer was written through ``_files``), and a replaced folder moved aside (``.old_<name>_<pid>``). A run killed
#: mid-write leaves them behind.
_TEMP_NAME_PATTERNS = {
    ".": (r"\.tmp_epoch_\d+_[a-z0-9_]{8}", r"\.tmp_metrics\.json_[a-z0-9_]{8}", r"\.old_epoch_\d+_\d+"),
    TRAINING_STATE_DIR: (
        r"\.tmp_step_\d+_[a-z0-9_]{8}",
        r"\.staging_step_\d+",
        r"\.tmp_latest_[a-z0-9_]{8}",
        r"\.latest\.tmp",
        r"\.old_step_\d+_\d+",
    ),
}
_MOVED_ASIDE = re.compile(r"\.old_(?P<name>(epoch|step)_\d+)_\d+")


def remove_stale_temp_files(output_dir: os.PathLike) -> List[str]:
    """Remove what killed runs left half-written in ``output_dir``: the temporary epoch and training-state
    folders, staging folders and temporary files named by the recipe's own patterns (nothing else is touched).
    A folder moved aside by :class:`atomic_directory` whose replacement never arrived is renamed back instead.
    Call it on rank 0 before the run writes anything; what it did is logged.

    Args:
        output_dir (os.PathLike): the run's ``output_dir``.

    Returns:
        List[str]: one line per path removed or restored, e.g. ``"removed training_state/.tmp_step_0000010_ab12cd34
        (12.0 MiB)"``, for the log.
    """
    output_dir = Path(output_dir)
    done = []
    for sub, patterns in _TEMP_NAME_PATTERNS.items():
        folder = output_dir / sub
        if not folder.is_dir():
            continue
        regex = re.compile("|".join(f"(?:{p})" for p in patterns))
        for path in sorted(folder.iterdir()):
            if not regex.fullmatch(path.name) or path.is_symlink():
                continue
            rel = path.relative_to(output_dir)
            moved = _MOVED_ASIDE.fullmatch(path.name)
            if moved and not (folder / moved["name"]).exists():
                os.replace(path, folder / moved["name"])
                done.append(f"restored {rel} as {rel.parent / moved['name']} (its replacement was never written)")
                continue
            size = _tree_size(path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            done.append(f"removed {rel} ({size / 2**20:.1f} MiB)")
    if done:
        log.info(
            f"Cleaned up {len(done)} temporary path(s) left in {output_dir} by an interrupted run: " + "; ".join(done)
        )
    return done


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


# ----------------------------------------------------------------------------------------------------------
# Training state: find, check and read.


def find_latest_training_state(output_dir: os.PathLike) -> Optional[Path]:
    """The directory named by ``output_dir/training_state/latest``, or None when there is none."""
    root = Path(output_dir) / TRAINING_STATE_DIR
    pointer = root / LATEST_STATE_POINTER
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def _state_is_intact(state_dir: Path) -> bool:
    """Whether every ``*.pt`` file of a training state opens (``mmap``: cheap, catches truncation and garbage)."""
    files = sorted(state_dir.glob("*.pt"))
    if not any(f.name == RECIPE_STATE_FILE for f in files):
        return False
    try:
        for f in files:
            torch.load(f, weights_only=False, mmap=True, map_location="cpu")
    except Exception:
        return False
    return True


def _corrupt_state_message(path: Path, error: BaseException) -> str:
    state_dir = path.parent
    root = state_dir.parent
    earlier = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name < state_dir.name), reverse=True)
    intact = next((p for p in earlier if _state_is_intact(p)), None)
    msg = f"training state file {path} is corrupt or unreadable ({type(error).__name__}: {error}). "
    if intact is not None:
        return msg + (
            f"The earlier training state {intact} is intact: to resume from it, run "
            f"`echo {intact.name} > {root / LATEST_STATE_POINTER}` and rerun with resume_from_checkpoint=True (the "
            "steps after it are trained again)."
        )
    return msg + (
        f"No earlier training state in {root} is intact: start again with resume_from_checkpoint=False (in a new "
        "output_dir, or from trained heads with checkpointer.medusa_checkpoint_dir=<output_dir>/epoch_N)."
    )


def load_training_state_file(state_dir: os.PathLike, name: str, *, mmap: bool = False) -> Any:
    """``torch.load`` one file of a training state, naming the file (and the newest earlier state that is intact,
    with the command that resumes from it) when it is corrupt.

    Args:
        state_dir (os.PathLike): ``output_dir/training_state/step_N``.
        name (str): file name, e.g. ``"trainable.pt"``.
        mmap (bool): map the tensors instead of reading them (a cheap check that the file opens).

    Returns:
        Any: the loaded object.

    Raises:
        FileNotFoundError: the file is missing.
        RuntimeError: the file cannot be read; the message names it and the way out.
    """
    path = Path(state_dir) / name
    if not path.is_file():
        raise FileNotFoundError(_corrupt_state_message(path, FileNotFoundError("missing")))
    try:
        return torch.load(path, weights_only=False, mmap=mmap, map_location="cpu" if mmap else None)
    except Exception as e:
        raise RuntimeError(_corrupt_state_message(path, e)) from e


#: Settings that fix which samples each step sees; a training state records them and resuming with other values
#: is refused (the run would not continue where it stopped).
RESUME_SETTINGS = ("batch_size", "shuffle", "gradient_accumulation_steps", "max_steps_per_epoch", "num_samples")


def resume_settings(cfg: Any) -> Dict[str, Any]:
    """A run's values of the settings that decide the data order (recorded in every training state; all of
    :data:`RESUME_SETTINGS` but ``num_samples``, which is known once the data set is built).

    Args:
        cfg (Any): the recipe config.

    Returns:
        Dict[str, Any]: ``batch_size``, ``shuffle``, ``gradient_accumulation_steps`` and ``max_steps_per_epoch``.
    """
    return {
        "batch_size": cfg.batch_size,
        "shuffle": cfg.shuffle,
        "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps", 1),
        "max_steps_per_epoch": cfg.get("max_steps_per_epoch", None),
    }


def check_resume_settings(state_dir: os.PathLike, saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Refuse to resume when a data-order setting differs from the one the training state was written with.

    Args:
        state_dir (os.PathLike): the training state being resumed (for the message).
        saved (Dict[str, Any]): the training state's ``recipe_state.pt``.
        current (Dict[str, Any]): this run's values of (some of) :data:`RESUME_SETTINGS`.

    Raises:
        ValueError: naming every changed setting, its old and new value, and how to proceed.
    """
    changed = [(k, saved[k], v) for k, v in current.items() if k in RESUME_SETTINGS and k in saved and saved[k] != v]
    if not changed:
        return
    what = ", ".join(f"{k}={old!r} (this run: {new!r})" for k, old, new in changed)
    keep = " ".join(f"{k}={'null' if old is None else old}" for k, old, _ in changed if k != "num_samples")
    data = any(k == "num_samples" for k, _, _ in changed)
    raise ValueError(
        f"resume_from_checkpoint: the training state {state_dir} was written with {what}. These settings decide "
        "which samples every step sees, so the run would not continue where it stopped. Resume with the same "
        + (f"settings ({keep})" if keep else "settings")
        + (" and the same data" if data else "")
        + ", or train with the new ones from the start: resume_from_checkpoint=False in a new output_dir "
        "(checkpointer.medusa_checkpoint_dir=<output_dir>/epoch_N starts from trained heads)."
    )


# ----------------------------------------------------------------------------------------------------------
# Check before heavy work, save, load.


def check_training_state(
    output_dir: os.PathLike,
    *,
    num_heads: Optional[int],
    medusa_version: int,
    world_size: int,
    rank: int,
    settings: Dict[str, Any],
) -> Tuple[Path, Dict[str, Any]]:
    """Find and check the training state to resume from before any heavy work: it exists, its files open,
    and it was written by the same model, number of processes and data-order settings.

    Args:
        output_dir (os.PathLike): the run's ``output_dir``.
        num_heads (Optional[int]): the config's ``model.medusa_num_heads`` (None: not set, not checked).
        medusa_version (int): the config's ``medusa_version``.
        world_size (int): number of processes of this run.
        rank (int): this process's rank (its own dataloader file is checked).
        settings (Dict[str, Any]): this run's values of (some of) :data:`RESUME_SETTINGS`.

    Returns:
        Tuple[Path, Dict[str, Any]]: its directory and its ``recipe_state.pt``.

    Raises:
        FileNotFoundError: no training state, or one of its files is missing.
        RuntimeError: a corrupt file (named, with the newest earlier state that is intact).
        ValueError: a state from another model, number of processes or data order.
    """
    output_dir = Path(output_dir)
    path = find_latest_training_state(output_dir)
    if path is None:
        raise FileNotFoundError(
            "resume_from_checkpoint=True but there is no training state in "
            f"{output_dir / TRAINING_STATE_DIR} (written every save_every_n_steps and at epoch ends); "
            "set resume_from_checkpoint=False to start a new run, or output_dir=<the run to resume>"
        )
    state = load_training_state_file(path, RECIPE_STATE_FILE)
    if num_heads is not None and state["num_heads"] != int(num_heads):
        raise ValueError(
            f"training state {path} has {state['num_heads']} heads, the model {num_heads}: resume with "
            f"model.medusa_num_heads={state['num_heads']} (and checkpointer.medusa_num_heads)"
        )
    if state["medusa_version"] != medusa_version:
        raise ValueError(
            f"training state {path} is a Medusa-{state['medusa_version']} run, this config Medusa-"
            f"{medusa_version}: resume with medusa_version={state['medusa_version']}"
        )
    if state["world_size"] != world_size:
        raise ValueError(
            f"training state {path} was written by {state['world_size']} processes; resume with the same number "
            "(the dataloader order depends on it)"
        )
    check_resume_settings(path, state, settings)
    for name in (TRAINABLE_STATE_FILE, OPTIMIZER_STATE_FILE, rank_state_file(rank)):
        load_training_state_file(path, name, mmap=True)  # opens (cheap): a corrupt file fails here
    return path, state


def save_training_state(
    output_dir: os.PathLike,
    *,
    global_step: int,
    trainable: Iterable[Tuple[str, torch.Tensor]],
    optimizers: Sequence[torch.optim.Optimizer],
    param_names: Dict[nn.Parameter, str],
    recipe_state: Dict[str, Any],
    dataloader_state: Optional[Dict[str, Any]],
    device: torch.device,
    keep_last_n: int,
) -> Path:
    """Atomically write ``output_dir/training_state/step_N`` and point ``latest`` at it; keep the newest
    ``keep_last_n`` states. Every rank calls it: all take part in the gathers, rank 0 writes the shared files,
    every rank its dataloader and RNG state.

    Args:
        output_dir (os.PathLike): the run's ``output_dir``.
        global_step (int): optimizer steps taken (the state's name).
        trainable (Iterable[Tuple[str, torch.Tensor]]): the trainable parameters by name (sharded or not).
        optimizers (Sequence[torch.optim.Optimizer]): the optimizers.
        param_names (Dict[nn.Parameter, str]): name of every trainable parameter.
        recipe_state (Dict[str, Any]): counters, settings and LR-scheduler states (``recipe_state.pt``).
        dataloader_state (Optional[Dict[str, Any]]): this rank's dataloader state (None at an epoch's start).
        device (torch.device): the training device (its RNG state is saved too when it is CUDA).
        keep_last_n (int): number of training states to keep.

    Returns:
        Path: the training state's directory.
    """
    t0 = time.perf_counter()
    rank = dist.get_rank()
    is_rank_zero = rank == 0
    weights = gather_full_tensors(trainable, is_rank_zero)
    opt_state = save_optimizer_state(optimizers, param_names, is_rank_zero)
    root = Path(output_dir) / TRAINING_STATE_DIR
    name = f"step_{global_step:07d}"
    rank_state = {
        "dataloader": dataloader_state,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
    }
    # every rank writes its own file into a shared staging dir created by rank 0
    staging = root / f".staging_{name}"
    if is_rank_zero:
        staging.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    save_torch(staging / rank_state_file(rank), rank_state)
    dist.barrier()
    if is_rank_zero:
        with atomic_directory(root / name) as tmp:
            save_torch(tmp / TRAINABLE_STATE_FILE, weights)
            save_torch(tmp / OPTIMIZER_STATE_FILE, opt_state)
            save_torch(tmp / RECIPE_STATE_FILE, recipe_state)
            for f in staging.iterdir():
                os.replace(f, tmp / f.name)
        staging.rmdir()
        write_text(root / LATEST_STATE_POINTER, name + "\n")
        states = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in states[: max(0, len(states) - int(keep_last_n))]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        log.info(f"Saved training state {root / name} in {time.perf_counter() - t0:.2f}s")
    dist.barrier()
    return root / name


def load_training_state(
    path: os.PathLike,
    state: Dict[str, Any],
    *,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    lr_schedulers: Sequence[Any],
    param_names: Dict[nn.Parameter, str],
    device: torch.device,
) -> Optional[Dict[str, Any]]:
    """Load a training state checked by :func:`check_training_state` into the model's trainable parameters (in
    place, sharded like them), the optimizers, the LR schedulers and the RNG; the caller restores its counters
    from ``state``.

    Args:
        path (os.PathLike): the training state's directory.
        state (Dict[str, Any]): its ``recipe_state.pt``.
        model (nn.Module): the training model.
        optimizers (Sequence[torch.optim.Optimizer]): the optimizers, built as when the state was saved.
        lr_schedulers (Sequence[Any]): the LR schedulers, one per optimizer (or none).
        param_names (Dict[nn.Parameter, str]): name of every trainable parameter.
        device (torch.device): the training device.

    Returns:
        Optional[Dict[str, Any]]: this rank's dataloader state (None: the state was saved at an epoch's start).
    """
    weights = load_training_state_file(path, TRAINABLE_STATE_FILE)
    load_full_tensors_inplace(model, weights, device)
    load_optimizer_state(optimizers, load_training_state_file(path, OPTIMIZER_STATE_FILE), param_names, device)
    for sched, sd in zip(lr_schedulers, state["lr_schedulers"]):
        sched.load_state_dict(sd)
    rank_state = load_training_state_file(path, rank_state_file(dist.get_rank()))
    torch.set_rng_state(rank_state["rng"])
    if rank_state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(rank_state["cuda_rng"])
    return rank_state["dataloader"]
