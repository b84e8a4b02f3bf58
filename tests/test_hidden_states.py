# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Hidden states saved by self-distillation: what decoding computed equals an uncached forward, the data set lines
them up with the reply tokens, resumes keep them consistent, and the recipe trains heads on them (and refuses
states of other weights)."""

import json

import pytest
import torch
from common import write_tiny_hf_checkpoint
from data_common import conv, kill_after_first_batch, Killed, write_jsonl
from safetensors.torch import load_file
from test_recipe import make_cfg, read_log, run_recipe
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from torchtune_medusa._load import load_hf_base
from torchtune_medusa.data import (
    hidden_states_dir,
    self_distilled_hidden_dataset,
    smollm2_tokenizer,
    weights_fingerprint,
)
from torchtune_medusa.data._self_distill import self_distill
from torchtune_medusa.generation import generate
from torchtune_medusa.modules import MedusaTransformerDecoder


def _varied_checkpoint(folder, seed: int = 0):
    """The tiny random checkpoint with small (tied) embeddings: its greedy replies then vary from token to token,
    instead of repeating one token, so that heads have something to learn."""
    from safetensors.torch import save_file

    folder = write_tiny_hf_checkpoint(folder, seed=seed)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.embed_tokens.weight"] *= 0.05
    save_file(weights, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hidden")
    hf = _varied_checkpoint(root / "hf")
    rows = [
        conv("human", q, "gpt", "x", id=f"c{i}")
        for i, q in enumerate(["hi", "Count from 3.", "What is the capital of France?", "a b c d e", "hello there"])
    ]
    rows.append(conv("human", "one", "gpt", "a", "human", "two", "gpt", "b", id="multi"))
    return {"root": root, "hf": hf, "prompts": write_jsonl(root / "prompts.jsonl", rows)}


@pytest.fixture(scope="module")
def base(assets):
    return load_hf_base(assets["hf"])


def _uncached_hidden(model: nn.Module, tokens) -> torch.Tensor:
    view = MedusaTransformerDecoder.from_decoder(model, nn.ModuleList())
    view.set_return_hidden(True)
    with torch.no_grad():
        return view(torch.tensor([tokens]))[0]


def test_generate_returns_the_hidden_state_behind_every_token(base):
    prompts = [[5, 9, 12, 40, 7, 3], [8, 2], [30, 31, 32, 33]]  # different lengths: left padding
    out = generate(base, prompts, max_new_tokens=7, stop_tokens=[4], return_hidden=True)
    assert out.hidden is not None and len(out.hidden) == 3
    for prompt, toks, hidden in zip(prompts, out.tokens, out.hidden):
        assert hidden.shape == (len(toks), base.norm.scale.numel())
        reference = _uncached_hidden(base, prompt + toks)[len(prompt) - 1 : len(prompt) - 1 + len(toks)]
        torch.testing.assert_close(hidden, reference, rtol=1e-4, atol=1e-5)
        # and it is the state the token came from: greedy decoding picked its argmax
        with torch.no_grad():
            assert base.output(hidden).argmax(-1).tolist() == toks
    assert generate(base, prompts, max_new_tokens=3).hidden is None


def _distill(assets, base, out, **kw):
    tokenizer = smollm2_tokenizer(str(assets["hf"]), max_seq_len=128)
    kw = dict(dict(max_new_tokens=8, batch_size=2, progress=False, max_prompt_len=100, save_hidden=True), **kw)
    return self_distill(base, tokenizer, str(assets["prompts"]), out, **kw)


def test_saved_states_line_up_with_the_replies(assets, base, tmp_path):
    out = tmp_path / "replies.jsonl"
    _distill(assets, base, out, multi_turn=True)
    folder = hidden_states_dir(out)
    assert folder == tmp_path / "replies.hidden" and sorted(p.name for p in folder.iterdir())
    ds = self_distilled_hidden_dataset(data_files=[str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(ds) == sum(len(r["self_distill"]["new_tokens"]) for r in records) == 7  # multi: 2 turns
    assert ds.greedy_targets and ds.fingerprint == weights_fingerprint(base)
    tokenizer = smollm2_tokenizer(str(assets["hf"]), max_seq_len=128)
    for i in range(len(ds)):
        sample, hidden = ds[i], ds.hidden_state(i)
        reply = sample["tokens"][1:]
        assert sample["labels"] == [CROSS_ENTROPY_IGNORE_IDX] + reply
        assert hidden.shape == (len(reply), base.norm.scale.numel())
        with torch.no_grad():  # greedy replies: the labels are the base model's greedy picks
            assert base.output(hidden).argmax(-1).tolist() == reply
    # the first reply of the first record, against an uncached forward over its whole conversation
    first = records[0]
    from torchtune.data import Message

    prompt = tokenizer.prompt_tokens([Message("user", first["conversations"][0]["value"])])
    sample = ds[0]
    assert sample["tokens"][0] == prompt[-1]
    reference = _uncached_hidden(base, prompt + sample["tokens"][1:])[len(prompt) - 1 : -1]
    torch.testing.assert_close(ds.hidden_state(0), reference, rtol=1e-4, atol=1e-5)
    # max_seq_len cuts tokens and states together
    short = self_distilled_hidden_dataset(data_files=str(out), max_seq_len=4)
    assert len(short[0]["tokens"]) == 4 and short.hidden_state(0).size(0) == 3


def test_resumed_run_saves_what_an_uninterrupted_one_saves(assets, base, tmp_path):
    reference = tmp_path / "ref.jsonl"
    _distill(assets, base, reference)

    out = tmp_path / "out.jsonl"
    with pytest.raises(Killed):
        _distill(assets, base, out, on_batch=kill_after_first_batch)
    # a kill after the batch file but before its JSONL lines: the file is there, nothing points to it yet
    (hidden_states_dir(out) / "batch-000001.safetensors").write_bytes(
        (hidden_states_dir(out) / "batch-000000.safetensors").read_bytes()
    )
    _distill(assets, base, out)
    assert out.read_bytes() == reference.read_bytes()
    ref_files = sorted(hidden_states_dir(reference).iterdir())
    assert [p.name for p in ref_files] == sorted(p.name for p in hidden_states_dir(out).iterdir())
    for p in ref_files:
        a, b = load_file(str(p)), load_file(str(hidden_states_dir(out) / p.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming with or without --save-hidden is refused the other way round
    with pytest.raises(ValueError, match="save_hidden"):
        _distill(assets, base, out, save_hidden=False)


def test_bad_files_are_refused_with_the_fix(assets, base, tmp_path):
    plain = tmp_path / "plain.jsonl"
    _distill(assets, base, plain, save_hidden=False)
    with pytest.raises(ValueError, match="--save-hidden"):
        self_distilled_hidden_dataset(data_files=str(plain))
    out = tmp_path / "out.jsonl"
    _distill(assets, base, out)
    (hidden_states_dir(out) / "batch-000000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="batch-000000.safetensors is missing"):
        self_distilled_hidden_dataset(data_files=str(out))
    with pytest.raises(ValueError, match="packed"):
        self_distilled_hidden_dataset(data_files=str(out), packed=True)
    with pytest.raises(ValueError, match="text_files needs the tokenizer"):
        self_distilled_hidden_dataset(data_files=str(out), text_files=str(out))


def _hidden_cfg(assets, out, data):
    return make_cfg(
        {"hf": assets["hf"], "train": assets["prompts"]},
        out,
        epochs=1,
        cache_hidden_states=True,
        head_targets="base_greedy",
        dataset={"_component_": "torchtune_medusa.data.self_distilled_hidden_dataset", "data_files": [str(data)]},
        batch_size=2,
    )


def test_recipe_trains_heads_on_saved_states(assets, base, tmp_path):
    data = tmp_path / "replies.jsonl"
    _distill(assets, base, data, max_new_tokens=12)
    out = tmp_path / "run"
    recipe = run_recipe(_hidden_cfg(assets, out, data))
    ds = self_distilled_hidden_dataset(data_files=str(data))
    cache = recipe._hidden_cache
    assert len(cache) == len(ds) == 6  # 5 single-turn + the first turn of "multi"
    for i in range(len(ds)):
        n = len(ds[i]["tokens"])
        hidden = cache.batch(torch.tensor([i]), n, torch.device("cpu"))[0]
        torch.testing.assert_close(hidden[: n - 1], ds.hidden_state(i))
        assert torch.equal(hidden[n - 1], torch.zeros_like(hidden[n - 1]))
        greedy = cache.greedy_batch(torch.tensor([i]), n, torch.device("cpu"))[0]
        assert greedy.tolist() == ds[i]["tokens"][1:] + [0]
    assert (out / "epoch_0" / "medusa_lm_head.safetensors").is_file()

    losses = [float(line.split("loss/head_1:")[1].split()[0]) for line in read_log(out).splitlines()]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)

    # sampled replies are not the base model's greedy picks: the cache holds none, the projection gives them
    sampled = tmp_path / "sampled.jsonl"
    _distill(assets, base, sampled, max_new_tokens=12, temperature=1.0, seed=3)
    assert not self_distilled_hidden_dataset(data_files=str(sampled)).greedy_targets
    out = tmp_path / "run_sampled"
    recipe = run_recipe(_hidden_cfg(assets, out, sampled))
    assert recipe._hidden_cache.greedy_batch(torch.tensor([0]), 13, torch.device("cpu")) is None
    losses = [float(line.split("loss/head_1:")[1].split()[0]) for line in read_log(out).splitlines()]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)


def test_recipe_refuses_states_of_other_weights_or_without_the_cache(assets, base, tmp_path):
    data = tmp_path / "replies.jsonl"
    _distill(assets, base, data)
    other = _varied_checkpoint(tmp_path / "other", seed=1)
    cfg = _hidden_cfg(assets, tmp_path / "run", data)
    cfg.checkpointer.checkpoint_dir = str(other)
    cfg.tokenizer.path = str(other)
    with pytest.raises(ValueError, match="computed by other weights"):
        run_recipe(cfg)
    cfg = _hidden_cfg(assets, tmp_path / "run2", data)
    cfg.cache_hidden_states = False
    with pytest.raises(ValueError, match="cache_hidden_states=True"):
        run_recipe(cfg)
    # mixed with other data, the saved states are only read from the cache: it must hold them all
    cfg = _hidden_cfg(assets, tmp_path / "run3", data)
    chat = {"_component_": "torchtune_medusa.data.medusa_chat_dataset", "data_files": str(data)}
    cfg.dataset = [dict(cfg.dataset), chat]
    cfg.hidden_cache_max_gb = 1e-9
    with pytest.raises(ValueError, match="raise hidden_cache_max_gb"):
        run_recipe(cfg)


@pytest.mark.parametrize("text_first", [True, False])
def test_recipe_mixes_saved_states_with_text_whose_states_it_computes(assets, base, tmp_path, text_first):
    """The self-distilled part reads its saved states, the text part (raw conversations, here the prompts with their
    written replies) gets the backbone's states and greedy picks, computed once: as a ``dataset`` list (text first,
    so that the saved part's indices are offset) or with the builder's ``text_files`` (saved first)."""
    data = tmp_path / "replies.jsonl"
    _distill(assets, base, data, max_new_tokens=12)
    cfg = _hidden_cfg(assets, tmp_path / "run", data)
    if text_first:
        text = {"_component_": "torchtune_medusa.data.medusa_chat_dataset", "data_files": str(assets["prompts"])}
        cfg.dataset = [text, dict(cfg.dataset)]
    else:
        cfg.dataset.text_files = str(assets["prompts"])
    recipe = run_recipe(cfg)
    cache, saved = recipe._hidden_cache, self_distilled_hidden_dataset(data_files=str(data))
    n_text = len(recipe._dataset) - len(saved)
    assert n_text > 0 and len(cache) == len(recipe._dataset)
    cpu = torch.device("cpu")
    for i in range(len(recipe._dataset)):
        tokens = recipe._dataset[i]["tokens"]
        hidden = cache.batch(torch.tensor([i]), len(tokens), cpu)[0]
        greedy = cache.greedy_batch(torch.tensor([i]), len(tokens), cpu)[0]
        is_text = i < n_text if text_first else i >= len(saved)
        if is_text:  # computed: the backbone's states of the sample's tokens, and their greedy picks
            reference = _uncached_hidden(base, tokens)
            torch.testing.assert_close(hidden, reference, rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                assert greedy.tolist() == base.output(reference).argmax(-1).tolist()
        else:  # saved: exactly what self-distillation wrote
            j = i - n_text if text_first else i
            torch.testing.assert_close(hidden[: len(tokens) - 1], saved.hidden_state(j), rtol=0, atol=0)
            assert greedy.tolist() == saved[j]["tokens"][1:] + [0]
