# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Decoding: the autoregressive baseline, Medusa tree decoding with KV-cache eviction, candidate trees and
tree calibration."""

from torchtune_medusa.generation._calibration import (
    calibrate_tree,
    CalibratedTree,
    expected_tokens_per_step,
    load_tree,
    measure_head_accuracies,
    measure_step_cost,
    save_tree,
    TREE_FILENAME,
)
from torchtune_medusa.generation._generate import (
    DEFAULT_MEDUSA_CHOICES,
    generate,
    GenerationOutput,
    GenerationStats,
    medusa_generate,
)
from torchtune_medusa.generation._kv import evict_to_path, kv_caches, scoped_kv_cache
from torchtune_medusa.generation._sampling import (
    greedy_node_mask,
    sample_next,
    select_path,
    typical_node_mask,
    typical_threshold,
)
from torchtune_medusa.generation._settings import decode_compile, decode_dtype, decode_threads, native_bf16
from torchtune_medusa.generation._step import frequent_tokens
from torchtune_medusa.generation._tree import (
    build_tree_buffers,
    chain,
    grow_tree,
    MC_SIM_7B_63,
    resolve_choices,
    topk_per_head_tree,
    tree_stats,
    TreeBuffers,
    validate_choices,
    VICUNA_7B_STAGE2,
    VICUNA_13B_STAGE2,
    VICUNA_33B_STAGE2,
    WELL_KNOWN_TREES,
    ZEPHYR_STAGE2,
)

__all__ = [
    "CalibratedTree",
    "TREE_FILENAME",
    "calibrate_tree",
    "expected_tokens_per_step",
    "load_tree",
    "measure_head_accuracies",
    "measure_step_cost",
    "save_tree",
    "DEFAULT_MEDUSA_CHOICES",
    "GenerationOutput",
    "GenerationStats",
    "MC_SIM_7B_63",
    "TreeBuffers",
    "VICUNA_13B_STAGE2",
    "VICUNA_33B_STAGE2",
    "VICUNA_7B_STAGE2",
    "WELL_KNOWN_TREES",
    "ZEPHYR_STAGE2",
    "build_tree_buffers",
    "chain",
    "decode_compile",
    "decode_dtype",
    "decode_threads",
    "native_bf16",
    "evict_to_path",
    "frequent_tokens",
    "generate",
    "greedy_node_mask",
    "grow_tree",
    "kv_caches",
    "medusa_generate",
    "resolve_choices",
    "sample_next",
    "scoped_kv_cache",
    "select_path",
    "topk_per_head_tree",
    "tree_stats",
    "typical_node_mask",
    "typical_threshold",
    "validate_choices",
]
