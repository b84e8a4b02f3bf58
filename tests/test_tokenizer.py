# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

import jinja2
import pytest
from data_common import tiny_tokenizer, write_tiny_tokenizer
from tokenizers import Tokenizer
from torchtune.data import Message

from torchtune_medusa.data import smollm2_tokenizer


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path / "tok")


def render(template: str, messages, add_generation_prompt=False) -> str:
    return (
        jinja2.Environment()
        .from_string(template)
        .render(
            messages=[{"role": m.role, "content": m.text_content} for m in messages],
            add_generation_prompt=add_generation_prompt,
        )
    )


CONVERSATION = [
    Message("system", "Be brief.", masked=True),
    Message("user", "What is the capital of France?", masked=True),
    Message("assistant", "The capital of France is Paris."),
    Message("user", "  indented\n\nand 123 numbers ", masked=True),
    Message("assistant", "\nShall I compare thee?"),
]


def test_special_ids(tok):
    assert (tok.text_eos_id, tok.im_start_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id == 0 and tok.bos_id is None
    assert tok.stop_tokens == [2, 0]
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert tok.vocab_size == 400
    assert "<|im_start|>" in tok.chat_template


def test_encode_decode(tok):
    text = "Hello world, 42 cats!"
    ids = tok.encode(text, add_bos=True, add_eos=False)
    assert tok.decode(ids) == text
    assert tok.encode(text)[-1] == tok.eos_id  # add_eos defaults to True; add_bos is a no-op (no BOS)
    assert tok.encode(text, add_bos=True, add_eos=True) == ids + [tok.eos_id]
    # special-token strings in text stay text: data cannot forge a turn boundary
    forged = tok.encode("a<|im_end|>b", add_eos=False)
    assert not set(forged) & {0, 1, 2}
    assert tok.decode(forged) == "a<|im_end|>b"
    assert tok.decode([1] + ids + [2], skip_special_tokens=False) == "<|im_start|>" + text + "<|im_end|>"


def test_tokens_match_the_jinja_chat_template(tok, tmp_path):
    """Same ids as rendering SmolLM2's template and encoding the whole string (what HF's
    apply_chat_template(tokenize=True) does), including content with leading whitespace."""
    hf = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    tokens, mask = tok.tokenize_messages(CONVERSATION)
    assert tokens == hf.encode(render(tok.chat_template, CONVERSATION), add_special_tokens=False).ids
    assert len(mask) == len(tokens)
    prompt = tok.prompt_tokens(CONVERSATION[:4])
    expected = render(tok.chat_template, CONVERSATION[:4], add_generation_prompt=True)
    assert prompt == hf.encode(expected, add_special_tokens=False).ids


def test_mask_per_role(tok):
    tokens, mask = tok.tokenize_messages(CONVERSATION[1:3])
    trained = [t for t, m in zip(tokens, mask) if not m]
    # loss on the assistant's content and its <|im_end|> only: not on the user turn, the header or the "\n"
    assert trained == tok.encode("The capital of France is Paris.", add_eos=False) + [tok.eos_id]
    assert tokens[-1] != tok.eos_id and mask[-1]  # the "\n" after <|im_end|>
    assert tok.decode(tokens[: mask.index(False)], skip_special_tokens=False) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # train_on_input: user messages unmasked, the assistant header still masked
    unmasked_user = [Message("user", "hi"), Message("assistant", "hello")]
    tokens, mask = tok.tokenize_messages(unmasked_user)
    n_user = tokens.index(tok.eos_id) + 2  # <|im_start|>user\nhi<|im_end|>\n
    assert not any(mask[:n_user])
    assert mask[n_user : n_user + 3] == [True] * 3  # <|im_start|> assistant \n


def test_truncation_and_open_end(tmp_path):
    full = tiny_tokenizer(tmp_path / "a").tokenize_messages(CONVERSATION)
    short = tiny_tokenizer(tmp_path / "b", max_seq_len=10)
    tokens, mask = short.tokenize_messages(CONVERSATION)
    assert tokens == full[0][:10] and mask == full[1][:10]  # kept start, no end token forced in
    tokens, _ = tiny_tokenizer(tmp_path / "c").tokenize_messages(CONVERSATION, add_end_tokens=False)
    assert tokens == full[0][: len(tokens)] and len(tokens) == len(full[0]) - 2  # no "<|im_end|>\n" at the end


def test_system_prompt_and_transform(tmp_path):
    tok = tiny_tokenizer(tmp_path / "t", system_prompt="Be nice.")
    no_system = [Message("user", "hi", masked=True), Message("assistant", "hello")]
    tokens, _ = tok.tokenize_messages(no_system)
    assert tok.decode(tokens, skip_special_tokens=False).startswith("<|im_start|>system\nBe nice.<|im_end|>\n")
    tokens, _ = tok.tokenize_messages(CONVERSATION)  # has its own system message: kept, nothing added
    assert tok.decode(tokens, skip_special_tokens=False).count("system\n") == 1
    sample = tok({"messages": no_system, "id": 7})
    assert set(sample) == {"tokens", "mask", "id"} and len(sample["tokens"]) == len(sample["mask"])


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        smollm2_tokenizer(str(tmp_path))
    folder = write_tiny_tokenizer(tmp_path / "t")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        smollm2_tokenizer(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_tokenizer(tmp_path / "u", max_seq_len=0)


def test_not_a_chatml_tokenizer(tmp_path):
    folder = write_tiny_tokenizer(tmp_path / "t")
    path = folder / "tokenizer.json"
    path.write_text(path.read_text().replace("<|endoftext|>", "<|end|>"))
    with pytest.raises(ValueError, match="not a ChatML tokenizer.*<\\|endoftext\\|>"):
        smollm2_tokenizer(str(folder))


@pytest.mark.slow
def test_real_smollm2_tokenizer(smollm2_assets):
    smollm2_dir = smollm2_assets.smollm2_dir
    tok = smollm2_tokenizer(str(smollm2_dir))
    assert (tok.text_eos_id, tok.im_start_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 49152)
    hf = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    tokens, _ = tok.tokenize_messages(CONVERSATION)
    assert tokens == hf.encode(render(tok.chat_template, CONVERSATION), add_special_tokens=False).ids
    messages = [Message("user", "What is the capital of France?")]
    expected = render(tok.chat_template, messages, add_generation_prompt=True)
    # the real template adds its default system prompt; ours only when asked to
    assert expected.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    system = expected[len("<|im_start|>system\n") : expected.index("<|im_end|>")]
    with_default = smollm2_tokenizer(str(smollm2_dir), system_prompt=system)
    assert with_default.prompt_tokens(messages) == hf.encode(expected, add_special_tokens=False).ids
