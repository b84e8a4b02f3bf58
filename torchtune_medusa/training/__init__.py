# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Training-side pieces that are not a recipe: the Medusa checkpointer, and the library side of
``medusa_finetune`` in private modules: config checks (``_config_checks``), parallelism (``_parallelize``),
training state (``_state``, ``_full_state``), stages, data, hidden-state cache, LoRA, optimizers and validation."""

from torchtune_medusa.training._checkpointer import HEAD_INIT_SEED, MEDUSA_KEY, MedusaHFCheckpointer

__all__ = [
    "HEAD_INIT_SEED",
    "MEDUSA_KEY",
    "MedusaHFCheckpointer",
]
