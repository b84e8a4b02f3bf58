# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

import pytest
import torch

from torchtune_medusa.generation._sampling import select_path
from torchtune_medusa.generation._tree import (
    build_tree_buffers,
    chain,
    MC_SIM_7B_63,
    topk_per_head_tree,
    tree_stats,
    validate_choices,
    WELL_KNOWN_TREES,
)


def test_well_known_trees():
    assert tree_stats(MC_SIM_7B_63) == {
        "nodes": 63,
        "tree_tokens": 64,
        "leaves": 42,
        "nodes_per_depth": [10, 28, 23, 2],
    }
    for name, tree in WELL_KNOWN_TREES.items():
        b = build_tree_buffers(tree, num_heads=4)
        assert b.num_nodes == 64, name
        assert b.max_depth <= 4


def test_buffers_small_tree():
    # nodes after sorting: 1:(0,) 2:(1,) 3:(0,0) 4:(0,1) 5:(1,0) 6:(0,0,0)
    b = build_tree_buffers([(0, 0, 0), (1,), (0,), (0, 1), (1, 0), (0, 0)], topk=4)
    assert b.choices == [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    assert b.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert b.parent.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert b.tree_indices.tolist() == [0, 1, 2, 5, 6, 5, 9]  # 1 + (depth-1)*topk + rank
    expect = torch.zeros(7, 7, dtype=torch.bool)
    for i, anc in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 1, 3, 6]]):
        expect[i, anc] = True
    assert torch.equal(b.attn_mask, expect)
    rows = {tuple(r[v].tolist()) for r, v in zip(b.retrieve_indices, b.retrieve_valid)}
    assert rows == {(0, 1, 3, 6), (0, 1, 4), (0, 2, 5)}
    assert b.retrieve_indices.shape == (3, 4)


def test_chain_and_topk_trees():
    assert chain(3) == [(0,), (0, 0), (0, 0, 0)]
    t = topk_per_head_tree([3, 2])
    assert len(t) == 3 + 6 and build_tree_buffers(t).num_leaves == 6
    root_only = build_tree_buffers([])
    assert root_only.num_nodes == 1 and root_only.retrieve_indices.tolist() == [[0]]
    assert build_tree_buffers("chain4").max_depth == 4


@pytest.mark.parametrize(
    "choices, kwargs, match",
    [
        ([(0,), (0,)], {}, "duplicate"),
        ([(0, 1)], {}, "prefix"),
        ([(0,), (0, 0, 1)], {}, "prefix"),
        ([(10,)], {}, "outside"),
        ([(3,)], {"topk": 3}, "outside"),
        ([(-1,)], {}, "outside"),
        ([()], {}, "empty"),
        ([(0,), (0, 0), (0, 0, 0)], {"num_heads": 2}, "only 2 Medusa heads"),
        ([(0.5,)], {}, "integers"),
        ("no_such_tree", {}, "unknown tree"),
    ],
)
def test_validation_errors(choices, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_tree_buffers(choices, **kwargs)


def test_validate_sorts():
    assert validate_choices([[1], [0, 0], [0]]) == [(0,), (1,), (0, 0)]


def test_padding_is_never_accepted():
    # Leaf (1,) is a depth-1 path padded to depth 2; its padding points at the root. Even if every node "matches"
    # (as FasterDecoding's id-0 padding can), the padded path only accepts its real length.
    b = build_tree_buffers([(0,), (1,), (0, 0)])
    ok = torch.ones(b.num_nodes, dtype=torch.bool)
    ok[3] = False  # (0, 0) rejected: the best path is (0,) or (1,) with length 1, never 2
    best, acc = select_path(ok, b.retrieve_indices, b.retrieve_valid)
    assert acc.item() == 1
    ok[1] = False  # (0,) rejected too: only (1,) can be accepted, with length 1 (not 2 through its padding)
    best, acc = select_path(ok, b.retrieve_indices, b.retrieve_valid)
    assert acc.item() == 1 and b.retrieve_indices[best, 1].item() == 2
