# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Training-side pieces that are not a recipe: the Medusa checkpointer, and the validation the recipe runs
(teacher-forced head metrics, real tree decoding, the tree grown from measured agreement), usable on their own.
The rest of ``medusa_finetune``'s library side lives in private modules: config checks (``_config_checks``),
parallelism (``_parallelize``), training state (``_state``, ``_full_state``), stages, data, hidden-state cache,
LoRA, optimizers and the heads' token map (``_head_vocab``).

To load a finished run for decoding, use :func:`torchtune_medusa.load_medusa`.
"""

from torchtune_medusa.training._checkpointer import HEAD_INIT_SEED, MEDUSA_KEY, MedusaHFCheckpointer
from torchtune_medusa.training._validation import evaluate_decoding, evaluate_heads, tree_of_size

__all__ = [
    "HEAD_INIT_SEED",
    "MEDUSA_KEY",
    "MedusaHFCheckpointer",
    "evaluate_decoding",
    "evaluate_heads",
    "tree_of_size",
]
