# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Decoding: the autoregressive baseline, Medusa tree decoding with KV-cache eviction, and the candidate tree.

The entry points are exported here; the pieces they are built from (tree buffers, acceptance rules, KV-cache
eviction, the decoding step, prompt-lookup drafts) live in the private modules ``_tree``, ``_sampling``, ``_kv``,
``_step`` and ``_lookup``.

Example:
    >>> from torchtune_medusa import load_medusa
    >>> from torchtune_medusa.generation import medusa_generate
    >>> run = load_medusa("output/smollm2_135m_medusa")
    >>> out = medusa_generate(run.model, [prompt_ids], medusa_choices=run.medusa_choices, max_new_tokens=64)
"""

from torchtune_medusa.generation._calibration import (
    calibrate_tree,
    CalibratedTree,
    measure_head_accuracies,
    measure_step_cost,
)
from torchtune_medusa.generation._generate import generate, GenerationOutput, GenerationStats, medusa_generate
from torchtune_medusa.generation._settings import decode_settings, DecodeSettings
from torchtune_medusa.generation._tree import load_tree, resolve_choices, save_tree

__all__ = [
    "CalibratedTree",
    "DecodeSettings",
    "GenerationOutput",
    "GenerationStats",
    "calibrate_tree",
    "decode_settings",
    "generate",
    "load_tree",
    "measure_head_accuracies",
    "measure_step_cost",
    "medusa_generate",
    "resolve_choices",
    "save_tree",
]
