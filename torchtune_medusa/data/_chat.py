# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Chat data in ShareGPT (or OpenAI) format: the conversations Medusa heads are trained on.

Unlike torchtune's lazily tokenizing ``chat_dataset``, this builder cleans and tokenizes everything up front,
so that every conversation it cannot use is counted and reported when the dataset is built, not discovered
mid-training. Real ShareGPT dumps need that: roles such as ``bing``, empty replies, a conversation that opens
with the model or ends with an unanswered question.
"""

import copy
import logging
from collections import Counter
from typing import Any, Dict, List, Optional, Union

import numpy as np
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from tqdm import tqdm

from torchtune_medusa.data._utils import load_local_dataset

log = logging.getLogger(__name__)

# conversation_style -> (role key, text key) of a turn
STYLES = {"sharegpt": ("from", "value"), "openai": ("role", "content")}
# role names seen in ShareGPT/OpenAI data -> torchtune roles. Anything else (bing, bard, ...) skips the conversation.
ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
}


class SkipConversation(Exception):
    """Raised by :func:`conversation_to_messages` for a conversation that cannot be used; the message is the
    reason, counted by the builders."""


def conversation_to_messages(
    turns: Any,
    *,
    conversation_style: str = "sharegpt",
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    notes: Optional[Counter] = None,
) -> List[Message]:
    """Turn one conversation (a list of turn dicts) into torchtune messages, or say why it cannot be used.

    Repairs that keep the conversation (each counted in ``notes``): a leading assistant turn is dropped (as
    FastChat does), and so is a trailing user turn that has no reply.

    Args:
        turns (Any): the conversation column's value for one row.
        conversation_style (str): "sharegpt" (``from``/``value``) or "openai" (``role``/``content``).
        train_on_input (bool): leave user turns unmasked. Default False (loss on assistant turns only).
        new_system_prompt (Optional[str]): replaces the conversation's system message, or adds one.
        notes (Optional[Counter]): where repairs are counted.

    Returns:
        List[Message]: [system], user, assistant, user, assistant, ... (at least one exchange).

    Raises:
        SkipConversation: missing/empty conversation, a turn without the role or text key, an unknown role,
            an empty message, a system message after the start, roles that do not alternate, or no exchange.
    """
    role_key, text_key = STYLES[conversation_style]
    if not isinstance(turns, list) or not turns:
        raise SkipConversation("missing or empty conversation")
    pairs = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get(role_key) is None or turn.get(text_key) is None:
            raise SkipConversation(f"a turn without {role_key!r} and {text_key!r}")
        role = ROLES.get(turn[role_key])
        if role is None:
            raise SkipConversation(f"unknown role {turn[role_key]!r}")
        text = turn[text_key]
        if not isinstance(text, str) or not text.strip():
            raise SkipConversation("an empty message")
        pairs.append((role, text))

    system = pairs.pop(0)[1] if pairs[0][0] == "system" else None
    if new_system_prompt is not None:
        system = new_system_prompt
    if any(role == "system" for role, _ in pairs):
        raise SkipConversation("a system message after the first turn")
    if notes is None:
        notes = Counter()
    if pairs and pairs[0][0] == "assistant":
        pairs.pop(0)
        notes["dropped a leading assistant turn"] += 1
    if pairs and pairs[-1][0] == "user":
        pairs.pop()
        notes["dropped a trailing unanswered user turn"] += 1
    if not pairs:
        raise SkipConversation("no user/assistant exchange")
    if any(role != ("user", "assistant")[i % 2] for i, (role, _) in enumerate(pairs)):
        raise SkipConversation("roles do not alternate user/assistant")

    messages = [Message(role="system", content=system, masked=True)] if system is not None else []
    messages += [Message(role=r, content=t, masked=r != "assistant" and not train_on_input) for r, t in pairs]
    return messages


class ChatDataset(Dataset):
    """Tokenized conversations held in memory; items are ``{"tokens": [...], "labels": [...]}``.

    ``labels`` are the tokens themselves (no shift: the recipe shifts, as torchtune's SFT recipes do) with
    :data:`~torchtune.data.CROSS_ENTROPY_IGNORE_IDX` where the loss is masked.

    Args:
        samples (List[Dict[str, np.ndarray]]): ``tokens`` and ``labels`` arrays per conversation.
        stats (Dict[str, int]): what the builder kept, repaired, truncated and skipped.
    """

    def __init__(self, samples: List[Dict[str, np.ndarray]], stats: Dict[str, int]):
        self._samples = samples
        self.stats = stats

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        s = self._samples[index]
        return {"tokens": s["tokens"].tolist(), "labels": s["labels"].tolist()}


def _report(builder: str, stats: Counter, source: Any) -> None:
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(stats.items()))
    problems = any(k.startswith(("skipped", "truncated")) for k in stats)
    log.log(logging.WARNING if problems else logging.INFO, "%s(%s): %s", builder, source, summary)


def medusa_chat_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str = "json",
    data_files: Optional[Union[str, List[str]]] = None,
    conversation_column: str = "conversations",
    conversation_style: str = "sharegpt",
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    drop_long: bool = False,
    packed: bool = False,
    split: str = "train",
    **load_dataset_kwargs: Dict[str, Any],
) -> Union[ChatDataset, PackedDataset]:
    """ShareGPT-style chat data, tokenized with the model's chat template, loss on assistant turns.

    Every conversation goes through :func:`conversation_to_messages` and ``tokenizer.tokenize_messages``.
    Conversations that cannot be used are skipped and counted by reason; the counts (also on the returned
    dataset's ``stats``) are logged, as a warning when anything was skipped or truncated.

    Length: a conversation longer than ``max_seq_len`` is cut to its first ``max_seq_len`` tokens (no end token
    is forced in), or dropped with ``drop_long=True``. One whose first assistant token lies beyond
    ``max_seq_len`` (its prompt alone is too long) has nothing left to learn from and is always skipped.

    Packing (``packed=True``) uses torchtune's :class:`~torchtune.datasets.PackedDataset` without splitting
    conversations across packs. A conversation's first tokens are its masked user turn (with
    ``train_on_input=False``), so the recipe's label shift, and a Medusa head's look-ahead shorter than that
    turn, never make a target of the next conversation in the pack.

    Example (YAML)::

        dataset:
          _component_: torchtune_medusa.data.medusa_chat_dataset
          data_files: sharegpt_train.jsonl
          max_seq_len: 1024

    Args:
        tokenizer (ModelTokenizer): a torchtune model tokenizer (``tokenize_messages``), e.g.
            :func:`~torchtune_medusa.data.smollm2_tokenizer` or torchtune's ``llama3_tokenizer``.
        source (str): ``datasets`` source: "json" (JSON or JSONL), "parquet", ... Default "json".
        data_files (Optional[Union[str, List[str]]]): local file(s) or glob(s).
        conversation_column (str): column holding the list of turns. Default "conversations".
        conversation_style (str): "sharegpt" (``from``: human/gpt/system, ``value``) or "openai"
            (``role``, ``content``). Default "sharegpt".
        train_on_input (bool): also train on user turns. Default False.
        new_system_prompt (Optional[str]): system message replacing the data's own. Default None.
        max_seq_len (Optional[int]): maximum tokens per conversation. Default None: ``tokenizer.max_seq_len``
            (None there too: no limit, which ``packed=True`` does not allow).
        drop_long (bool): drop conversations longer than ``max_seq_len`` instead of truncating them.
        packed (bool): pack conversations into ``max_seq_len``-token rows. Default False.
        split (str): split to load. Default "train".
        **load_dataset_kwargs: passed on to ``datasets.load_dataset``.

    Returns:
        Union[ChatDataset, PackedDataset]: the dataset (both carry ``stats``).

    Raises:
        ValueError: an unknown ``conversation_style``, a bad ``max_seq_len``, ``packed`` without a length,
            ``conversation_column`` not in the data, or no usable conversation at all.
        FileNotFoundError: a missing data file.
    """
    builder = "medusa_chat_dataset"
    if conversation_style not in STYLES:
        raise ValueError(f"{builder}: conversation_style must be one of {sorted(STYLES)}, got {conversation_style!r}")
    if max_seq_len is None:
        max_seq_len = tokenizer.max_seq_len
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise ValueError(f"{builder}: max_seq_len must be an int >= 2 or None, got {max_seq_len!r}")
    if packed and max_seq_len is None:
        raise ValueError(f"{builder}: packed=True needs max_seq_len (here or on the tokenizer)")

    data = load_local_dataset(
        builder,
        source=source,
        data_files=data_files,
        split=split,
        column=("conversation_column", conversation_column),
        **load_dataset_kwargs,
    )

    # Tokenize untruncated so that truncation is done (and counted) here, whatever the tokenizer does.
    full = copy.copy(tokenizer)
    full.max_seq_len = None
    stats: Counter = Counter()
    samples = []
    for turns in tqdm(data[conversation_column], desc="Tokenizing conversations", mininterval=2.0):
        try:
            messages = conversation_to_messages(
                turns,
                conversation_style=conversation_style,
                train_on_input=train_on_input,
                new_system_prompt=new_system_prompt,
                notes=stats,
            )
            tokens, mask = full.tokenize_messages(messages)
            cut = max_seq_len is not None and len(tokens) > max_seq_len
            if cut and drop_long:
                raise SkipConversation(f"longer than max_seq_len={max_seq_len} (drop_long=True)")
            if all(mask[:max_seq_len]):
                raise SkipConversation(f"no trainable token within max_seq_len={max_seq_len} (prompt too long)")
        except SkipConversation as e:
            stats[f"skipped: {e}"] += 1
            continue
        if cut:
            tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
            stats[f"truncated to max_seq_len={max_seq_len}"] += 1
        tokens = np.asarray(tokens, dtype=np.int64)
        labels = np.where(np.asarray(mask, dtype=bool), CROSS_ENTROPY_IGNORE_IDX, tokens)
        samples.append({"tokens": tokens, "labels": labels})
    stats["kept"] = len(samples)
    stats["read"] = len(data)
    _report(builder, stats, data_files)
    if not samples:
        raise ValueError(f"{builder}: no usable conversation in {data_files!r}: {dict(stats)}")

    ds = ChatDataset(samples, dict(stats))
    if not packed:
        return ds
    pad_id = getattr(tokenizer, "pad_id", None)
    packed_ds = PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=0 if pad_id is None else pad_id)
    packed_ds.stats = ds.stats
    return packed_ds
