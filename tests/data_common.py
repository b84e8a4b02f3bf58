# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""A tiny SmolLM2-style ChatML tokenizer and ShareGPT files, built in a temporary folder (no asset needed)."""

import json
from pathlib import Path
from typing import List

from tokenizers import decoders, models, pre_tokenizers, Tokenizer, trainers

from torchtune_medusa.data import smollm2_tokenizer, SmolLM2Tokenizer

# SmolLM2-Instruct's template (its shape; the default system prompt text is irrelevant here).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse!",
    "user assistant system hello world, how are you today? I am fine, thank you.",
    "Write 3 numbers: 1 2 3 4 5 6 7 8 9 0. Done.\n\nNew paragraph\n  indented  text\ttab",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
]


def write_tiny_tokenizer(folder: Path) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (byte-level BPE, SmolLM2's special ids 0/1/2)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_tokenizer(folder: Path, **kwargs) -> SmolLM2Tokenizer:
    return smollm2_tokenizer(str(write_tiny_tokenizer(folder)), **kwargs)


def write_jsonl(path: Path, rows: List[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conv(*turns, id=None) -> dict:
    """``conv("human", "hi", "gpt", "hello")`` -> a ShareGPT row."""
    row = {"conversations": [{"from": f, "value": v} for f, v in zip(turns[::2], turns[1::2])]}
    if id is not None:
        row["id"] = id
    return row


class Killed(Exception):
    """Raised by :func:`kill_after_first_batch`: a stand-in for a process killed between two batches."""


def kill_after_first_batch(batch_index: int, num_batches: int) -> None:
    """An ``on_batch`` hook of ``self_distill`` that stops the run after its first batch is written."""
    raise Killed
