# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Truncated-vocabulary heads (a token map): loss, validation and decoding against full-vocabulary references."""

import json

import pytest
import torch
import torch.nn.functional as F
from common import TINY, tiny_medusa
from safetensors.torch import load_file

from torchtune_medusa.generation import generate, medusa_generate
from torchtune_medusa.generation._tree import MC_SIM_7B_63
from torchtune_medusa.models._convert_weights import export_heads, import_heads
from torchtune_medusa.modules import MedusaCrossEntropyLoss, MedusaSelfDistillationLoss
from torchtune_medusa.training._validation import evaluate_heads

IGNORE = -100
V = TINY["vocab_size"]
# every third token, so that some targets fall outside the map
TOKEN_MAP = torch.arange(0, V, 3)


def batch(b=3, s=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (b, s), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((b, 1), IGNORE)], dim=1)
    labels[:, :2] = IGNORE
    return tokens, labels


def hidden_of(model, tokens):
    model.set_return_hidden(True)
    with torch.no_grad():
        return model(tokens)


def reference_head_terms(model, hidden, labels, head, token_map):
    """Head ``head``'s logits over the whole vocabulary, cut to the map by hand, and its targets as map indices."""
    full = model.output(model.medusa_heads[head - 1](hidden[:, :-head]))  # shared projection: full vocabulary
    targets = labels[:, head:]
    keep = targets != IGNORE
    logits, targets = full[keep][:, token_map], targets[keep]
    index = torch.full((V,), -1, dtype=torch.long)
    index[token_map] = torch.arange(len(token_map))
    return logits, index[targets]


@pytest.mark.parametrize("own_projection", [False, True])
def test_head_logits_are_the_token_map_columns(own_projection):
    model = tiny_medusa(own_projection=own_projection, tied=not own_projection)
    full_rows = [model.medusa_heads[k].projection.weight[TOKEN_MAP].clone() for k in range(3)] if own_projection else []
    h = torch.randn(2, 5, TINY["embed_dim"])
    want = model.medusa_logits(h)[..., TOKEN_MAP]
    if own_projection:  # own projections must be cut to the map first
        with pytest.raises(ValueError, match="build the heads with vocab_size=43"):
            model.set_medusa_token_map(TOKEN_MAP)
        for head, rows in zip(model.medusa_heads, full_rows):
            head[head.num_layers] = torch.nn.Linear(TINY["embed_dim"], len(TOKEN_MAP), bias=False)
            head[head.num_layers].weight.data.copy_(rows)
    model.set_medusa_token_map(TOKEN_MAP)
    got = model.medusa_logits(h)
    assert got.shape == (3, 2, 5, len(TOKEN_MAP))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.project(h, 2), want[1])


def test_cross_entropy_with_token_map_matches_reference():
    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    tokens, labels = batch()
    hidden = hidden_of(model, tokens)
    loss_fn = MedusaCrossEntropyLoss(
        num_output_chunks=3, decay=1.0, heads_coefficient=1.0, include_base_loss=False, topk=[1, 5]
    )
    out = loss_fn(hidden, labels, model.project, num_heads=3)  # the map comes from the bound method's model
    n_valid = (labels != IGNORE).sum()
    want_loss = 0.0
    for head in (1, 2, 3):
        logits, targets = reference_head_terms(model, hidden, labels, head, TOKEN_MAP)
        inside = targets >= 0
        assert 0 < inside.sum() < len(targets)  # both kinds of targets are exercised
        want_loss += F.cross_entropy(logits[inside], targets[inside], reduction="sum")
        top1 = (logits.argmax(-1) == targets).sum()  # targets outside the map (-1) are misses
        top5 = (logits.topk(5, -1).indices == targets[:, None]).any(-1).sum()
        assert out.head_counts[head] == len(targets)
        assert out.head_topk_correct[head].tolist() == [top1.item(), top5.item()]
    torch.testing.assert_close(out.loss, want_loss / n_valid)
    # explicit map == the model's
    again = loss_fn(hidden, labels, lambda h, k: model.project(h, k), num_heads=3, token_map=TOKEN_MAP)
    torch.testing.assert_close(again.loss, out.loss)


def test_self_distillation_kl_restricts_the_teacher_to_the_map():
    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    tokens, labels = batch(seed=1)
    hidden = hidden_of(model, tokens)
    loss_fn = MedusaSelfDistillationLoss(
        num_output_chunks=2,
        decay=1.0,
        heads_coefficient=1.0,
        include_base_loss=False,
        head_target="teacher_distribution",
    )
    out = loss_fn(hidden, labels, model.project, hidden, model.project, num_heads=1)
    # head 1 against the base model's distribution at t + 1, over the map's tokens only
    student = model.output(model.medusa_heads[0](hidden[:, :-1]))[..., TOKEN_MAP]
    teacher = model.output(hidden[:, 1:])[..., TOKEN_MAP]
    keep = labels[:, 1:] != IGNORE
    want = F.kl_div(
        F.log_softmax(student[keep], -1), F.log_softmax(teacher[keep], -1), log_target=True, reduction="sum"
    )
    torch.testing.assert_close(out.loss, want / (labels != IGNORE).sum())


def test_validation_counts_targets_outside_the_map_as_misses():
    model = tiny_medusa(own_projection=False, tied=True)
    tokens, labels = batch(seed=2)
    unshifted = torch.cat([torch.full_like(labels[:, :1], IGNORE), labels[:, :-1]], dim=1)
    run = dict(
        batches=[{"tokens": tokens, "labels": unshifted}],
        hidden_fn=lambda b: hidden_of(model, b["tokens"]),
        project=model.project,
        num_heads=3,
        ignore_index=IGNORE,
        topk=5,
        device=torch.device("cpu"),
    )
    model.set_medusa_token_map(TOKEN_MAP)
    cut = evaluate_heads(**run, token_map=TOKEN_MAP)
    for head in (1, 2, 3):
        logits, targets = reference_head_terms(model, hidden_of(model, tokens), labels, head, TOKEN_MAP)
        want = (logits.argmax(-1) == targets).float().mean().item()
        assert cut["metrics"][f"val/top1/head_{head}"] == pytest.approx(want)
    # the agreement table compares full-vocabulary ids: rank r of head k (a map index, mapped back) against the
    # base model's greedy token k positions later
    hidden = hidden_of(model, tokens)
    base_greedy = model.output(hidden).argmax(-1)
    for head in (1, 2, 3):
        logits, _ = reference_head_terms(model, hidden, labels, head, TOKEN_MAP)
        candidates = TOKEN_MAP[logits.topk(5, -1).indices]
        greedy = base_greedy[:, head:][labels[:, head:] != IGNORE]
        want = (candidates == greedy[:, None]).float().mean(0)
        assert cut["agreement"][head - 1] == pytest.approx(want.tolist())


def test_greedy_decoding_with_a_token_map_is_lossless():
    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    prompts = [[5, 9, 17, 33], [7, 2]]
    want = generate(model, prompts, max_new_tokens=24).tokens
    out = medusa_generate(model, prompts, max_new_tokens=24, medusa_choices=MC_SIM_7B_63[:20])
    assert out.tokens == want
    with pytest.raises(ValueError, match="drop the proposal vocabulary"):
        medusa_generate(model, prompts, max_new_tokens=4, proposal_vocab=TOKEN_MAP)


def test_proposals_are_full_vocabulary_ids_of_the_map():
    from torchtune_medusa.generation._step import step_functions

    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    h = torch.randn(TINY["embed_dim"])
    proposed = step_functions(model).propose(h, 2, 4)
    want = TOKEN_MAP[model.medusa_logits(h[None], 2).topk(4, -1).indices.flatten()]
    assert proposed.tolist() == want.tolist()
    assert set(proposed.tolist()) <= set(TOKEN_MAP.tolist())
    # the map's rows of the shared output are gathered once, not at every step (inside a compiled step that gather
    # cost more than the step itself)
    fns = step_functions(model)
    assert torch.equal(fns._proposal_weights, model.output.weight[TOKEN_MAP] if hasattr(model.output, "weight")
                       else model.tok_embeddings.weight[TOKEN_MAP])  # fmt: skip


def test_state_dict_round_trip_sets_the_map():
    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    sd = model.state_dict()
    assert torch.equal(sd["medusa_heads.token_map"], TOKEN_MAP)
    fresh = tiny_medusa(own_projection=False, tied=True, seed=1)
    assert fresh.medusa_token_map is None
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.medusa_token_map, TOKEN_MAP)
    h = torch.randn(1, 3, TINY["embed_dim"])
    torch.testing.assert_close(fresh.medusa_logits(h), model.medusa_logits(h))
    fresh.set_medusa_token_map(None)
    assert "medusa_heads.token_map" not in fresh.state_dict()


@pytest.mark.parametrize(
    "token_map, match",
    [
        (torch.tensor([3, 2, 7]), "sorted, distinct"),
        (torch.tensor([1, 1]), "sorted, distinct"),
        (torch.tensor([], dtype=torch.long), "non-empty"),
        (torch.tensor([0, V]), "outside the vocabulary"),
    ],
)
def test_bad_token_maps_are_refused(token_map, match):
    model = tiny_medusa(own_projection=False, tied=True)
    with pytest.raises(ValueError, match=match):
        model.set_medusa_token_map(token_map)


def test_vllm_export_and_import_keep_the_token_map(tmp_path):
    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    cfg = export_heads(model, tmp_path / "vllm", format="vllm")
    assert cfg.truncated_vocab_size == len(TOKEN_MAP)
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["truncated_vocab_size"] == len(TOKEN_MAP) and config["original_lm_head"] is False
    tensors = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    assert torch.equal(tensors["token_map"], TOKEN_MAP)
    assert tensors["lm_heads.0.weight"].shape == (len(TOKEN_MAP), TINY["embed_dim"])

    heads, back = import_heads(tmp_path / "vllm")
    assert back.projection == "own" and back.truncated_vocab_size == len(TOKEN_MAP)
    # the imported heads (own truncated projections) give the same logits as the shared, mapped ones
    own = tiny_medusa(own_projection=True, seed=3)
    for head in own.medusa_heads:
        head[head.num_layers] = torch.nn.Linear(TINY["embed_dim"], len(TOKEN_MAP), bias=False)
    own.load_state_dict(heads, strict=False)
    assert torch.equal(own.medusa_token_map, TOKEN_MAP)
    h = torch.randn(2, 4, TINY["embed_dim"])
    torch.testing.assert_close(own.medusa_logits(h), model.medusa_logits(h))

    # our own format round-trips the map too
    export_heads(model, tmp_path / "ours", format="torchtune")
    heads, ours = import_heads(tmp_path / "ours")
    assert ours.projection == "shared" and torch.equal(heads["medusa_heads.token_map"], TOKEN_MAP)


@pytest.mark.parametrize("fmt", ["fasterdecoding_v2", "fasterdecoding_v1", "tgi_v2"])
def test_formats_without_a_token_map_refuse_truncated_heads(tmp_path, fmt):
    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    with pytest.raises(ValueError, match="export as 'vllm'"):
        export_heads(model, tmp_path, format=fmt, base_model_name_or_path="x")
    assert not any(tmp_path.iterdir())


def test_head_accuracies_for_calibration_rank_within_the_map():
    from torchtune_medusa.generation._calibration import measure_head_accuracies

    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    seq = torch.randint(1, V, (30,), generator=torch.Generator().manual_seed(5))
    acc = measure_head_accuracies(model, [seq.tolist()], topk=4)
    hidden = hidden_of(model, seq[None])[0]
    index = torch.full((V,), -1, dtype=torch.long)
    index[TOKEN_MAP] = torch.arange(len(TOKEN_MAP))
    for k in (1, 2, 3):
        logits = model.output(model.medusa_heads[k - 1](hidden[: 30 - k - 1]))[:, TOKEN_MAP]
        targets = index[seq[k + 1 :]]
        order = logits.argsort(-1, descending=True)[:, :4]
        want = [((order[:, r] == targets) & (targets >= 0)).float().sum().item() / len(targets) for r in range(4)]
        assert acc[k - 1].tolist() == pytest.approx(want)


def test_validation_reuses_the_frozen_base_results():
    """With base_results, the base head is projected once: later calls (after the heads trained on) reuse its
    picks and sums and report exactly what a full evaluation reports."""
    model = tiny_medusa(own_projection=False, tied=True)
    model.set_medusa_token_map(TOKEN_MAP)
    batches = []
    for seed in (3, 4):
        tokens, labels = batch(seed=seed)
        unshifted = torch.cat([torch.full_like(labels[:, :1], IGNORE), labels[:, :-1]], dim=1)
        batches.append({"tokens": tokens, "labels": unshifted})
    base_calls = []

    def project(hidden, head, *prev):
        base_calls.extend([head] if head == 0 else [])
        return model.project(hidden, head, *prev)

    run = dict(
        batches=batches,
        hidden_fn=lambda b: hidden_of(model, b["tokens"]),
        project=project,
        num_heads=2,
        ignore_index=IGNORE,
        topk=5,
        num_chunks=2,
        device=torch.device("cpu"),
        token_map=TOKEN_MAP,
    )
    memo = []
    first = evaluate_heads(**run, base_results=memo)
    assert len(memo) == 2 and len(base_calls) == 4  # two chunks of two batches
    assert first == evaluate_heads(**run)
    with torch.no_grad():  # the heads train on; the frozen backbone does not
        for p in model.medusa_heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base_calls.clear()
    later = evaluate_heads(**run, base_results=memo)
    assert base_calls == []
    assert later == evaluate_heads(**run)
    assert later["metrics"]["val/loss/head_1"] != first["metrics"]["val/loss/head_1"]
    with pytest.raises(ValueError, match="holds 2 batches' results, not 1: pass"):
        evaluate_heads(**{**run, "batches": batches[:1]}, base_results=memo)
