# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Hidden states saved by self-distillation, and the data set that trains Medusa-1 heads on them.

Decoding a reply computes, at every position, the normed final hidden state that Medusa heads read. With
``self_distill(..., save_hidden=True)`` those states are kept: each batch of replies gets one safetensors file in
the folder :func:`hidden_states_dir` next to the output JSONL, written (atomically) before the batch's JSONL
lines, so a line in the JSONL always has its file. Head training then reads them
(:func:`self_distilled_hidden_dataset`) instead of running the backbone over the data a second time, which cost
more than generating it.

A batch file holds, for its replies in order: ``hidden`` ``[rows, d]`` (row j of a reply: the state that produced
its token j), ``tokens`` ``[rows]`` (the reply's tokens, its stop token included), ``prompt_last`` ``[replies]``
(the token before each reply) and ``offsets`` ``[replies + 1]``; its metadata names the replies (``entries``: id and
turn), the dtype and the :func:`weights_fingerprint` of the model that decoded them.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import ConcatDataset

from torchtune_medusa._files import save_safetensors
from torchtune_medusa.data._chat import medusa_chat_dataset

__all__ = ["SelfDistilledHiddenStates", "hidden_states_dir", "self_distilled_hidden_dataset", "weights_fingerprint"]

FORMAT = "torchtune_medusa.self_distill_hidden/1"


def hidden_states_dir(output_file: Union[str, Path]) -> Path:
    """The folder of the hidden-state files of a self-distillation output: ``replies.jsonl`` ->
    ``replies.hidden/``."""
    output_file = Path(output_file)
    return output_file.with_name(output_file.stem + ".hidden")


def batch_file_name(batch_number: int) -> str:
    return f"batch-{batch_number:06d}.safetensors"


def _plain_name(name: str) -> str:
    """A parameter name without the wrappers that compile and activation checkpointing add."""
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


@torch.no_grad()
def weights_fingerprint(model: nn.Module, samples: int = 64) -> str:
    """A short hash of a strided sample of every parameter, in bf16 (so a bf16 and an fp32 copy of one checkpoint
    agree). Hidden states are only valid for the weights that computed them: training heads of another model on
    them would learn nothing true, so the data set compares this before use."""
    digest = hashlib.sha256()
    params = {_plain_name(name): p for name, p in model.named_parameters()}
    for name, p in sorted(params.items()):
        if name.startswith("medusa_heads.") or "lora_" in name:
            continue
        if hasattr(p, "full_tensor"):  # FSDP2 shard: every rank takes part
            p = p.full_tensor()
        flat = p.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples].to(torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(picked.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_hidden_batch(
    path: Path,
    entries: Sequence[Tuple[str, int]],
    hidden: Sequence[torch.Tensor],
    tokens: Sequence[Sequence[int]],
    prompt_last: Sequence[int],
    *,
    fingerprint: str,
) -> None:
    """Write one batch file (see the module docstring); ``hidden[i]`` has one row per token of ``tokens[i]``."""
    if not (len(entries) == len(hidden) == len(tokens) == len(prompt_last)):
        raise ValueError("save_hidden_batch: entries, hidden, tokens and prompt_last must have one item per reply")
    for (cid, turn), h, t in zip(entries, hidden, tokens):
        if h.size(0) != len(t):
            raise ValueError(f"save_hidden_batch: reply {cid!r} turn {turn} has {len(t)} tokens but {h.size(0)} rows")
    offsets = torch.tensor([0] + [len(t) for t in tokens]).cumsum(0)
    metadata = {
        "format": FORMAT,
        "entries": json.dumps([[cid, turn] for cid, turn in entries]),
        "dtype": str(hidden[0].dtype).removeprefix("torch."),
        "fingerprint": fingerprint,
    }
    save_safetensors(
        path,
        {
            "hidden": torch.cat(list(hidden)),
            "tokens": torch.tensor([x for t in tokens for x in t], dtype=torch.int64),
            "prompt_last": torch.tensor(list(prompt_last), dtype=torch.int64),
            "offsets": offsets,
        },
        metadata=metadata,
    )


class SelfDistilledHiddenStates(Dataset):
    """Self-distilled replies with the hidden states that decoded them: one sample per reply.

    A sample is ``{"tokens": [p, r_0, ..., r_{n-1}], "labels": [ignore, r_0, ..., r_{n-1}]}`` in torchtune's SFT
    layout (``p`` the prompt's last token, ``r`` the reply, stop token included), and :meth:`hidden_state` gives its
    ``[n, d]`` states: row j sits at sample position j and produced ``r_j``. Only the Medusa-1 recipe with
    ``cache_hidden_states: True`` can train on it (the rest of the prompt is not in the sample).

    Only replies recorded in the JSONL files are read: a batch file left by a run killed before its JSONL lines were
    written is ignored.

    Args:
        data_files (Union[str, List[str]]): self-distillation JSONL files written with ``save_hidden``.
        max_seq_len (Optional[int]): longer samples are cut to this many tokens.

    Raises:
        FileNotFoundError: a missing JSONL or batch file.
        ValueError: a JSONL written without hidden states, or files from different models or dtypes.
    """

    def __init__(self, data_files: Union[str, List[str]], max_seq_len: Optional[int] = None) -> None:
        files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
        if not files:
            raise ValueError("self_distilled_hidden_dataset: data_files is empty; give the self-distillation JSONL(s)")
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"self_distilled_hidden_dataset: max_seq_len must be >= 2, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self._samples: List[Tuple[torch.Tensor, torch.Tensor, int]] = []  # (hidden, reply tokens, prompt_last)
        self.fingerprints: set = set()
        self.dtypes: set = set()
        self.temperatures: set = set()
        for jsonl in files:
            self._read(Path(jsonl))
        if not self._samples:
            raise ValueError(f"self_distilled_hidden_dataset: {files} hold no replies")
        if len(self.fingerprints) > 1 or len(self.dtypes) > 1:
            raise ValueError(
                f"self_distilled_hidden_dataset: {files} were decoded by different models or dtypes "
                f"(fingerprints {sorted(self.fingerprints)}, dtypes {sorted(self.dtypes)}); train on files of one model"
            )

    def _read(self, jsonl: Path) -> None:
        from safetensors import safe_open

        if not jsonl.is_file():
            raise FileNotFoundError(f"self_distilled_hidden_dataset: {jsonl} does not exist")
        folder = hidden_states_dir(jsonl)
        wanted: Dict[str, set] = {}  # batch file -> the ids the JSONL records in it
        with open(jsonl, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                meta = record.get("self_distill") or {}
                if "hidden_file" not in meta:
                    raise ValueError(
                        f"self_distilled_hidden_dataset: {jsonl} line {line_no} has no saved hidden states; write the "
                        "data with `python -m torchtune_medusa.data.self_distill --save-hidden` (to a new file), or "
                        "train on it with torchtune_medusa.data.medusa_chat_dataset"
                    )
                self.temperatures.add(float(meta.get("temperature", 0.0)))
                wanted.setdefault(meta["hidden_file"], set()).add(record["id"])
        for name, ids in wanted.items():
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"self_distilled_hidden_dataset: {path} is missing, but {jsonl} records replies in it; rerun the "
                    "self_distill command with --save-hidden to a new output file"
                )
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                hidden, tokens = f.get_tensor("hidden"), f.get_tensor("tokens")
                prompt_last, offsets = f.get_tensor("prompt_last"), f.get_tensor("offsets").tolist()
            if meta.get("format") != FORMAT:
                raise ValueError(f"self_distilled_hidden_dataset: {path} is not a self-distillation hidden-state file")
            self.fingerprints.add(meta["fingerprint"])
            self.dtypes.add(meta["dtype"])
            for k, (cid, _turn) in enumerate(json.loads(meta["entries"])):
                if cid in ids:
                    a, b = offsets[k], offsets[k + 1]
                    if b > a:
                        self._samples.append((hidden[a:b], tokens[a:b], int(prompt_last[k])))

    @property
    def greedy_targets(self) -> bool:
        """Whether the replies were decoded greedily: their tokens are then the base model's greedy picks."""
        return self.temperatures == {0.0}

    @property
    def fingerprint(self) -> str:
        return next(iter(self.fingerprints))

    def __len__(self) -> int:
        return len(self._samples)

    def _rows(self, index: int) -> int:
        n = self._samples[index][1].numel()
        return n if self.max_seq_len is None else min(n, self.max_seq_len - 1)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        _, reply, prompt_last = self._samples[index]
        reply = reply[: self._rows(index)].tolist()
        return {"tokens": [prompt_last] + reply, "labels": [CROSS_ENTROPY_IGNORE_IDX] + reply}

    def hidden_state(self, index: int) -> torch.Tensor:
        """``[n, d]`` states of sample ``index`` (row j at position j of its tokens)."""
        return self._samples[index][0][: self._rows(index)]


def self_distilled_hidden_dataset(
    tokenizer: Any = None,
    *,
    data_files: Union[str, List[str]],
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    text_files: Optional[Union[str, List[str]]] = None,
    text_split: str = "train",
) -> Union[SelfDistilledHiddenStates, ConcatDataset]:
    """Builder of :class:`SelfDistilledHiddenStates` for configs (``dataset._component_``): Medusa-1 heads trained on
    the hidden states that self-distillation saved, with no backbone pass over the data.

    With ``text_files``, ShareGPT conversations with their written replies are trained on too (the data set is then
    a torchtune ``ConcatDataset``, as a ``dataset`` list in the config would be): the recipe computes their hidden
    states once, with the backbone (the hidden-state cache), and with ``head_targets: base_greedy`` the heads
    learn the base model's greedy picks on them. Their states cost one forward per token instead of a decoding
    step; on held-out self-distilled replies a text token was worth about half a self-distilled one (see the
    README's head sweep).

    Example config::

        dataset:
          _component_: torchtune_medusa.data.self_distilled_hidden_dataset
          data_files: [replies.0-of-2.jsonl, replies.1-of-2.jsonl]
          text_files: ${medusa_cache:}/sharegpt/train.jsonl  # optional
          text_split: train[-1200:]
        cache_hidden_states: True
        head_targets: base_greedy

    Args:
        tokenizer (Any): used for ``text_files`` only (the saved samples are token ids already); recipes pass it.
        data_files (Union[str, List[str]]): the ``self_distill --save-hidden`` JSONL files.
        max_seq_len (Optional[int]): longer samples are cut.
        packed (bool): must be False (each sample's states are looked up by its index).
        text_files (Optional[Union[str, List[str]]]): ShareGPT JSON/JSONL conversations to train on as well
            (:func:`~torchtune_medusa.data.medusa_chat_dataset`); default None: the saved replies only.
        text_split (str): the rows of ``text_files`` to use, e.g. ``"train[-1200:]"`` (keep them apart from the
            prompts that were self-distilled). Default ``"train"``: all.

    Returns:
        Union[SelfDistilledHiddenStates, ConcatDataset]: the data set.

    Raises:
        ValueError: ``packed=True``, or ``text_files`` without a tokenizer.
    """
    if packed:
        raise ValueError("self_distilled_hidden_dataset: packed=True is not supported; set dataset.packed=False")
    if text_files is not None and tokenizer is None:
        raise ValueError("self_distilled_hidden_dataset: text_files needs the tokenizer (recipes pass it)")
    saved = SelfDistilledHiddenStates(data_files, max_seq_len=max_seq_len)
    if text_files is None:
        return saved
    text = medusa_chat_dataset(tokenizer, data_files=text_files, split=text_split, max_seq_len=max_seq_len)
    return ConcatDataset([saved, text])
