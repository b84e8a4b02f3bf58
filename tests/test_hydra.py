# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Hydra heads (head k also reads the k tokens before its target): the tree below a root is what each head proposes
for its own path, decoding stays exactly greedy (eager, compiled, with a token map), the loss conditions every head
on the tokens before its target, the formats keep them, and the recipe trains, validates and saves them."""

import json

import pytest
import torch
import torch.nn.functional as F
from common import TINY, tiny_medusa
from test_generate import _prompts, train_tiny_heads
from test_hidden_states import _distill, _hidden_cfg, assets, base  # noqa: F401 (module fixtures)
from test_recipe import run_recipe

from torchtune_medusa import load_medusa
from torchtune_medusa.generation import generate, medusa_generate
from torchtune_medusa.generation._step import step_functions
from torchtune_medusa.generation._tree import build_tree_buffers, topk_per_head_tree
from torchtune_medusa.models import export_heads, import_heads
from torchtune_medusa.modules import medusa_heads, MedusaCrossEntropyLoss

DIM = TINY["embed_dim"]
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 1, 0), (1, 0, 1)]


@pytest.fixture(scope="module")
def hydra_model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny_heads(head_type="hydra")[0]
    finally:
        torch.set_num_threads(n)


def test_hydra_heads_read_the_tokens_before_their_target():
    heads = medusa_heads(num_heads=3, dim=8, vocab_size=16, head_type="hydra")
    assert heads.head_type == "hydra"
    assert [h[0].linear.weight.shape[1] for h in heads] == [16, 24, 32]  # [h, e_1..e_k]
    model = tiny_medusa(head_type="hydra")
    h = torch.randn(5, DIM)
    with pytest.raises(ValueError, match="prev_tokens"):
        model.project(h, 2)
    prev = torch.randint(0, 128, (5, 3))
    # head 2 reads the first two tokens only, and what it reads changes its output
    torch.testing.assert_close(model.project(h, 2, prev), model.project(h, 2, prev[:, :2]))
    other = prev.clone()
    other[:, 1] = (other[:, 1] + 1) % 128
    assert not torch.allclose(model.project(h, 2, prev), model.project(h, 2, other))
    with pytest.raises(ValueError, match="medusa_head_type"):
        from torchtune_medusa.models import medusa_smollm2_135m

        medusa_smollm2_135m(medusa_head_type="eagle")


@pytest.mark.parametrize("with_token_map", [False, True])
def test_tree_tokens_are_each_paths_own_proposals(with_token_map):
    """Reference: node by node, head d's top-k for the path above the node (the root first)."""
    model = tiny_medusa(head_type="hydra", own_projection=not with_token_map, tied=with_token_map)
    if with_token_map:
        model.set_medusa_token_map(torch.arange(1, 128, 2))
    tree = build_tree_buffers(TREE, topk=4, num_heads=3)
    hidden, root = torch.randn(DIM), torch.tensor(17)
    with torch.inference_mode():
        tokens = step_functions(model).tree_tokens(hidden, root, tree, topk=4).tolist()
    expected = {(): 17}
    for path in tree.choices:
        prev = torch.tensor([expected[path[:d]] for d in range(len(path))])
        logits = model.project(hidden[None], len(path), prev[None])[0]
        rank = int(torch.topk(logits, 4).indices[path[-1]])
        expected[path] = rank if model.medusa_token_map is None else int(model.medusa_token_map[rank])
    assert tokens == [17] + [expected[p] for p in tree.choices]


def test_greedy_hydra_decoding_equals_greedy_decoding(hydra_model):
    prompts = _prompts(6, seed=7, lo=2, hi=6)
    reference = generate(hydra_model, prompts, max_new_tokens=30).tokens
    for tree in ("chain3", topk_per_head_tree([2, 2, 2]), TREE):
        out = medusa_generate(hydra_model, prompts, medusa_choices=tree, max_new_tokens=30)
        assert out.tokens == reference
        assert out.stats.mean_accepted > 1.5  # the trained heads do get accepted
    vocab = torch.arange(0, 128, 3)
    out = medusa_generate(hydra_model, prompts, medusa_choices=TREE, max_new_tokens=30, proposal_vocab=vocab)
    assert out.tokens == reference


def test_compiled_hydra_step_equals_eager(hydra_model):
    prompts = _prompts(2, seed=11, lo=3, hi=6)
    eager = medusa_generate(hydra_model, prompts, medusa_choices=TREE, max_new_tokens=20)
    compiled = medusa_generate(hydra_model, prompts, medusa_choices=TREE, max_new_tokens=20, compile=True)
    assert compiled.tokens == eager.tokens == generate(hydra_model, prompts, max_new_tokens=20).tokens
    assert compiled.stats.accepted_per_step == eager.stats.accepted_per_step


def test_hydra_heads_beat_medusa_heads_on_the_same_data():
    """The point of Hydra: knowing the tokens before its target, head 2 guesses far better."""
    prompts = _prompts(8, seed=5, lo=2, hi=6)
    taus = {}
    for head_type in ("medusa", "hydra"):
        model = train_tiny_heads(head_type=head_type)[0]
        taus[head_type] = medusa_generate(model, prompts, medusa_choices="chain3", max_new_tokens=30).stats
    assert taus["hydra"].mean_accepted > taus["medusa"].mean_accepted


@pytest.mark.parametrize("with_tokens", [False, True])
def test_loss_conditions_each_head_on_the_tokens_before_its_target(with_tokens):
    """Head k at t reads the input tokens t+1..t+k (given ``tokens``), else the labels t..t+k-1; targets are the
    labels (here: not the next tokens, as with the base model's greedy picks as targets)."""
    model = tiny_medusa(head_type="hydra")
    hidden = torch.randn(2, 9, DIM)
    tokens = torch.randint(0, 128, (2, 9))
    labels = torch.randint(0, 128, (2, 9))
    labels[0, :2] = -100  # a prompt
    labels[1, -1] = -100
    loss_fn = MedusaCrossEntropyLoss(num_output_chunks=3, include_base_loss=False, heads_coefficient=1.0, decay=1.0)
    out = loss_fn(hidden, labels, model, tokens=tokens if with_tokens else None)
    total, counts = 0.0, []
    for k in range(1, 4):
        n = 9 - k
        if with_tokens:
            prev = torch.stack([tokens[:, 1 + j : 1 + j + n] for j in range(k)], -1)
        else:
            prev = torch.stack([labels[:, j : j + n] for j in range(k)], -1)
        target = labels[:, k : k + n]
        ok = (target != -100) & (prev != -100).all(-1)
        logits = model.project(hidden[:, :n][ok], k, prev[ok])
        total = total + F.cross_entropy(logits, target[ok], reduction="sum")
        counts.append(int(ok.sum()))
    assert out.head_counts[1:].tolist() == counts
    torch.testing.assert_close(out.loss, total / (labels != -100).sum())


def test_logits_mode_reads_the_input_tokens():
    model = tiny_medusa(head_type="hydra")
    tokens = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        out = model(tokens)
        model.set_return_hidden(True)
        hidden = model(tokens)
    t = 2
    prev = tokens[:, t + 1 : t + 4]
    torch.testing.assert_close(out.medusa_logits[2, 0, t], model.project(hidden[0, t][None], 3, prev)[0].float())


def test_formats_keep_hydra_heads_and_serving_formats_refuse_them(tmp_path):
    model = tiny_medusa(head_type="hydra")
    cfg = export_heads(model, tmp_path / "ours")
    assert cfg.head_type == "hydra"
    assert json.loads((tmp_path / "ours" / "medusa_config.json").read_text())["medusa_head_type"] == "hydra"
    heads, read = import_heads(tmp_path / "ours")
    assert read.head_type == "hydra"
    for key, value in model.medusa_heads.state_dict().items():
        assert torch.equal(heads["medusa_heads." + key], value)
    for fmt in ("vllm", "fasterdecoding_v1", "tgi_v2", "tensorrt_llm"):
        with pytest.raises(ValueError, match="Hydra heads"):
            export_heads(model, tmp_path / fmt, format=fmt)
    # a config that disagrees with the weights, and heads of both kinds in one file, are refused
    config = tmp_path / "ours" / "medusa_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "medusa_head_type": "medusa"}))
    with pytest.raises(ValueError, match="medusa_head_type"):
        import_heads(tmp_path / "ours")
    mixed = dict(heads)
    mixed["medusa_heads.1.0.linear.weight"] = tiny_medusa().medusa_heads[1][0].linear.weight
    with pytest.raises(ValueError, match="some heads are Hydra heads"):
        export_heads(mixed, tmp_path / "mixed")


def test_recipe_trains_validates_and_saves_hydra_heads(assets, base, tmp_path):  # noqa: F811
    data = tmp_path / "replies.jsonl"
    _distill(assets, base, data, max_new_tokens=12)
    out = tmp_path / "run"
    cfg = _hidden_cfg(assets, out, data)
    cfg.model.medusa_head_type = "hydra"
    cfg.checkpointer.medusa_head_type = "hydra"
    cfg.validation = {
        "dataset": {"_component_": "torchtune_medusa.data.medusa_chat_dataset", "data_files": str(data)},
        "num_prompts": 2,
        "max_new_tokens": 8,
        "calibrate_tree_nodes": 4,
    }
    run_recipe(cfg)
    val = json.loads((out / "metrics.json").read_text())["validation"]
    assert "val/top1/head_3" in val and val["val/tau"] >= 1.0
    run = load_medusa(out)
    assert run.model.medusa_head_type == "hydra"
    prompt = [5, 9, 12, 40]
    expected = generate(run.model, [prompt], max_new_tokens=10).tokens
    assert medusa_generate(run.model, [prompt], medusa_choices=run.medusa_choices, max_new_tokens=10).tokens == expected
    # a config whose checkpointer does not know the heads are Hydra heads is refused before any work
    cfg.checkpointer.medusa_head_type = "medusa"
    with pytest.raises(ValueError, match="medusa_head_type"):
        run_recipe(cfg)
    cfg.checkpointer.medusa_head_type = "hydra"
    cfg.export_vllm = True
    with pytest.raises(ValueError, match="export_vllm"):
        run_recipe(cfg)


def test_head_accuracies_read_each_positions_own_next_tokens(hydra_model):
    from torchtune_medusa.generation import measure_head_accuracies

    seq = generate(hydra_model, [[3, 14, 15]], max_new_tokens=20).tokens[0]
    tokens = [3, 14, 15] + seq
    acc = measure_head_accuracies(hydra_model, [tokens], topk=4)
    hydra_model.set_return_hidden(True)
    with torch.no_grad():
        h = hydra_model(torch.tensor([tokens]))[0]
        hydra_model.set_return_hidden(False)
        for k in range(1, 4):
            hits = torch.zeros(4)
            positions = range(len(tokens) - k - 1)
            for t in positions:
                logits = hydra_model.project(h[t][None], k, torch.tensor([tokens[t + 1 : t + 1 + k]]))[0]
                rank = int((logits > logits[tokens[t + k + 1]]).sum())
                if rank < 4:
                    hits[rank] += 1
            torch.testing.assert_close(acc[k - 1].float(), hits / len(positions))
