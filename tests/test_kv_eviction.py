# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Eviction of every possible accepted path of a small tree leaves exactly the cache of plain decoding."""

import pytest
import torch
from common import tiny_medusa

from torchtune_medusa.generation._kv import evict_to_path, kv_caches, scoped_kv_cache
from torchtune_medusa.generation._tree import build_tree_buffers

TREE = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = tiny_medusa(num_heads=3)
    m.set_return_hidden(True)
    return m


def _prefill(model, tokens, cache_len):
    n = len(tokens)
    slots = torch.arange(cache_len)
    mask = slots[None, :n, None] >= slots[None, None, :]
    return model(torch.tensor([tokens]), mask=mask, input_pos=slots[None, :n])


@torch.no_grad()
@pytest.mark.parametrize("host_ints", [False, True])  # host ints: a path already in place moves nothing
@pytest.mark.parametrize("node", range(len(TREE) + 1))
def test_evict_every_path(model, node, host_ints):
    tree = build_tree_buffers(TREE)
    prompt = [5, 17, 99, 3, 42]
    torch.manual_seed(node)
    tree_tokens = torch.randint(0, 128, (tree.num_nodes,))
    # the accepted path from the root to `node`
    path = [node]
    while path[-1] != 0:
        path.append(int(tree.parent[path[-1]]))
    path = path[::-1]
    cache_len = 32
    length = len(prompt)
    with scoped_kv_cache(model, batch_size=1, cache_len=cache_len, dtype=torch.float32):
        _prefill(model, prompt, cache_len)
        mask = torch.zeros(1, tree.num_nodes, cache_len, dtype=torch.bool)
        mask[:, :, :length] = True
        mask[0, :, length : length + tree.num_nodes] = tree.attn_mask
        tree_hidden = model(tree_tokens[None], mask=mask, input_pos=(tree.depth + length)[None])
        accepted = path if host_ints else torch.tensor(path)
        evict_to_path(kv_caches(model), length=length, tree_size=tree.num_nodes, accepted=accepted)
        new_len = length + len(path)
        got = [
            (c.k_cache[:, :, :new_len].clone(), c.v_cache[:, :, :new_len].clone(), int(c.cache_pos[0]))
            for c in kv_caches(model)
        ]
        # one more plain decoding step continues correctly from the compacted cache
        step_mask = torch.zeros(1, 1, cache_len, dtype=torch.bool)
        step_mask[..., : new_len + 1] = True
        nxt = model(torch.tensor([[7]]), mask=step_mask, input_pos=torch.tensor([[new_len]]))
    committed = prompt + tree_tokens[path].tolist()
    with scoped_kv_cache(model, batch_size=1, cache_len=cache_len, dtype=torch.float32):
        ref_hidden = _prefill(model, committed, cache_len)
        ref = [(c.k_cache[:, :, :new_len], c.v_cache[:, :, :new_len]) for c in kv_caches(model)]
        for (k, v, pos), (rk, rv) in zip(got, ref):
            assert pos == new_len
            torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-4)
        ref_next = model(torch.tensor([[7]]), mask=step_mask, input_pos=torch.tensor([[new_len]]))
    torch.testing.assert_close(nxt, ref_next, atol=1e-5, rtol=1e-4)
    # the tree's hidden states along the path equal the plain prefill's
    torch.testing.assert_close(tree_hidden[0, path], ref_hidden[0, length:], atol=1e-5, rtol=1e-4)
