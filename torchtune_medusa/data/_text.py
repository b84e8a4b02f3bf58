# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Plain text chunked into fixed blocks (the WikiText-style "group texts" preprocessing).

All documents are tokenized, joined with an end-of-document token, concatenated into one stream and cut into
``block_size``-token blocks. Every position is a target, so no padding and no packing are needed.
"""

import logging
from typing import Any, Dict, List, Optional, Union

import numpy as np
from torch.utils.data import Dataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from tqdm import tqdm

from torchtune_medusa.data._utils import load_local_dataset

log = logging.getLogger(__name__)


class TextBlockDataset(Dataset):
    """Fixed-size token blocks; items are ``{"tokens": block, "labels": block}`` (the recipe shifts).

    Args:
        blocks (np.ndarray): ``[num_blocks, block_size]`` token ids.
        stats (Dict[str, int]): documents, tokens, blocks and dropped tail tokens.
    """

    def __init__(self, blocks: np.ndarray, stats: Dict[str, int]):
        self.blocks = blocks
        self.stats = stats

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        block = self.blocks[index].tolist()
        return {"tokens": block, "labels": list(block)}


def medusa_text_dataset(
    tokenizer: ModelTokenizer,
    *,
    data_files: Union[str, List[str]],
    block_size: Optional[int] = None,
    source: str = "text",
    column: str = "text",
    add_eos: bool = True,
    sample_by: str = "document",
    split: str = "train",
    **load_dataset_kwargs: Dict[str, Any],
) -> TextBlockDataset:
    """Chunk-and-pack plain text into ``block_size``-token blocks, e.g. the Shakespeare asset.

    The tokens left over after the last full block are dropped and reported. Documents end with the
    tokenizer's end-of-document token: ``text_eos_id`` when it has one (``<|endoftext|>`` for SmolLM2, whose
    ``eos_id`` is the chat turn end), else ``eos_id``; BOS is added where the tokenizer has one.

    Example (YAML)::

        dataset:
          _component_: torchtune_medusa.data.medusa_text_dataset
          data_files: shakespeare.txt
          block_size: 512

    Args:
        tokenizer (ModelTokenizer): a torchtune tokenizer (``encode``).
        data_files (Union[str, List[str]]): local text file(s) or glob(s).
        block_size (Optional[int]): tokens per block. Default None: ``tokenizer.max_seq_len``.
        source (str): ``datasets`` source. Default "text" (plain text files).
        column (str): the text column. Default "text".
        add_eos (bool): end each document with the end-of-document token. Default True.
        sample_by (str): for ``source="text"``, what a document is: "document" (a whole file, the default),
            "paragraph" or "line".
        split (str): split to load. Default "train".
        **load_dataset_kwargs: passed on to ``datasets.load_dataset``.

    Returns:
        TextBlockDataset: the blocks, with ``stats``.

    Raises:
        ValueError: a bad ``block_size`` or ``sample_by``, ``column`` not in the data, or less text than one
            block.
        FileNotFoundError: a missing data file.
    """
    builder = "medusa_text_dataset"
    if block_size is None:
        block_size = tokenizer.max_seq_len
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(
            f"{builder}: block_size must be an int >= 2 (or set tokenizer.max_seq_len), got {block_size!r}"
        )
    if source == "text":
        if sample_by not in ("document", "paragraph", "line"):
            raise ValueError(f"{builder}: sample_by must be 'document', 'paragraph' or 'line', got {sample_by!r}")
        load_dataset_kwargs["sample_by"] = sample_by
    data = load_local_dataset(
        builder, source=source, data_files=data_files, split=split, column=("column", column), **load_dataset_kwargs
    )

    eos = getattr(tokenizer, "text_eos_id", None)
    eos = tokenizer.eos_id if eos is None else eos
    pieces, empty = [], 0
    for text in tqdm(data[column], desc="Tokenizing text", mininterval=2.0):
        if not text or not text.strip():
            empty += 1
            continue
        ids = tokenizer.encode(text, add_bos=True, add_eos=False)
        pieces.append(np.asarray(ids + [eos] if add_eos else ids, dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise ValueError(f"{builder}: {data_files!r} gives {len(stream)} tokens, fewer than block_size={block_size}")
    blocks = stream[: num_blocks * block_size].reshape(num_blocks, block_size)
    stats = {
        "documents": len(pieces),
        "empty documents skipped": empty,
        "tokens": len(stream),
        "blocks": num_blocks,
        "dropped tail tokens": len(stream) - num_blocks * block_size,
    }
    log.info("%s(%s): %s", builder, data_files, ", ".join(f"{k}: {v}" for k, v in stats.items()))
    return TextBlockDataset(blocks, stats)
