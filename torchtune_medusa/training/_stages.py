# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Training stages of ``medusa_finetune``: Medusa-2's heads-only warm-up, then the joint stage."""

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

__all__ = ["STAGE_NAMES", "Stage", "parse_stages", "stage_at", "steps_per_epoch"]

#: Stage names the recipe knows. ``heads`` trains only the Medusa heads (the backbone runs without autograd);
#: ``joint`` trains heads and LoRA adapters together (Medusa-2 only).
STAGE_NAMES = ("heads", "joint")
_STAGE_ALIASES = {"heads": "heads", "heads_only": "heads", "heads_warmup": "heads", "warmup": "heads", "joint": "joint"}


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


def steps_per_epoch(
    num_batches: int, *, gradient_accumulation_steps: int, max_steps_per_epoch: Optional[int], batch_size: int
) -> int:
    """Optimizer steps in one epoch: a step per ``gradient_accumulation_steps`` batches, at most
    ``max_steps_per_epoch``.

    Args:
        num_batches (int): batches per rank and epoch.
        gradient_accumulation_steps (int): batches per optimizer step.
        max_steps_per_epoch (Optional[int]): the config's cap (None: a whole epoch).
        batch_size (int): the config's batch size (for the message).

    Returns:
        int: the number of steps.

    Raises:
        ValueError: the data gives fewer batches than one step needs.
    """
    steps = num_batches // gradient_accumulation_steps
    if max_steps_per_epoch is not None and max_steps_per_epoch < steps:
        steps = max_steps_per_epoch
    if steps < 1:
        raise ValueError(
            f"the data set gives {num_batches} batches of batch_size={batch_size} per rank, fewer "
            f"than gradient_accumulation_steps={gradient_accumulation_steps}: use more data, a smaller "
            "batch_size or fewer gradient_accumulation_steps"
        )
    return steps
