# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

import logging

import pytest
import torch
from data_common import conv, tiny_tokenizer, write_jsonl
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.datasets import PackedDataset

from torchtune_medusa.data import medusa_chat_dataset, medusa_text_dataset, smollm2_tokenizer

IGNORE = CROSS_ENTROPY_IGNORE_IDX


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path / "tok")


def trained_text(tok, item) -> str:
    return tok.decode([t for t, lab in zip(item["tokens"], item["labels"]) if lab != IGNORE], skip_special_tokens=False)


def test_chat_labels_per_role(tok, tmp_path):
    rows = [
        conv("system", "Be brief.", "human", "What is the capital?", "gpt", "Paris.", "human", "Joke?", "gpt", "A cat.")
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    item = medusa_chat_dataset(tok, data_files=str(path))[0]
    assert set(item) == {"tokens", "labels"} and len(item["tokens"]) == len(item["labels"])
    # labels are the tokens themselves where trained (the recipe shifts), -100 elsewhere
    assert all(lab in (tok_, IGNORE) for tok_, lab in zip(item["tokens"], item["labels"]))
    assert trained_text(tok, item) == "Paris.<|im_end|>A cat.<|im_end|>"
    assert tok.decode(item["tokens"], skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nJoke?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    on_input = medusa_chat_dataset(tok, data_files=str(path), train_on_input=True)[0]
    assert "What is the capital?" in trained_text(tok, on_input)
    assert "Be brief." not in trained_text(tok, on_input)  # the system prompt is never trained on
    sys_prompt = medusa_chat_dataset(tok, data_files=str(path), new_system_prompt="Rhyme.")[0]
    assert tok.decode(sys_prompt["tokens"]).startswith("system\nRhyme.\nuser\n")


def test_shift_convention_with_torchtune_collate(tok, tmp_path):
    """Items collate with torchtune's padded_collate_sft; after the recipe's one-step shift, every trained
    position predicts the next assistant token."""
    path = write_jsonl(
        tmp_path / "c.jsonl", [conv("human", "hi", "gpt", "hello world"), conv("human", "x", "gpt", "y")]
    )
    ds = medusa_chat_dataset(tok, data_files=str(path))
    batch = padded_collate_sft([ds[0], ds[1]], padding_idx=tok.pad_id)
    tokens, labels = batch["tokens"], batch["labels"]
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    pos = (shifted[0] != IGNORE).nonzero().flatten()
    assert tok.decode(tokens[0, pos[0] : pos[0] + 1].tolist(), skip_special_tokens=False) == "\n"  # after "assistant"
    assert (shifted[0, pos] == tokens[0, pos + 1]).all()
    assert tok.decode(shifted[0, pos].tolist(), skip_special_tokens=False) == "hello world<|im_end|>"


def test_truncation_drop_long_and_long_prompts(tok, tmp_path, caplog):
    long_reply = conv("human", "hi", "gpt", "The capital of France is Paris. " * 10)
    long_prompt = conv("human", "The capital of France is Paris. " * 10, "gpt", "ok")
    short = conv("human", "hi", "gpt", "ok")
    path = write_jsonl(tmp_path / "c.jsonl", [long_reply, long_prompt, short])
    with caplog.at_level(logging.INFO):
        ds = medusa_chat_dataset(tok, data_files=str(path), max_seq_len=24)
    assert len(ds) == 2 and len(ds[0]["tokens"]) == 24
    assert ds[0]["tokens"][-1] != tok.eos_id  # cut, no end token forced in
    assert ds.stats["truncated to max_seq_len=24"] == 1
    assert ds.stats["skipped: no trainable token within max_seq_len=24 (prompt too long)"] == 1
    assert any(r.levelno == logging.WARNING and "prompt too long" in r.message for r in caplog.records)
    dropped = medusa_chat_dataset(tok, data_files=str(path), max_seq_len=24, drop_long=True)
    assert len(dropped) == 1 and dropped.stats["skipped: longer than max_seq_len=24 (drop_long=True)"] == 2
    # the tokenizer's own max_seq_len is the default limit
    assert len(medusa_chat_dataset(tiny_tokenizer(tmp_path / "t2", max_seq_len=24), data_files=str(path))) == 2


def test_packing_boundaries(tok, tmp_path):
    rows = [conv("human", f"question {i}", "gpt", "answer " * (i + 1)) for i in range(6)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    plain = medusa_chat_dataset(tok, data_files=str(path))
    packed = medusa_chat_dataset(tok, data_files=str(path), packed=True, max_seq_len=48)
    assert isinstance(packed, PackedDataset) and packed.stats["kept"] == 6 and len(packed) > 1
    at = 0
    for pack in packed:
        assert pack["tokens"].shape == (48,) and pack["seq_lens"].sum() == 48
        start = 0
        for n in pack["seq_lens"].tolist():
            tokens, labels = pack["tokens"][start : start + n].tolist(), pack["labels"][start : start + n]
            if at < len(plain) and tokens == plain[at]["tokens"]:  # a whole conversation, never split
                assert labels.tolist() == plain[at]["labels"]
                assert pack["input_pos"][start] == 0
                # it starts with its masked prompt, so the recipe's shift (and Medusa look-aheads shorter than
                # the prompt) never make a target of the next conversation in the pack
                assert (labels[:4] == IGNORE).all() and tokens[0] == tok.im_start_id
                at += 1
            else:  # the padding at the end of a pack
                assert start + n == 48 and set(tokens) == {tok.pad_id} and (labels == IGNORE).all()
            start += n
    assert at == 6


def test_bad_chat_input(tok, tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="data_files entry .*missing.jsonl"):
        medusa_chat_dataset(tok, data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="needs data_files"):
        medusa_chat_dataset(tok)
    good = write_jsonl(tmp_path / "good.jsonl", [conv("human", "hi", "gpt", "ok")])
    with pytest.raises(ValueError, match="conversation_column='messages' is not in the data.*conversations"):
        medusa_chat_dataset(tok, data_files=str(good), conversation_column="messages")
    with pytest.raises(ValueError, match="conversation_style"):
        medusa_chat_dataset(tok, data_files=str(good), conversation_style="alpaca")
    with pytest.raises(ValueError, match="packed=True needs max_seq_len"):
        medusa_chat_dataset(tok, data_files=str(good), packed=True)
    with pytest.raises(ValueError, match="max_seq_len must be"):
        medusa_chat_dataset(tok, data_files=str(good), max_seq_len=1)
    rows = [
        conv("human", "hi", "gpt", "ok"),
        {"conversations": []},
        conv("human", "hi", "bing", "ok"),
        conv("human", "hi", "gpt", "   "),
        conv("human", "a", "human", "b", "gpt", "c"),
        conv("human", "a", "gpt", "b", "system", "c", "gpt", "d"),
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
        conv("gpt", "hello", "human", "hi", "gpt", "ok", "human", "unanswered"),  # repaired, kept
        conv("human", "only a question"),
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ds = medusa_chat_dataset(tok, data_files=str(path))
    assert len(ds) == 2
    assert ds.stats == {
        "read": 9,
        "kept": 2,
        "skipped: missing or empty conversation": 1,
        "skipped: unknown role 'bing'": 1,
        "skipped: an empty message": 1,
        "skipped: roles do not alternate user/assistant": 1,
        "skipped: a system message after the first turn": 1,
        "skipped: a turn without 'from' and 'value'": 1,
        "skipped: no user/assistant exchange": 1,
        "dropped a leading assistant turn": 1,
        "dropped a trailing unanswered user turn": 2,
    }
    assert "unknown role 'bing': 1" in caplog.text
    assert trained_text(tok, ds[1]) == "ok<|im_end|>"
    nothing = write_jsonl(tmp_path / "nothing.jsonl", rows[1:4])
    with pytest.raises(ValueError, match="no usable conversation"):
        medusa_chat_dataset(tok, data_files=str(nothing))


def test_openai_style(tok, tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "o.jsonl", [row])
    ds = medusa_chat_dataset(tok, data_files=str(path), conversation_column="messages", conversation_style="openai")
    assert trained_text(tok, ds[0]) == "hello<|im_end|>"


def test_text_blocks(tok, tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("Shall I compare thee to a summer's day?\nThou art more lovely.\n")
    b.write_text("What is the capital of France?\n")
    stream = tok.encode(a.read_text(), add_eos=False) + [0] + tok.encode(b.read_text(), add_eos=False) + [0]
    ds = medusa_text_dataset(tok, data_files=[str(a), str(b)], block_size=8)
    assert ds.stats["documents"] == 2 and ds.stats["tokens"] == len(stream)
    assert len(ds) == len(stream) // 8 and ds.stats["dropped tail tokens"] == len(stream) % 8
    flat = [t for i in range(len(ds)) for t in ds[i]["tokens"]]
    assert flat == stream[: len(ds) * 8]  # documents joined with <|endoftext|>, cut in order
    assert all(ds[i]["labels"] == ds[i]["tokens"] for i in range(len(ds)))  # the recipe shifts
    no_eos = medusa_text_dataset(tok, data_files=str(a), block_size=4, add_eos=False)
    assert 0 not in [t for i in range(len(no_eos)) for t in no_eos[i]["tokens"]]
    by_line = medusa_text_dataset(tok, data_files=str(a), block_size=4, sample_by="line")
    assert by_line.stats["documents"] == 2


def test_bad_text_input(tok, tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("short")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        medusa_text_dataset(tok, data_files=str(tmp_path / "nope.txt"), block_size=8)
    with pytest.raises(ValueError, match="block_size must be"):
        medusa_text_dataset(tok, data_files=str(a))
    with pytest.raises(ValueError, match="fewer than block_size=64"):
        medusa_text_dataset(tok, data_files=str(a), block_size=64)
    with pytest.raises(ValueError, match="column='body' is not in the data; its columns are \\['text'\\]"):
        medusa_text_dataset(tok, data_files=str(a), block_size=2, column="body")
    with pytest.raises(ValueError, match="sample_by"):
        medusa_text_dataset(tok, data_files=str(a), block_size=2, sample_by="page")
    assert len(medusa_text_dataset(tok, data_files=str(tmp_path / "*.txt"), block_size=2)) >= 1  # globs work


@pytest.mark.slow
def test_real_assets(smollm2_assets):
    data_assets = smollm2_assets
    tok = smollm2_tokenizer(str(data_assets.smollm2_dir), max_seq_len=512)
    chat = medusa_chat_dataset(tok, data_files=str(data_assets.sharegpt_heldout))
    assert chat.stats["kept"] > 300 and len(chat[0]["tokens"]) <= 512
    text = medusa_text_dataset(tok, data_files=str(data_assets.shakespeare), block_size=512)
    assert len(text) > 1000 and text.stats["documents"] == 1
    assert tok.decode(text[0]["tokens"])[:20].strip()
