# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""SmolLM2's ChatML tokenizer as a torchtune :class:`ModelTokenizer`.

The byte-level BPE itself is a Hugging Face ``tokenizer.json``, loaded through torchtune's
:class:`~torchtune.modules.transforms.tokenizers.HuggingFaceBaseTokenizer`. This module adds what torchtune's
model tokenizers add on top of a base tokenizer: the chat template (ChatML, as in SmolLM2-Instruct's
``tokenizer_config.json``), per-token loss masks, truncation, and the special ids recipes use.

A conversation renders as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, exactly the string
SmolLM2's Jinja template produces (minus its default system prompt, which is only added when passed as
``system_prompt``), and tokenizes to the same ids as encoding that whole string with ``tokenizers``.
"""

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torchtune.data import Message
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


class SmolLM2Tokenizer(ModelTokenizer, Transform):
    """ChatML tokenizer for SmolLM2 (and any ``tokenizer.json`` with the three ChatML special tokens).

    Special tokens are never parsed out of text: a literal ``"<|im_end|>"`` inside a message is encoded as
    ordinary characters, so data cannot forge turn boundaries. Special ids are inserted only by the template.

    Loss masks (``True`` = excluded from the loss) follow the messages' ``masked`` flags, except that the
    assistant's header ``<|im_start|>assistant\\n`` and the ``\\n`` after its ``<|im_end|>`` are always masked:
    they are template text that generation is given (see :meth:`prompt_tokens`), never asked to predict. The
    assistant's content and its ``<|im_end|>`` (the stop token) carry the message's flag.

    Args:
        tokenizer_json_path (str): path to the Hugging Face ``tokenizer.json``.
        tokenizer_config_json_path (str): path to its ``tokenizer_config.json``.
        max_seq_len (Optional[int]): :meth:`tokenize_messages` truncates to this many tokens (keeping the
            start; the cut sequence is not given an end token). Default None: no truncation.
        system_prompt (Optional[str]): a system message prepended to conversations that have none. Default
            None: nothing is added (SmolLM2's Jinja template would add "You are a helpful AI assistant named
            SmolLM, trained by Hugging Face"; pass it here to reproduce that).

    Attributes:
        eos_id (int): ``<|im_end|>``, the end of an assistant turn (what ``encode(add_eos=True)`` appends).
        text_eos_id (int): ``<|endoftext|>``, the document separator of plain-text pretraining data.
        pad_id (int): ``<|endoftext|>``.
        bos_id (None): SmolLM2 uses no BOS token; ``add_bos`` is accepted and ignored.
        stop_tokens (List[int]): ``[<|im_end|>, <|endoftext|>]``, the ids that end generation.

    Raises:
        ValueError: if the vocabulary lacks one of ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, or
            ``max_seq_len`` is not a positive int.
    """

    def __init__(
        self,
        tokenizer_json_path: str,
        *,
        tokenizer_config_json_path: str,
        max_seq_len: Optional[int] = None,
        system_prompt: Optional[str] = None,
    ):
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
        self._base = HuggingFaceBaseTokenizer(
            tokenizer_json_path, tokenizer_config_json_path=tokenizer_config_json_path
        )
        self._hf = self._base.tokenizer
        self._hf.encode_special_tokens = True  # text is text: "<|im_end|>" in data is not a special token

        ids = {name: self._hf.token_to_id(name) for name in (IM_START, IM_END, ENDOFTEXT)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{tokenizer_json_path} is not a ChatML tokenizer: it has no {', '.join(missing)} token")
        self.im_start_id, self.im_end_id, self.text_eos_id = ids[IM_START], ids[IM_END], ids[ENDOFTEXT]
        self.bos_id = None
        self.eos_id = self.im_end_id
        self.pad_id = self.text_eos_id
        self.stop_tokens = [self.im_end_id, self.text_eos_id]
        self.special_tokens: Dict[str, int] = {
            t.content: i for i, t in self._hf.get_added_tokens_decoder().items() if t.special
        }
        self.max_seq_len = max_seq_len
        self.system_prompt = system_prompt
        self._newline = self.encode("\n", add_eos=False)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja ``chat_template`` of ``tokenizer_config.json`` (for reference; rendering is done here)."""
        return self._base.config.get("chat_template")

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Encode ``text`` (special-token strings in it stay plain text).

        Args:
            text (str): the text.
            add_bos (bool): ignored: SmolLM2 has no BOS token. Kept for torchtune's tokenizer interface.
            add_eos (bool): append ``eos_id`` (``<|im_end|>``). Default True.

        Returns:
            List[int]: token ids.
        """
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text, dropping special tokens unless ``skip_special_tokens=False``."""
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def _tokenize_message(self, message: Message, *, add_end: bool = True) -> Tuple[List[int], List[bool]]:
        if message.contains_media:
            raise ValueError("SmolLM2Tokenizer is text-only; got a message with media content")
        header = f"{message.role}\n"
        # One encode call over header + content gives the ids of the whole rendered string (a split there
        # could change the BPE of leading whitespace); the header's share is its common prefix.
        body = self.encode(header + message.text_content, add_eos=False)
        head = self.encode(header, add_eos=False)
        n_head = 0
        while n_head < min(len(head), len(body)) and head[n_head] == body[n_head]:
            n_head += 1
        end = [self.im_end_id] + self._newline if add_end else []
        tokens = [self.im_start_id] + body + end
        m = message.masked
        if message.role != "assistant":
            return tokens, [m] * len(tokens)
        mask = [True] * (1 + n_head) + [m] * (len(body) - n_head)
        if add_end:
            mask += [m] + [True] * len(self._newline)
        return tokens, mask

    def _render(self, messages: List[Message], *, add_end_tokens: bool = True) -> Tuple[List[int], List[bool]]:
        if self.system_prompt is not None and (not messages or messages[0].role != "system"):
            messages = [Message(role="system", content=self.system_prompt, masked=True)] + list(messages)
        tokens: List[int] = []
        mask: List[bool] = []
        for i, message in enumerate(messages):
            t, m = self._tokenize_message(message, add_end=add_end_tokens or i < len(messages) - 1)
            tokens += t
            mask += m
        return tokens, mask

    def tokenize_messages(
        self, messages: List[Message], *, add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """Render ``messages`` in ChatML and tokenize them, with a loss mask, truncated to ``max_seq_len``.

        Args:
            messages (List[Message]): the conversation.
            add_end_tokens (bool): end the last message with ``<|im_end|>\\n``. False leaves it open, for
                continuing a partial assistant message. Default True.

        Returns:
            Tuple[List[int], List[bool]]: token ids and mask (``True`` = no loss), of equal length.
        """
        tokens, mask = self._render(messages, add_end_tokens=add_end_tokens)
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def prompt_tokens(self, messages: List[Message]) -> List[int]:
        """The generation prompt: ``messages`` rendered in ChatML, then ``<|im_start|>assistant\\n``.

        Never truncated (a cut prompt would silently change the question); the caller checks the length.
        """
        tokens, _ = self._render(messages)
        return tokens + [self.im_start_id] + self.encode("assistant\n", add_eos=False)

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace ``sample["messages"]`` by ``"tokens"`` and ``"mask"`` (torchtune's model transform)."""
        messages = sample.pop("messages")
        sample["tokens"], sample["mask"] = self.tokenize_messages(messages)
        return sample


def smollm2_tokenizer(
    path: str,
    max_seq_len: Optional[int] = None,
    system_prompt: Optional[str] = None,
) -> SmolLM2Tokenizer:
    """Build the SmolLM2 ChatML tokenizer from an HF-format model directory or its ``tokenizer.json``.

    ``tokenizer_config.json`` is read from the same directory.

    Args:
        path (str): the model directory, or the path of its ``tokenizer.json``.
        max_seq_len (Optional[int]): truncation length of :meth:`SmolLM2Tokenizer.tokenize_messages`.
        system_prompt (Optional[str]): system message for conversations without one. Default None.

    Returns:
        SmolLM2Tokenizer: the tokenizer.

    Raises:
        FileNotFoundError: if ``tokenizer.json`` or ``tokenizer_config.json`` is missing.
    """
    path = os.fspath(path)
    json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    config_path = os.path.join(os.path.dirname(json_path), "tokenizer_config.json")
    for p in (json_path, config_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"smollm2_tokenizer: {p} does not exist (path={path!r})")
    return SmolLM2Tokenizer(
        json_path, tokenizer_config_json_path=config_path, max_seq_len=max_seq_len, system_prompt=system_prompt
    )
