# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Helpers of the ``medusa_finetune`` recipe that are not the recipe itself.

- process-group set-up that also works without ``torchrun`` (one process, gloo, in-memory store);
- FSDP2 shard conditions that make every Medusa head (with its own projection) its own FSDP unit;
- training stages (Medusa-2: heads-only warm-up, then joint) and the config checks that must fail before any
  heavy work;
- the resumable training state: trainable weights (heads, adapters), optimizer state, dataloader state and
  counters, written atomically (temporary directory + rename) so that a killed run never leaves a half-written
  checkpoint behind; the temporary folders of killed runs are removed at the next start, and a corrupt state
  file is reported by name together with the newest earlier state that is intact;
- the Medusa-1 hidden-state cache: with a frozen backbone the normed hidden state of a sample never changes, so
  it is computed once, before training, and reused by every epoch.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import distribute_tensor, DTensor
from torch.utils.data import Dataset

__all__ = [
    "HiddenStateCache",
    "IndexedDataset",
    "Stage",
    "TRAINING_STATE_DIR",
    "atomic_directory",
    "check_resume_settings",
    "find_latest_training_state",
    "gather_full_tensors",
    "indexed_collate",
    "init_process_group_for_recipe",
    "load_full_tensors_inplace",
    "load_optimizer_state",
    "load_training_state_file",
    "medusa_shard_condition",
    "parse_stages",
    "remove_stale_temp_files",
    "RESUME_SETTINGS",
    "save_optimizer_state",
    "set_default_permissions",
    "stage_at",
    "write_json_atomic",
]

#: Sub-directory of ``output_dir`` with the resumable training states (``step_000123/``) and ``latest``.
TRAINING_STATE_DIR = "training_state"

#: Stage names the recipe knows. ``heads`` trains only the Medusa heads (the backbone runs without autograd);
#: ``joint`` trains heads and LoRA adapters together (Medusa-2 only).
STAGE_NAMES = ("heads", "joint")
_STAGE_ALIASES = {"heads": "heads", "heads_only": "heads", "heads_warmup": "heads", "warmup": "heads", "joint": "joint"}


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


# ----------------------------------------------------------------------------------------------------------
# Stages.


@dataclass(frozen=True)
class Stage:
    """One training stage: ``name`` in :data:`STAGE_NAMES`, active for ``steps`` optimizer steps (None = until
    the end of training)."""

    name: str
    steps: Optional[int]


def parse_stages(cfg_stages: Optional[Sequence[Any]], *, medusa_version: int) -> List[Stage]:
    """Parse and check the ``stages`` config.

    Accepted forms: None (Medusa-1: ``heads``; Medusa-2: ``joint``), or a list of ``{name, steps}`` mappings /
    bare names, e.g. ``[{name: heads_warmup, steps: 50}, {name: joint}]``. Only the last stage may leave
    ``steps`` out.

    Raises:
        ValueError: on an unknown stage name, a non-positive length, a stage without length that is not the
            last one, or ``joint`` with Medusa-1 (which has no adapters to train).
    """
    if cfg_stages is None or len(cfg_stages) == 0:
        return [Stage("heads" if medusa_version == 1 else "joint", None)]
    stages: List[Stage] = []
    for i, item in enumerate(cfg_stages):
        if isinstance(item, str):
            raw_name, steps = item, None
        else:
            item = dict(item)
            unknown = set(item) - {"name", "steps"}
            if unknown:
                raise ValueError(f"stages[{i}] has unknown key(s) {sorted(unknown)}; a stage is {{name, steps}}")
            raw_name, steps = item.get("name"), item.get("steps")
        if raw_name not in _STAGE_ALIASES:
            raise ValueError(
                f"stages[{i}]: unknown stage name {raw_name!r}; known stages are "
                f"{sorted(_STAGE_ALIASES)} (heads-only warm-up or joint heads + adapters)"
            )
        name = _STAGE_ALIASES[raw_name]
        if name == "joint" and medusa_version == 1:
            raise ValueError(
                f"stages[{i}] is {raw_name!r}, but Medusa-1 trains the heads only (frozen backbone, no adapters); "
                "use medusa_version=2 with a LoRA/QLoRA model for a joint stage"
            )
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"stages[{i}].steps must be a positive int or left out, got {steps!r}")
        if steps is None and i != len(cfg_stages) - 1:
            raise ValueError(f"stages[{i}] ({raw_name!r}) has no `steps`; only the last stage may run to the end")
        stages.append(Stage(name, steps))
    return stages


def stage_at(stages: Sequence[Stage], global_step: int) -> Stage:
    """The stage that optimizer step ``global_step`` (0-based: the step about to be taken) belongs to. After
    the last stage with a length, the last stage continues."""
    start = 0
    for stage in stages:
        if stage.steps is None or global_step < start + stage.steps:
            return stage
        start += stage.steps
    return stages[-1]


# ----------------------------------------------------------------------------------------------------------
# Atomic files and directories.


#: Temporary names the recipe gives to what it is still writing, by folder (relative to ``output_dir``): the
#: ``tempfile`` names of :class:`atomic_directory` and :func:`write_json_atomic` (8 characters of
#: ``[a-z0-9_]`` after the prefix), the per-rank staging folder and the ``latest`` pointer of a training state, and
#: a replaced folder moved aside (``.old_<name>_<pid>``). A run killed mid-write leaves them behind.
_TEMP_NAME_PATTERNS = {
    ".": (r"\.tmp_epoch_\d+_[a-z0-9_]{8}", r"\.tmp_metrics\.json_[a-z0-9_]{8}", r"\.old_epoch_\d+_\d+"),
    TRAINING_STATE_DIR: (
        r"\.tmp_step_\d+_[a-z0-9_]{8}",
        r"\.staging_step_\d+",
        r"\.latest\.tmp",
        r"\.old_step_\d+_\d+",
    ),
}
_MOVED_ASIDE = re.compile(r"\.old_(?P<name>(epoch|step)_\d+)_\d+")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_permissions(path: os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the permissions that ``mkdir`` and ``open``
    give under the process umask. ``tempfile``'s directories (0700) and files (0600) are private, and an atomic
    write keeps them private after the rename; checkpoints should be readable by whoever the user's umask allows.

    Args:
        path (os.PathLike): a file or directory the caller has just written.
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


class atomic_directory:
    """Context manager giving a temporary directory next to ``final``; on success it replaces ``final`` with
    a rename (atomic on POSIX for a directory that does not exist yet; an existing one is first moved aside and
    removed after the rename). On an exception the temporary directory is removed and ``final`` is untouched.
    The directory and its files get the permissions of the process umask (not ``tempfile``'s private ones).

    Example:
        >>> with atomic_directory(out / "step_000010") as tmp:
        ...     torch.save(state, tmp / "state.pt")
    """

    def __init__(self, final: os.PathLike) -> None:
        self.final = Path(final)
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{self.final.name}_", dir=self.final.parent))
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
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace`` (umask permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{path.name}_", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    set_default_permissions(tmp)
    os.replace(tmp, path)


def remove_stale_temp_files(output_dir: os.PathLike) -> List[str]:
    """Remove what killed runs left half-written in ``output_dir``: the temporary epoch and training-state
    folders, staging folders and temporary files named by the recipe's own patterns (nothing else is touched).
    A folder moved aside by :class:`atomic_directory` whose replacement never arrived is renamed back instead.
    Call it on rank 0 before the run writes anything.

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
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def _state_is_intact(state_dir: Path) -> bool:
    """Whether every ``*.pt`` file of a training state opens (``mmap``: cheap, catches truncation and garbage)."""
    files = sorted(state_dir.glob("*.pt"))
    if not any(f.name == "recipe_state.pt" for f in files):
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
            f"`echo {intact.name} > {root / 'latest'}` and rerun with resume_from_checkpoint=True (the steps after "
            "it are trained again)."
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
# Full (unsharded) tensors of trainable parameters and optimizer state.


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_full_tensors(named: Iterable[Tuple[str, torch.Tensor]], is_rank_zero: bool) -> Dict[str, torch.Tensor]:
    """Unshard (collective on every rank, same order) and move to CPU; returns the dict on rank 0, {} elsewhere."""
    out = {}
    for name, t in named:
        full = _full(t.detach())
        if is_rank_zero:
            out[name] = full.cpu().clone()
    return out


def load_full_tensors_inplace(model: nn.Module, full: Dict[str, torch.Tensor], device: torch.device) -> None:
    """Copy full tensors into the model's (possibly sharded) parameters **in place**, so that optimizers built
    over those parameters keep pointing at them (``load_state_dict(assign=True)`` would replace them).

    Raises:
        KeyError: if ``full`` names a parameter the model does not have.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in full.items():
            if name not in params:
                raise KeyError(f"training state has {name!r}, which the model does not have")
            p = params[name]
            value = value.to(device=device, dtype=p.dtype)
            if isinstance(p, DTensor):
                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)


def save_optimizer_state(
    optimizers: Sequence[torch.optim.Optimizer], param_names: Dict[nn.Parameter, str], is_rank_zero: bool
) -> List[Dict[str, Any]]:
    """Full optimizer states keyed by parameter name (collective). Works for one optimizer with several param
    groups and for optimizer-in-backward's one-optimizer-per-parameter alike, sharded (DTensor) or not.

    Returns:
        List[Dict[str, Any]]: per optimizer ``{"param_groups": [...hyperparameters, "params": [names]], "state":
        {name: {key: full tensor or value}}}``; only rank 0's list holds tensors.
    """
    out = []
    for opt in optimizers:
        groups, state = [], {}
        for group in opt.param_groups:
            names = [param_names[p] for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
            for p, name in zip(group["params"], names):
                if p not in opt.state:
                    continue
                entry = {}
                for key, value in sorted(opt.state[p].items()):
                    if isinstance(value, torch.Tensor):
                        value = _full(value)
                        value = value.cpu().clone() if is_rank_zero else None
                    entry[key] = value
                state[name] = entry
        out.append({"param_groups": groups, "state": state})
    return out


def load_optimizer_state(
    optimizers: Sequence[torch.optim.Optimizer],
    saved: Sequence[Dict[str, Any]],
    param_names: Dict[nn.Parameter, str],
    device: torch.device,
) -> None:
    """Inverse of :func:`save_optimizer_state`: shard each full state tensor like its parameter.

    Raises:
        ValueError: if the saved optimizer layout does not match the current one (other model or settings).
    """
    if len(saved) != len(optimizers):
        raise ValueError(
            f"training state has {len(saved)} optimizer(s), the recipe built {len(optimizers)}: "
            "resume with the same model, optimizer and optimizer_in_bwd settings"
        )
    for opt, opt_saved in zip(optimizers, saved):
        if len(opt_saved["param_groups"]) != len(opt.param_groups):
            raise ValueError("optimizer param groups differ from the training state being resumed")
        for group, group_saved in zip(opt.param_groups, opt_saved["param_groups"]):
            names = [param_names[p] for p in group["params"]]
            if names != group_saved["params"]:
                raise ValueError("optimizer parameters differ from the training state being resumed")
            for key, value in group_saved.items():
                if key != "params":
                    group[key] = value
            for p, name in zip(group["params"], names):
                if name not in opt_saved["state"]:
                    continue
                entry = {}
                for key, value in opt_saved["state"][name].items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == p.shape:
                        value = value.to(device=device, dtype=value.dtype)
                        if isinstance(p, DTensor):
                            value = distribute_tensor(value, p.device_mesh, p.placements)
                    elif isinstance(value, torch.Tensor):
                        # scalars such as Adam's `step` stay where the optimizer keeps them (CPU by default)
                        value = value.clone()
                    entry[key] = value
                opt.state[p] = entry


# ----------------------------------------------------------------------------------------------------------
# Data: sample indices travel with the batch (the hidden-state cache is keyed by them).


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that every sample also carries its index (key ``"_index"``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["_index"] = index
        return sample

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def indexed_collate(collate_fn: Callable[[List[Dict[str, Any]]], Dict[str, Any]]) -> Callable:
    """Wrap a torchtune collate function: drop ``_index`` before collating and add ``batch["_index"]`` (``[b]``
    int64) and ``batch["_length"]`` (``[b]``, unpadded sample lengths) after it."""

    def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        indices = [s["_index"] for s in samples]
        lengths = [len(s["tokens"]) for s in samples]
        batch = collate_fn([{k: v for k, v in s.items() if k != "_index"} for s in samples])
        batch["_index"] = torch.tensor(indices, dtype=torch.long)
        batch["_length"] = torch.tensor(lengths, dtype=torch.long)
        return batch

    return collate


# ----------------------------------------------------------------------------------------------------------
# Medusa-1 hidden-state cache.


class HiddenStateCache:
    """Normed final hidden states of a frozen backbone, one ``[len_i, d]`` tensor per dataset sample, kept in
    memory (in the model dtype, on CPU or the training device), bounded by ``max_bytes``.

    The cache is filled once, before training, by :meth:`fill` (all ranks in lock step; under FSDP every rank
    computes its share and the shares are all-gathered, so that every rank holds every sample, because the
    sampler reshuffles samples across ranks each epoch). Training batches then read their hidden states with
    :meth:`batch`, bit-identical to what the backbone computed in the fill pass.
    """

    def __init__(self, *, max_bytes: int, store_device: torch.device) -> None:
        self.max_bytes = int(max_bytes)
        self.store_device = store_device
        self._data: Dict[int, torch.Tensor] = {}
        self._greedy: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._data.values())

    @staticmethod
    def estimate_bytes(dataset: Dataset, dim: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(len(dataset[i]["tokens"]) for i in range(len(dataset))) * dim * itemsize

    def fill(
        self,
        dataset: Dataset,
        *,
        collate_fn: Callable,
        batch_size: int,
        compute_hidden: Callable[[Dict[str, Any]], torch.Tensor],
        device: torch.device,
        rank: int,
        world_size: int,
        progress: Optional[Callable[[int], None]] = None,
        greedy_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        """Compute and store the hidden state of every sample of ``dataset``.

        Args:
            dataset (Dataset): an :class:`IndexedDataset`.
            collate_fn (Callable): the training collate (wrapped by :func:`indexed_collate`).
            batch_size (int): samples per forward.
            compute_hidden (Callable): ``batch -> [b, s, d]`` normed hidden state (no grad).
            device (torch.device): training device.
            rank (int): this rank.
            world_size (int): number of ranks.
            progress (Optional[Callable[[int], None]]): called with the number of samples done.
            greedy_fn (Optional[Callable]): ``hidden -> [b, s]`` base greedy tokens, stored too (see
                :meth:`greedy_batch`).
        """
        n = len(dataset)
        mine = list(range(rank, n, world_size))
        steps = (len(mine) + batch_size - 1) // batch_size
        if world_size > 1:  # all ranks must run the same number of (collective) forwards
            t = torch.tensor([steps], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            steps = int(t.item())
        for step in range(steps):
            chunk = mine[step * batch_size : (step + 1) * batch_size] or mine[:1] or [0]
            batch = collate_fn([dataset[i] for i in chunk])
            indices, lengths = batch.pop("_index"), batch.pop("_length")
            batch.pop("labels", None)
            hidden = compute_hidden({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            greedy = greedy_fn(hidden) if greedy_fn is not None else None
            if world_size > 1:
                if greedy is not None:  # carried through the float gather exactly (token ids < 2**24)
                    hidden = torch.cat([hidden, greedy.unsqueeze(-1).to(hidden.dtype)], dim=-1)
                hidden, indices, lengths = _all_gather_padded(hidden, indices.to(device), lengths.to(device))
                if greedy is not None:
                    hidden, greedy = hidden[..., :-1], hidden[..., -1].long()
            for r, (h, i, length) in enumerate(zip(hidden, indices.tolist(), lengths.tolist())):
                if i not in self._data:
                    self._data[i] = h[:length].to(self.store_device).clone()
                    if greedy is not None:
                        self._greedy[i] = greedy[r, :length].to(torch.int32).cpu().clone()
            if progress is not None:
                progress(min(n, (step + 1) * batch_size * world_size))

    def batch(self, indices: torch.Tensor, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
        """``[b, seq_len, d]`` hidden states of the samples ``indices`` (zeros past each sample's length, where
        every label is ignored), or None when a sample is missing."""
        rows = []
        for i in indices.tolist():
            t = self._data.get(i)
            if t is None or t.size(0) > seq_len:
                return None
            rows.append(t)
        out = rows[0].new_zeros(len(rows), seq_len, rows[0].size(-1), device=device)
        for r, t in enumerate(rows):
            out[r, : t.size(0)] = t.to(device)
        return out

    def greedy_batch(self, indices: torch.Tensor, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
        """``[b, seq_len]`` cached base greedy tokens (0 past each sample's length), or None when missing."""
        rows = [self._greedy.get(i) for i in indices.tolist()]
        if any(t is None or t.size(0) > seq_len for t in rows):
            return None
        out = torch.zeros(len(rows), seq_len, dtype=torch.long, device=device)
        for r, t in enumerate(rows):
            out[r, : t.size(0)] = t.to(device=device, dtype=torch.long)
        return out


def _all_gather_padded(
    hidden: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather ``[b, s, d]`` hidden states whose ``b`` and ``s`` differ across ranks."""
    world = dist.get_world_size()
    shape = torch.tensor([hidden.size(0), hidden.size(1)], device=hidden.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    b_max = max(int(s[0]) for s in shapes)
    s_max = max(int(s[1]) for s in shapes)
    padded = hidden.new_zeros(b_max, s_max, hidden.size(-1))
    padded[: hidden.size(0), : hidden.size(1)] = hidden
    idx = torch.full((b_max,), -1, dtype=torch.long, device=hidden.device)
    idx[: indices.numel()] = indices
    lens = torch.zeros(b_max, dtype=torch.long, device=hidden.device)
    lens[: lengths.numel()] = lengths
    outs = [torch.empty_like(padded) for _ in range(world)]
    idxs = [torch.empty_like(idx) for _ in range(world)]
    lenss = [torch.empty_like(lens) for _ in range(world)]
    dist.all_gather(outs, padded)
    dist.all_gather(idxs, idx)
    dist.all_gather(lenss, lens)
    hidden_all, idx_all, len_all = torch.cat(outs), torch.cat(idxs), torch.cat(lenss)
    keep = idx_all >= 0
    return hidden_all[keep], idx_all[keep], len_all[keep]
