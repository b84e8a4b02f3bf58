# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

import random

import pytest
import torch
from test_generate import _prompts, train_tiny_heads

from torchtune_medusa.generation import (
    calibrate_tree,
    generate,
    load_tree,
    measure_head_accuracies,
    measure_step_cost,
    medusa_generate,
    save_tree,
)
from torchtune_medusa.generation._calibration import expected_tokens_per_step
from torchtune_medusa.generation._tree import build_tree_buffers, chain, grow_tree

ACC = [[0.6, 0.2, 0.1, 0.05], [0.4, 0.15, 0.1, 0.05], [0.3, 0.1, 0.05, 0.02]]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_grow_tree_is_best_first_and_prefix_closed():
    nodes = grow_tree(ACC, 20)
    values = [v for _, v in nodes]
    assert values == sorted(values, reverse=True)
    for n in range(1, 21):
        build_tree_buffers([p for p, _ in nodes[:n]], topk=4, num_heads=3)  # valid at every size
    assert nodes[0] == ((0,), 0.6) and nodes[1][0] == (0, 0)
    assert nodes[1][1] == pytest.approx(0.24)


def test_expected_tokens_formula():
    assert expected_tokens_per_step(chain(3), ACC) == pytest.approx(1 + 0.6 + 0.6 * 0.4 + 0.6 * 0.4 * 0.3)
    assert expected_tokens_per_step([(0,), (1,), (1, 0)], ACC) == pytest.approx(1 + 0.6 + 0.2 + 0.2 * 0.4)


def test_calibrate_tree_follows_cost():
    flat = calibrate_tree(ACC, {1: 1.0, 64: 1.0}, max_nodes=30, tolerance=0.0)
    assert len(flat.medusa_choices) == 30  # free verification: take every node offered
    smaller = calibrate_tree(ACC, {1: 1.0, 64: 1.0}, max_nodes=30)  # but the last nodes add under 3 % together
    assert 0 < len(smaller.medusa_choices) < 30
    assert smaller.expected_tokens_per_step >= 0.97 * flat.expected_tokens_per_step
    steep = calibrate_tree(ACC, {1: 1.0, 2: 3.0, 64: 100.0}, max_nodes=30)
    assert steep.medusa_choices == [] and steep.expected_speedup == pytest.approx(1.0)  # plain decoding wins
    mid = calibrate_tree(ACC, lambda t: 1.0 + 0.02 * (t - 1), max_nodes=60, tolerance=0.0)
    assert 0 < len(mid.medusa_choices) < 60
    best = max(mid.sizes, key=lambda s: s["tokens_per_s"])
    assert best["nodes"] == len(mid.medusa_choices)
    assert mid.expected_tokens_per_step == pytest.approx(expected_tokens_per_step(mid.medusa_choices, ACC))
    assert mid.expected_speedup == pytest.approx(best["tokens_per_s"] * 1.0)


def test_calibrate_tree_prefers_the_smallest_tree_within_tolerance():
    def cost(t):  # one extra token is free, then every token costs 10 %
        return 1.0 if t <= 2 else 1.0 + 0.1 * (t - 2)

    exact = calibrate_tree(ACC, cost, max_nodes=20, tolerance=0.0)
    speeds = [s["tokens_per_s"] for s in exact.sizes]
    assert len(exact.medusa_choices) == speeds.index(max(speeds))
    for tolerance in (0.02, 0.1, 0.3):
        chosen = calibrate_tree(ACC, cost, max_nodes=20, tolerance=tolerance)
        n = len(chosen.medusa_choices)
        within = [i for i, v in enumerate(speeds) if v >= max(speeds) * (1 - tolerance)]
        assert n == min(within) <= len(exact.medusa_choices)  # the smallest tree close enough to the best
        assert chosen.medusa_choices == exact.medusa_choices[:n]
        assert chosen.expected_speedup == pytest.approx(speeds[n] / speeds[0])
    # a large tolerance can fall back to plain decoding when trees promise little
    assert calibrate_tree(ACC, cost, max_nodes=20, tolerance=0.45).medusa_choices == []
    with pytest.raises(ValueError, match="tolerance=1.5"):
        calibrate_tree(ACC, cost, tolerance=1.5)


def test_save_load_roundtrip(tmp_path):
    tree = calibrate_tree(ACC, {1: 1.0, 16: 1.2, 64: 2.0}, meta={"model": "tiny"})
    path = save_tree(tmp_path, tree)
    assert path.name == "medusa_choices.json"
    choices, record = load_tree(tmp_path)
    assert [list(p) for p in choices] == sorted(tree.medusa_choices, key=lambda p: (len(p), p))
    assert record["meta"] == {"model": "tiny"} and record["head_accuracies"] == ACC
    assert record["step_cost"] == {"1": 1.0, "16": 1.2, "64": 2.0}
    save_tree(tmp_path / "chain.json", chain(2), note="x")
    assert build_tree_buffers(str(tmp_path / "chain.json")).choices == chain(2)


def test_measured_accuracies_predict_acceptance():
    model, data = train_tiny_heads()
    acc = measure_head_accuracies(model, data.tolist(), topk=4)
    assert acc.shape == (3, 4)
    assert bool((acc.sum(-1) <= 1 + 1e-9).all())
    assert acc[0, 0] > 0.3  # far above chance (1/128)
    # Held-out greedy continuations: the predicted tau of a chain tracks the measured one.
    prompts = _prompts(10, seed=99, lo=2, hi=6)
    held_out = [p + o for p, o in zip(prompts, generate(model, prompts, max_new_tokens=30).tokens)]
    acc_held = measure_head_accuracies(model, held_out, topk=4)
    predicted = expected_tokens_per_step(chain(3), acc_held)
    measured = medusa_generate(model, prompts, max_new_tokens=30, medusa_choices=chain(3)).stats.mean_accepted
    assert abs(predicted - measured) / measured < 0.35, (predicted, measured)


def test_measure_step_cost_and_calibrate_end_to_end(tmp_path):
    model, data = train_tiny_heads()
    cost = measure_step_cost(model, (1, 4, 16), context_len=32, repeats=3)
    assert set(cost) == {1, 4, 16} and all(v > 0 for v in cost.values())
    assert not model.caches_are_setup()
    tree = calibrate_tree(measure_head_accuracies(model, data.tolist()[:8]), cost, max_nodes=15)
    save_tree(tmp_path, tree)
    choices, _ = load_tree(tmp_path)
    p = random.Random(0).sample(range(128), 5)
    out = medusa_generate(model, [p], max_new_tokens=12, medusa_choices=str(tmp_path / "medusa_choices.json"))
    assert out.tokens[0] == generate(model, [p], max_new_tokens=12).tokens[0]
    assert out.stats.tree_size == len(choices) + 1


def test_head_accuracies_score_only_from_the_given_position():
    model, data = train_tiny_heads()
    seqs = data.tolist()[:3]
    first = [5, 9, 0]
    assert torch.equal(
        measure_head_accuracies(model, seqs, topk=3, score_from=[0, 0, 0]), measure_head_accuracies(model, seqs, topk=3)
    )
    acc = measure_head_accuracies(model, seqs, topk=3, score_from=first)
    # Independent count: head k's top-1 over the targets at index >= first (head k at t predicts t + k + 1).
    model.set_return_hidden(True)
    with torch.no_grad():
        for k in (1, 2):
            hits = total = 0
            for seq, f in zip(seqs, first):
                h = model(torch.tensor([seq]))[0]
                for t in range(len(seq) - k - 1):
                    if t + k + 1 >= f:
                        total += 1
                        hits += int(model.project(h[t], k).argmax()) == seq[t + k + 1]
            assert acc[k - 1, 0].item() == pytest.approx(hits / total)
    model.set_return_hidden(False)
    with pytest.raises(ValueError, match="score_from"):
        measure_head_accuracies(model, seqs, score_from=[0])
