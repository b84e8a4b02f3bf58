# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Lookup drafts: the n-gram index, the draft chain in the tree, and decoding with both."""

import copy
import random

import pytest
import torch
from common import tiny_medusa
from test_generate import _prompts, train_tiny_heads

from torchtune_medusa.generation import generate, medusa_generate
from torchtune_medusa.generation._kv import kv_caches, scoped_kv_cache
from torchtune_medusa.generation._lookup import PromptLookup
from torchtune_medusa.generation._step import Acceptance, decoding_scope, start_decoding, step_functions, tree_step
from torchtune_medusa.generation._tree import build_tree_buffers, topk_per_head_tree, with_draft_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_draft(tokens, num_tokens, min_ngram, max_ngram):
    """By a backward scan: the tokens after the latest earlier occurrence of the longest suffix that has one, the
    sequence extended by its own draft where the continuation reaches the end."""
    end = len(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= end:
            continue
        suffix = tokens[end - n :]
        for start in range(end - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                extended = list(tokens)
                while len(extended) < start + n + num_tokens:
                    extended.append(extended[len(extended) - (end - start - n)])
                return extended[start + n : start + n + num_tokens]
    return []


@pytest.mark.parametrize("ngram", [(1, 1), (2, 3), (1, 4)])
def test_lookup_drafts_match_a_backward_scan(ngram):
    rng = random.Random(0)
    checked = drafted = 0
    for trial in range(30):
        seq = [rng.randrange(4 if trial % 2 else 12) for _ in range(rng.randint(1, 40))]
        lookup = PromptLookup(seq[:1], ngram=ngram)
        for i in range(1, len(seq) + 1):
            for num_tokens in (1, 3, 6):
                expected = _reference_draft(seq[:i], num_tokens, *ngram)
                assert lookup.draft(num_tokens) == expected, (seq[:i], num_tokens, ngram)
                drafted += bool(expected)
                checked += 1
            if i < len(seq):
                lookup.extend(seq[i : i + 1])
    assert drafted > 100 and checked - drafted > 100  # both matches and misses were checked


def test_lookup_extends_a_repeating_loop_and_refuses_bad_ngrams():
    lookup = PromptLookup([5, 7, 5, 7], ngram=(2, 3))
    assert lookup.draft(5) == [5, 7, 5, 7, 5]  # [5, 7] occurred at 0: its continuation runs into the suffix
    assert PromptLookup([1, 2, 3], ngram=(2, 3)).draft(4) == []
    for bad in [(0, 2), (3, 2), (2,), "23", (1.0, 2), 3]:
        with pytest.raises(ValueError, match="lookup_ngram"):
            PromptLookup([1], ngram=bad)


def test_draft_chain_buffers():
    tree = build_tree_buffers([(0,), (1,), (0, 0)], topk=3)
    both = with_draft_chain(tree, 3)
    assert (both.head_nodes, both.num_nodes, both.verify_depth, both.max_depth) == (4, 7, 3, 2)
    assert both.depth.tolist() == [0, 1, 1, 2, 1, 2, 3]
    assert both.parent.tolist() == [0, 0, 0, 1, 0, 4, 5]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[:4, :4] = tree.attn_mask
    for node, ancestors in {4: [0, 4], 5: [0, 4, 5], 6: [0, 4, 5, 6]}.items():
        expected[node, ancestors] = True
    assert torch.equal(both.attn_mask, expected)
    # the heads' paths keep their rows (padded to the chain's depth); the chain's is last
    assert tree.retrieve_indices.tolist() == [[0, 2, 0], [0, 1, 3]]
    assert both.retrieve_indices.tolist() == [[0, 2, 0, 0], [0, 1, 3, 0], [0, 4, 5, 6]]
    assert both.retrieve_valid.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    for field in ("tree_indices", "ancestors", "parent_slot", "rank"):
        assert torch.equal(getattr(both, field), getattr(tree, field))
    with pytest.raises(ValueError, match="at least one token"):
        with_draft_chain(tree, 0)
    with pytest.raises(ValueError, match="already has a draft chain"):
        with_draft_chain(both, 2)


def _one_step(model, prompt, tree, draft):
    """Prefill ``prompt`` and run one tree step with ``draft``: ``(accepted, tokens, state)``."""
    fns = step_functions(model)
    with decoding_scope(model, batch_size=1, cache_len=64, pack_weights=False):
        state = start_decoding(fns, torch.tensor(prompt), 64, Acceptance())
        a, tokens = tree_step(fns, kv_caches(model), state, tree, Acceptance(), draft)
    return a, tokens, state


def test_tree_step_accepts_a_right_draft_and_not_a_wrong_one():
    model = tiny_medusa(num_heads=2, seed=3)
    prompt = [3, 9, 27, 81]
    greedy = generate(model, [prompt], max_new_tokens=6).tokens[0]  # greedy[0] is the root of the first step
    tree = with_draft_chain(build_tree_buffers([(0,), (0, 0)], topk=10), 4)
    a, tokens, state = _one_step(model, prompt, tree, torch.tensor(greedy[1:5]))
    assert (a, tokens) == (4, greedy[1:6])  # the whole draft and the bonus token
    assert state.draft_accepted == (4 if state.heads_accepted < 4 else 0)
    wrong = torch.tensor([(greedy[1] + 1) % 128] + greedy[2:5])
    a, tokens, state = _one_step(model, prompt, tree, wrong)
    assert state.draft_accepted == 0 and a == state.heads_accepted and tokens == greedy[1 : 2 + a]
    for draft in (None, torch.tensor(greedy[1:3])):
        with pytest.raises(ValueError, match="draft chain of 4 nodes"):
            _one_step(model, prompt, tree, draft)
    with pytest.raises(ValueError, match="draft chain of 0 nodes"):
        _one_step(model, prompt, build_tree_buffers([(0,)], topk=10), torch.tensor([1]))


@pytest.mark.parametrize("head_type", ["medusa", "hydra"])
def test_medusa_greedy_with_lookup_equals_baseline_and_drafts_are_accepted(head_type):
    model = train_tiny_heads(head_type=head_type)[0] if head_type == "hydra" else train_tiny_heads()[0]
    prompts = _prompts(10, seed=31, lo=2, hi=10)
    base = [generate(model, [p], max_new_tokens=40).tokens[0] for p in prompts]
    tree = topk_per_head_tree([2, 1])
    on = medusa_generate(model, prompts, max_new_tokens=40, medusa_choices=tree, lookup_tokens=5)
    off = medusa_generate(model, prompts, max_new_tokens=40, medusa_choices=tree, lookup_tokens=0)
    assert on.tokens == base and off.tokens == base
    assert (off.stats.lookup_steps, off.stats.lookup_accepted) == (0, 0)
    assert on.stats.lookup_steps > 0 and on.stats.lookup_accepted > 0
    assert max(on.stats.accepted_per_step) <= 1 + 5
    assert on.stats.mean_accepted > off.stats.mean_accepted  # the tiny model's greedy output loops
    assert on.stats.tree_size == off.stats.tree_size == len(tree) + 1


def test_lookup_steps_leave_the_cache_as_plain_decoding_would():
    model = train_tiny_heads()[0]
    ref_model = copy.deepcopy(model)
    lengths = []

    def on_step(committed, length):
        assert len(committed) == length
        with scoped_kv_cache(ref_model, batch_size=1, cache_len=length + 1, dtype=torch.float32):
            ref_model.set_return_hidden(True)
            slots = torch.arange(length)
            causal = slots[None, :, None] >= torch.arange(length + 1)[None, None, :]
            ref_model(torch.tensor([committed]), mask=causal, input_pos=slots[None])
            ref_model.set_return_hidden(False)
            for c, r in zip(kv_caches(model), kv_caches(ref_model)):
                torch.testing.assert_close(c.k_cache[:, :, :length], r.k_cache[:, :, :length], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(c.v_cache[:, :, :length], r.v_cache[:, :, :length], atol=1e-5, rtol=1e-4)
        lengths.append(length)

    out = medusa_generate(model, _prompts(3, seed=32, lo=2, hi=6), max_new_tokens=24, lookup_tokens=4, on_step=on_step)
    assert out.stats.lookup_accepted > 0 and len(lengths) == out.stats.steps


def test_lookup_respects_the_cache_and_refuses_bad_settings():
    model = train_tiny_heads()[0]
    p = _prompts(1, seed=33, lo=6, hi=6)[0]
    base = generate(model, [p], max_new_tokens=40, max_cache_len=24).tokens
    out = medusa_generate(model, [p], max_new_tokens=40, max_cache_len=24, medusa_choices=[(0,)], lookup_tokens=8)
    assert out.tokens == base and out.stats.stop_reasons == ["cache_full"]
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"lookup_tokens={bad!r}: must be an integer >= 0"):
            medusa_generate(model, [p], max_new_tokens=4, lookup_tokens=bad)
    with pytest.raises(ValueError, match=r"lookup_ngram must be \[shortest, longest\]"):
        medusa_generate(model, [p], max_new_tokens=4, lookup_ngram=(3, 1))
