# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The single decoding step: what decoding runs is what is timed, compiled == eager, and the decoding attention
equals torchtune's."""

import itertools
import logging

import pytest
import torch
from common import tiny_medusa
from test_generate import _prompts, train_tiny_heads

from torchtune_medusa.generation import (
    _calibration,
    _generate,
    _step,
    calibrate_tree,
    generate,
    measure_step_cost,
    medusa_generate,
)
from torchtune_medusa.generation._kv import kv_caches, scoped_kv_cache
from torchtune_medusa.generation._step import (
    Acceptance,
    decoding_scope,
    frequent_tokens,
    start_decoding,
    step_functions,
    tree_step,
)
from torchtune_medusa.generation._tree import build_tree_buffers, topk_per_head_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def _spy(monkeypatch, module, calls):
    real = _step.tree_step

    def spy(fns, caches, state, tree, acceptance, *draft):
        calls.append(tree.num_nodes)
        return real(fns, caches, state, tree, acceptance, *draft)

    monkeypatch.setattr(module, "tree_step", spy)


def test_decoding_and_step_cost_run_the_same_step(monkeypatch):
    model = tiny_medusa(num_heads=3)
    decoded, timed = [], []
    _spy(monkeypatch, _generate, decoded)
    _spy(monkeypatch, _calibration, timed)
    out = medusa_generate(model, _prompts(1), max_new_tokens=8, medusa_choices=topk_per_head_tree([2, 1]))
    assert 5 in decoded and set(decoded) <= {5, 5 + 6} and len(decoded) == out.stats.steps  # 6: a lookup draft
    measure_step_cost(model, (1, 3, 5), context_len=8, repeats=2, warmup=1)
    assert sorted(timed) == sorted([1, 3, 5] * 3)  # every round visits every size, the warm-up round included


def _snapshot(model):
    return [(c.k_cache.clone(), c.v_cache.clone()) for c in kv_caches(model)]


def _run_steps(model, fns, prompt, tree, steps):
    """Prefill ``prompt`` then run ``steps`` tree steps; returns the committed tokens, the final length and the
    committed K/V rows of every layer."""
    cache_len = 64
    with torch.inference_mode(), decoding_scope(model, batch_size=1, cache_len=cache_len):
        caches = kv_caches(model)
        state = start_decoding(fns, torch.tensor(prompt), cache_len, Acceptance())
        tokens = []
        for _ in range(steps):
            tokens += tree_step(fns, caches, state, tree, Acceptance())[1]
        rows = [(k[:, :, : state.length].clone(), v[:, :, : state.length].clone()) for k, v in _snapshot(model)]
    return tokens, state.length, rows


def test_compiled_step_equals_eager_in_fp32():
    model, _ = train_tiny_heads(num_heads=3)
    tree = build_tree_buffers(topk_per_head_tree([2, 1, 1]), num_heads=3)
    prompt = _prompts(1, seed=3)[0]
    eager = _run_steps(model, step_functions(model), prompt, tree, steps=6)
    compiled_fns = step_functions(model, compile=True)
    assert compiled_fns is step_functions(model, compile=True)  # graphs are kept for the next call
    with_vocab = step_functions(model, compile=True, proposal_vocab=torch.arange(20))
    assert step_functions(model, compile=True) is compiled_fns  # a baseline call between Medusa calls keeps both
    assert step_functions(model, compile=True, proposal_vocab=torch.arange(20)) is with_vocab
    compiled = _run_steps(model, compiled_fns, prompt, tree, steps=6)
    assert compiled[0] == eager[0] and compiled[1] == eager[1]
    assert len(compiled[0]) > 6  # six steps made more than six tokens: the trained heads were accepted
    for (ke, ve), (kc, vc) in zip(eager[2], compiled[2]):
        torch.testing.assert_close(kc, ke, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vc, ve, rtol=1e-5, atol=1e-5)
    # Compiled graphs hold frozen weights: an in-place weight update means new graphs, not stale output.
    with torch.no_grad():
        model.medusa_heads[0][0].linear.bias.add_(0.5)
    assert step_functions(model, compile=True) is not compiled_fns
    with torch.no_grad():
        model.medusa_heads[0][0].linear.bias.sub_(0.5)
    # The whole compiled decoder is lossless against the eager baseline.
    prompts = _prompts(2, seed=4)
    base = generate(model, prompts, max_new_tokens=40).tokens
    graphs = []

    def count_graphs(*_):
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    fast = medusa_generate(
        model,
        prompts,
        max_new_tokens=40,
        medusa_choices=topk_per_head_tree([2, 1, 1]),
        compile=True,
        lookup_tokens=3,
        on_step=count_graphs,
    )
    assert fast.tokens == base
    # A step with a lookup draft is one more tree size: its graph was compiled before decoding, not in a step.
    assert fast.stats.lookup_steps > 0 and len(set(graphs)) == 1


def test_fast_attention_equals_torchtune_attention():
    model = tiny_medusa(num_heads=1)
    model.set_return_hidden(True)
    tokens = torch.tensor([_prompts(1, seed=5, lo=9, hi=9)[0]])
    slots = torch.arange(16)
    mask = slots[None, :9, None] >= slots[None, None, :]
    outs = []
    attn = next(m for m in model.modules() if isinstance(m, torch.nn.Module) and hasattr(m, "kv_cache"))
    for fast in (False, True):
        with torch.no_grad(), scoped_kv_cache(model, batch_size=1, cache_len=16, dtype=torch.float32):
            if fast:
                with _step.fast_attention(model):
                    assert "forward" in vars(attn)
                    outs.append(model(tokens, mask=mask, input_pos=slots[None, :9]))
                assert "forward" not in vars(attn)  # torchtune's forward is back
            else:
                outs.append(model(tokens, mask=mask, input_pos=slots[None, :9]))
    model.set_return_hidden(False)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


class FakeClock:
    """A clock whose step durations come from ``cost(T)`` plus noise; the tree size is read from the last step."""

    def __init__(self, cost, noise):
        self.now, self.cost, self.noise, self.last_t = 0.0, cost, noise, 1
        self.started = False

    def __call__(self):
        if self.started:
            self.now += self.cost(self.last_t) * (1 + next(self.noise))
        self.started = not self.started
        return self.now


def test_step_cost_under_a_noisy_fake_timer_calibrates_a_sane_tree(monkeypatch, caplog):
    model = tiny_medusa(num_heads=3)
    clock = FakeClock(lambda t: 0.010 + 0.0005 * t, itertools.cycle([0.0, 0.05, -0.04, 3.0, 0.02, -0.01, 0.01]))
    real = _step.tree_step

    def step(fns, caches, state, tree, acceptance):
        clock.last_t = tree.num_nodes
        return real(fns, caches, state, tree, acceptance)

    monkeypatch.setattr(_calibration, "tree_step", step)
    spread = {}
    cost = measure_step_cost(model, (1, 2, 4, 8, 16), context_len=8, repeats=7, timer=clock, spread=spread)
    for t, c in cost.items():  # medians shrug off the one-in-seven 4x outlier
        assert c == pytest.approx(0.010 + 0.0005 * t, rel=0.06)
    acc = [[0.7, 0.1], [0.5, 0.1], [0.3, 0.1]]
    best = calibrate_tree(acc, cost, max_nodes=30)
    assert 1.0 < best.expected_speedup <= 4.0  # a depth-3 tree yields at most 4 tokens per step
    assert best.medusa_choices and max(len(p) for p in best.medusa_choices) <= 3


def test_calibration_never_trusts_a_falling_cost_curve(caplog):
    acc = [[0.5, 0.2, 0.1, 0.1], [0.3, 0.2, 0.1, 0.1]]
    with caplog.at_level(logging.WARNING):
        best = calibrate_tree(acc, {1: 0.010, 2: 0.004}, max_nodes=8)
    assert 1.0 < best.expected_speedup <= 3.0  # depth 2: never more than 3 tokens for one step's cost
    assert "step costs fall" in caplog.text
    # Extrapolation past the largest measured size never falls below the 1-token cost either.
    best = calibrate_tree([[0.9, 0.1]] * 3, {1: 0.010, 4: 0.011, 8: 0.0105}, max_nodes=40)
    assert best.expected_speedup <= 4.0


def test_calibration_refuses_accuracies_that_are_not_probabilities_of_one_right_rank():
    with pytest.raises(ValueError, match=r"head 1's accuracies by rank sum to 5.000 > 1"):
        calibrate_tree([[0.5] * 10, [0.3] * 3], {1: 0.010, 2: 0.012}, max_nodes=8)


def test_noisy_step_timings_warn(caplog):
    model = tiny_medusa(num_heads=1)
    durations = itertools.cycle([0.01, 0.03])
    state = {"t": 0.0, "start": True}

    def clock():
        if not state["start"]:
            state["t"] += next(durations)
        state["start"] = not state["start"]
        return state["t"]

    with caplog.at_level(logging.WARNING):
        measure_step_cost(model, (1, 2), context_len=8, repeats=6, timer=clock)
    assert "machine looks busy" in caplog.text


@pytest.mark.parametrize("own_projection", [False, True])
def test_proposal_vocab_proposes_the_same_candidates_when_it_holds_them(own_projection):
    model = tiny_medusa(num_heads=3, own_projection=own_projection)
    hidden = torch.randn(model.tok_embeddings.embedding_dim)
    full = step_functions(model).propose(hidden, 3, 4)  # [3 * 4]
    vocab = torch.cat([full, torch.tensor([0, 1, 2])]).unique()
    restricted = step_functions(model, proposal_vocab=vocab).propose(hidden, 3, 4)
    assert torch.equal(restricted, full)
    # Without head 1's favourite, every head proposes its best allowed tokens instead.
    banned = int(full[0])
    vocab = torch.tensor([t for t in range(model.tok_embeddings.num_embeddings) if t != banned])
    restricted = step_functions(model, proposal_vocab=vocab).propose(hidden, 3, 4).view(3, 4).tolist()
    top5 = step_functions(model).propose(hidden, 3, 5).view(3, 5).tolist()
    assert restricted == [[t for t in row if t != banned][:4] for row in top5]


def test_a_proposal_vocab_keeps_greedy_decoding_exact():
    model, data = train_tiny_heads(num_heads=3)
    vocab = frequent_tokens(data.tolist(), 24, model.tok_embeddings.num_embeddings)
    prompts = _prompts(3, seed=6)
    base = generate(model, prompts, max_new_tokens=16).tokens
    out = medusa_generate(
        model, prompts, max_new_tokens=16, medusa_choices=topk_per_head_tree([3, 2, 1]), proposal_vocab=vocab
    )
    assert out.tokens == base
    assert out.stats.mean_accepted > 1.0  # the frequent tokens hold the heads' right guesses often enough


def test_frequent_tokens():
    seqs = [[5, 5, 5, 2, 2, 9], [9, 9, 9, 7]]
    assert frequent_tokens(seqs, 2, 10).tolist() == [5, 9]  # 4 x 9, 3 x 5; returned sorted by id
    assert frequent_tokens(seqs, 4, 10).tolist() == [2, 5, 7, 9]
    assert frequent_tokens(seqs, 5, 10).tolist() == [0, 2, 5, 7, 9]  # never-seen ids fill up, lowest first
    with pytest.raises(ValueError, match="pick a size in 1..10"):
        frequent_tokens(seqs, 11, 10)


@pytest.mark.parametrize("s", [1, 3])
def test_grouped_matmul_attention_equals_sdpa_and_ignores_slots_past_the_mask(s):
    torch.manual_seed(0)
    b, h, kv_heads, d, cache_len, width = 4, 6, 2, 16, 24, 15
    q = torch.randn(b, h, s, d).bfloat16()
    k = torch.randn(b, kv_heads, cache_len, d).bfloat16()
    v = torch.randn(b, kv_heads, cache_len, d).bfloat16()
    mask = torch.rand(b, s, width) > 0.3
    mask[..., 0] = True  # every query sees a slot
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.float(),
        k[:, :, :width].float().repeat_interleave(h // kv_heads, dim=1),
        v[:, :, :width].float().repeat_interleave(h // kv_heads, dim=1),
        attn_mask=mask[:, None],
    )
    out = _step._grouped_matmul_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and out.shape == (b, h, s, d)
    torch.testing.assert_close(out.float(), reference, rtol=0.02, atol=0.02)
    k[:, :, width:], v[:, :, width:] = 30.0, 1e4  # stale slots past the mask: never attended
    torch.testing.assert_close(_step._grouped_matmul_attention(q, k, v, mask), out, rtol=0, atol=0)


@pytest.mark.usefixtures("one_thread")
def test_batched_bf16_scopes_attend_over_a_bf16_cache(monkeypatch):
    model = tiny_medusa(num_heads=1).to(torch.bfloat16)
    prompts = _prompts(3, seed=6, lo=5, hi=9)

    def cache_dtype(m, batch_size):
        with decoding_scope(m, batch_size=batch_size, cache_len=16):
            return kv_caches(m)[0].k_cache.dtype

    assert cache_dtype(model, 3) == torch.bfloat16
    assert cache_dtype(model, 1) == torch.float32  # batch 1: fp32 SDPA is faster
    assert cache_dtype(tiny_medusa(num_heads=1), 3) == torch.float32  # fp32 models: exact fp32 attention
    outs = []
    for batched_attention in (True, False):
        monkeypatch.setattr(_step, "USE_BATCHED_BF16_ATTENTION", batched_attention)
        assert cache_dtype(model, 3) == (torch.bfloat16 if batched_attention else torch.float32)
        outs.append(generate(model, prompts, max_new_tokens=6, return_hidden=True))
    # the state behind each row's first new token (the prompt through either attention) agrees to bf16 precision
    for bf16_cache, fp32_cache in zip(outs[0].hidden, outs[1].hidden):
        torch.testing.assert_close(bf16_cache[0].float(), fp32_cache[0].float(), rtol=0.05, atol=0.05)
