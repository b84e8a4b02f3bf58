# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Self-distillation data: the base model's own replies to the prompts of a chat dataset.

Medusa trains its heads on the base model's own outputs (and Medusa-2 keeps the backbone's quality that way):
the human turns of a ShareGPT file are sent to the model, and its replies are written as a ShareGPT JSONL that
:func:`~torchtune_medusa.data.medusa_chat_dataset` reads.

The run is a plan of batches (prompts sorted by token length, so rows of a batch pad little), decoded with the
project's KV-cached :func:`~torchtune_medusa.generation.generate`. Each batch is appended to the output with
one write, then flushed and fsync'ed; a new output file is created with its first batch by an atomic rename, so
a file written here always starts with a complete record. A rerun with the same arguments resumes: conversations
already in the file are skipped, a line torn by a kill is cut off and a last record that lost its newline gets
it back (with a message). Because the plan and each batch's seed depend only on the arguments and the prompt ids,
a resumed run writes the same file as an uninterrupted one. A file that does not start with a record (with the
``self_distill`` metadata) was not written here: it is refused and never modified.

CLI: ``python -m torchtune_medusa.data.self_distill --help``.
"""

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

from torch import nn
from torchtune.data import Message
from tqdm import tqdm

from torchtune_medusa.data._chat import conversation_to_messages, SkipConversation
from torchtune_medusa.data._hidden_states import (
    batch_file_name,
    hidden_states_dir,
    save_hidden_batch,
    weights_fingerprint,
)
from torchtune_medusa.data._utils import load_local_dataset
from torchtune_medusa.generation import generate

log = logging.getLogger(__name__)

META_KEY = "self_distill"
# Settings that must match between a run and the file it resumes.
RESUME_KEYS = (
    "model",
    "temperature",
    "top_k",
    "global_seed",
    "max_new_tokens",
    "multi_turn",
    "batch_size",
    "max_prompt_len",
    "shard",
    "save_hidden",
)
# Values of resume keys that older files do not record.
RESUME_DEFAULTS = {"shard": "0/1", "save_hidden": False}


@dataclass
class Prompt:
    """One conversation to (re)generate: its id, optional system message and the user turns to answer."""

    id: str
    system: Optional[str]
    user_turns: List[str]
    length: int = 0  # tokens of the first prompt (the sort key)


@dataclass
class SelfDistillStats:
    """What a :func:`self_distill` call did (this call only; conversations found done are counted apart)."""

    conversations_written: int = 0
    already_done: int = 0
    replies: int = 0
    new_tokens: int = 0
    generation_time_s: float = 0.0
    tokens_per_second: float = 0.0
    stop_reasons: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)


def derive_seed(global_seed: int, *parts: Any) -> int:
    """A 63-bit seed from the global seed and e.g. a prompt id: stable across runs, machines and resumes."""
    digest = hashlib.sha256(":".join(map(str, (global_seed,) + parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def load_prompts(
    data_files: Union[str, List[str]],
    *,
    multi_turn: bool = False,
    conversation_column: str = "conversations",
    conversation_style: str = "sharegpt",
    id_column: str = "id",
    limit: Optional[int] = None,
    skipped: Optional[Counter] = None,
) -> List[Prompt]:
    """Read the prompts of a ShareGPT-style file (JSON or JSONL).

    Each conversation is cleaned like :func:`~torchtune_medusa.data.medusa_chat_dataset` does; unusable ones are
    counted in ``skipped``. Rows without an id get ``"row-{index}"``; a repeated id gets ``"#2"``, ``"#3"``...

    Args:
        data_files (Union[str, List[str]]): the file(s).
        multi_turn (bool): keep every user turn (each reply is regenerated given the model's earlier replies);
            default False: the first user turn only.
        conversation_column (str): column of turns. Default "conversations".
        conversation_style (str): "sharegpt" or "openai".
        id_column (str): column of conversation ids. Default "id".
        limit (Optional[int]): read only the first ``limit`` rows.
        skipped (Optional[Counter]): where skip reasons are counted.

    Returns:
        List[Prompt]: in file order.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: ``conversation_column`` not in the data.
    """
    data = load_local_dataset(
        "self_distill",
        source="json",
        data_files=data_files,
        split="train",
        column=("conversation_column", conversation_column),
    )
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    ids = data[id_column] if id_column in data.column_names else [None] * len(data)
    skipped = Counter() if skipped is None else skipped
    seen: Counter = Counter()
    prompts = []
    for index, (turns, cid) in enumerate(zip(data[conversation_column], ids)):
        try:
            messages = conversation_to_messages(turns, conversation_style=conversation_style)
        except SkipConversation as e:
            skipped[str(e)] += 1
            continue
        cid = f"row-{index}" if cid is None else str(cid)
        seen[cid] += 1
        if seen[cid] > 1:
            cid = f"{cid}#{seen[cid]}"
        system = messages[0].text_content if messages[0].role == "system" else None
        users = [m.text_content for m in messages if m.role == "user"]
        prompts.append(Prompt(cid, system, users if multi_turn else users[:1]))
    return prompts


def _parse_record(line: bytes) -> Optional[Dict[str, Any]]:
    """The record of an output line, or None when the line is not a self-distillation record."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or "id" not in record or not isinstance(record.get(META_KEY), dict):
        return None
    return record


def _not_a_record(path: Path, line_no: int) -> ValueError:
    return ValueError(
        f"self_distill: {path} line {line_no} is not a self-distillation record (a JSON object with 'id' and "
        f"'{META_KEY}' metadata), so this file is not (only) self-distillation output; it was left untouched: "
        "give another output file, or delete this one to start over"
    )


def check_output_file(path: Union[str, Path]) -> None:
    """Refuse, before any work, an output file that self-distillation did not write: it must be missing, empty,
    or start with a complete record (with ``self_distill`` metadata).

    Raises:
        ValueError: any other file (it is not modified).
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"self_distill: output {path} is not a regular file; give a .jsonl file path")
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        first = f.readline()
    if not first.endswith(b"\n") or _parse_record(first.rstrip(b"\n")) is None:
        raise _not_a_record(path, 1)


def read_done(path: Path, settings: Dict[str, Any]) -> Set[str]:
    """Ids already in an output file that self-distillation wrote (see :func:`check_output_file`).

    A torn last line (from a kill mid-write) is cut off, and a complete last record without its newline gets one,
    both with a message; nothing else in the file is ever changed.

    Raises:
        ValueError: a file that self-distillation did not write, a corrupt line before the last one, or records
            written with other settings.
    """
    check_output_file(path)
    if not path.exists():
        return set()
    done = set()
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    good_bytes = 0
    for i, line in enumerate(lines):
        if not line:
            continue
        last = i == len(lines) - 1  # no newline after it
        record = _parse_record(line)
        if record is None:
            if last and good_bytes > 0:  # the file is ours (it starts with a record): the write was interrupted
                print(f"[self_distill] {path}: dropping a torn last line ({len(line)} bytes) from an interrupted run")
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            raise _not_a_record(path, i + 1)
        meta = record[META_KEY]
        recorded = {k: meta.get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_KEYS}
        mismatch = {k: (recorded[k], settings[k]) for k in RESUME_KEYS if recorded[k] != settings[k]}
        if mismatch:
            raise ValueError(
                f"self_distill: {path} was written with other settings {mismatch} (file, now); "
                "resume with the same arguments or write to a new file"
            )
        if last:  # complete, but its newline is missing: appending would glue the next record onto it
            print(f"[self_distill] {path}: adding the newline missing after the last record")
            with open(path, "ab") as f:
                f.write(b"\n")
        done.add(record["id"])
        good_bytes += len(line) + 1
    return done


def _append(path: Path, text: str) -> None:
    """Append ``text`` durably (flush + fsync). A new file is created complete, by an atomic rename."""
    if path.exists():
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _record(p: Prompt, replies: List[str], reasons: List[str], n_tokens: List[int], meta: Dict[str, Any]) -> str:
    turns = [{"from": "system", "value": p.system}] if p.system is not None else []
    for user, reply in zip(p.user_turns, replies):
        turns += [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]
    meta = dict(meta, stop_reasons=reasons, new_tokens=n_tokens)
    return json.dumps({"id": p.id, "conversations": turns, META_KEY: meta}, ensure_ascii=False) + "\n"


def self_distill(
    model: nn.Module,
    tokenizer: Any,
    data_files: Union[str, List[str]],
    output_file: Union[str, Path],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_len: int = 1024,
    multi_turn: bool = False,
    limit: Optional[int] = None,
    model_name: str = "model",
    on_batch: Optional[Callable[[int, int], None]] = None,
    progress: bool = True,
    compile: bool = False,
    shard: Tuple[int, int] = (0, 1),
    save_hidden: bool = False,
    **prompt_kwargs: Any,
) -> SelfDistillStats:
    """Generate the model's replies to the prompts of ``data_files`` into ``output_file`` (ShareGPT JSONL).

    Appends to ``output_file`` and skips conversations already there (resume); see the module docstring.

    Each output line is ``{"id", "conversations": [{"from": "system"|"human"|"gpt", "value"}...],
    "self_distill": {model, temperature, top_k, global_seed, seed, max_new_tokens, multi_turn, batch_size,
    max_prompt_len, stop_reasons, new_tokens}}``. Resuming checks that these settings match the file's; ``limit``
    may change (to extend a run). Replies are decoded without the stop token; one cut by ``max_new_tokens`` is
    kept, with stop reason ``"max_new_tokens"``.

    Args:
        model (nn.Module): the base model (any torchtune decoder, in eval mode), on its device.
        tokenizer (Any): a tokenizer with ``prompt_tokens(messages)``, ``decode`` and ``stop_tokens``, e.g.
            :func:`~torchtune_medusa.data.smollm2_tokenizer`.
        data_files (Union[str, List[str]]): ShareGPT JSON/JSONL with the prompts.
        output_file (Union[str, Path]): the JSONL to write (appended to).
        max_new_tokens (int): reply length limit. Default 256.
        temperature (float): 0 = greedy. Default 0.
        top_k (Optional[int]): top-k when sampling.
        seed (int): global seed; each batch (and turn) uses a seed derived from it and the batch's first id.
        batch_size (int): prompts per ``generate`` call. Default 8.
        max_prompt_len (int): longer prompts are skipped (and counted); in multi-turn mode a conversation stops
            at the turn whose prompt would exceed it. Default 1024.
        multi_turn (bool): answer every user turn, given the model's own earlier replies. Default False.
        limit (Optional[int]): use only the first ``limit`` conversations of the file.
        model_name (str): recorded in each line's metadata (and checked on resume).
        on_batch (Optional[Callable[[int, int], None]]): called as ``on_batch(batch_index, num_batches)`` after
            each batch is written (progress hooks, tests).
        progress (bool): show a tqdm bar. Default True.
        compile (bool): decode with the compiled step (:func:`~torchtune_medusa.generation.generate`'s
            ``compile``): one graph per batch size and cache size, compiled on first use. Default False.
        shard (Tuple[int, int]): ``(i, n)``: do only every n-th batch of the plan, starting at batch i, so that n
            processes (one thread each, say) share the work; each writes its own file, and the n files together
            hold what one process would have written. Default ``(0, 1)``: everything.
        save_hidden (bool): also keep the hidden state behind every reply token, one safetensors file per batch in
            :func:`~torchtune_medusa.data.hidden_states_dir` ``(output_file)``, for Medusa-1 head training without a
            second backbone pass (:func:`~torchtune_medusa.data.self_distilled_hidden_dataset`). Default False.
        **prompt_kwargs: passed to :func:`load_prompts` (``conversation_column``, ``id_column``, ...).

    Returns:
        SelfDistillStats: counts, tokens and throughput of this call.

    Raises:
        ValueError: bad arguments, or an output file written with other settings.
    """
    for name, value, low in (
        ("max_new_tokens", max_new_tokens, 1),
        ("batch_size", batch_size, 1),
        ("max_prompt_len", max_prompt_len, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"self_distill: {name} must be an int >= {low}, got {value!r}")
    if temperature < 0:
        raise ValueError(f"self_distill: temperature must be >= 0, got {temperature!r}")
    index, num_shards = shard
    if not (isinstance(num_shards, int) and isinstance(index, int) and 0 <= index < num_shards):
        raise ValueError(f"self_distill: shard must be (i, n) with 0 <= i < n, got {shard!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"self_distill: limit must be an int >= 1 (or None for every conversation), got {limit!r}")
    output_file = Path(output_file)
    settings = dict(
        model=model_name,
        temperature=float(temperature),
        top_k=top_k,
        global_seed=seed,
        max_new_tokens=max_new_tokens,
        multi_turn=multi_turn,
        batch_size=batch_size,
        max_prompt_len=max_prompt_len,
        shard=f"{index}/{num_shards}",
        save_hidden=bool(save_hidden),
    )
    stats = SelfDistillStats()
    skipped: Counter = Counter()
    prompts = load_prompts(data_files, multi_turn=multi_turn, limit=limit, skipped=skipped, **prompt_kwargs)

    def prompt_of(p: Prompt, replies: Sequence[str]) -> List[int]:
        messages = [Message("system", p.system)] if p.system is not None else []
        for user, reply in zip(p.user_turns, list(replies) + [None]):
            messages.append(Message("user", user))
            if reply is not None:
                messages.append(Message("assistant", reply))
        return tokenizer.prompt_tokens(messages)

    kept = []
    for p in prompts:
        p.length = len(prompt_of(p, []))
        if p.length > max_prompt_len:
            skipped[f"prompt longer than max_prompt_len={max_prompt_len}"] += 1
        else:
            kept.append(p)
    kept.sort(key=lambda p: p.length)  # stable: ties keep file order
    plan = [kept[i : i + batch_size] for i in range(0, len(kept), batch_size)][index::num_shards]
    kept = [p for batch in plan for p in batch]

    output_file.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(output_file, settings)
    stats.already_done = sum(p.id in done for p in kept)
    stop_reasons: Counter = Counter()
    fingerprint = weights_fingerprint(model) if save_hidden else None
    bar = tqdm(total=len(kept), initial=stats.already_done, desc="Self-distilling", unit="conv", disable=not progress)
    for b, batch in enumerate(plan):
        todo = [p for p in batch if p.id not in done]
        if not todo:
            continue
        # The whole batch is regenerated (same rows, same seed) even when some rows were written before a
        # torn write, so that every row decodes exactly as in an uninterrupted run.
        batch_seed = derive_seed(seed, batch[0].id)
        replies: List[List[str]] = [[] for _ in batch]
        reasons: List[List[str]] = [[] for _ in batch]
        n_tokens: List[List[int]] = [[] for _ in batch]
        saved: List[Tuple[Tuple[str, int], Any, List[int], int]] = []  # (id, turn), hidden, tokens, prompt's last
        for turn in range(max(len(p.user_turns) for p in batch)):
            rows = [i for i, p in enumerate(batch) if len(replies[i]) == turn and turn < len(p.user_turns)]
            inputs = []
            for i in list(rows):
                ids = prompt_of(batch[i], replies[i])
                if len(ids) > max_prompt_len:  # a later turn outgrew the limit: the conversation ends here
                    skipped[f"later turns dropped: prompt longer than max_prompt_len={max_prompt_len}"] += 1
                    rows.remove(i)
                    continue
                inputs.append(ids)
            if not rows:
                break
            t0 = time.perf_counter()
            result = generate(
                model,
                inputs,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                stop_tokens=tokenizer.stop_tokens,
                seed=derive_seed(batch_seed, turn) if turn else batch_seed,
                max_cache_len=max_prompt_len + max_new_tokens,
                compile=compile,
                return_hidden=save_hidden,
            )
            stats.generation_time_s += time.perf_counter() - t0
            if save_hidden:
                for i, ids, toks, hidden in zip(rows, inputs, result.tokens, result.hidden):
                    saved.append(((batch[i].id, turn), hidden, toks, ids[-1]))
            for i, toks, reason in zip(rows, result.tokens, result.stats.stop_reasons):
                n_tokens[i].append(len(toks))
                reasons[i].append(reason)
                if toks and toks[-1] in tokenizer.stop_tokens:
                    toks = toks[:-1]
                replies[i].append(tokenizer.decode(toks))
                stats.new_tokens += n_tokens[i][-1]
                stats.replies += 1
                stop_reasons[reason] += 1
        meta = dict(settings, seed=batch_seed)
        if save_hidden and saved:
            # before the JSONL lines that point to it: a line in the file always has its hidden states
            meta["hidden_file"] = batch_file_name(index + b * num_shards)
            entries, hidden, toks, last = zip(*saved)
            path = hidden_states_dir(output_file) / meta["hidden_file"]
            save_hidden_batch(path, entries, hidden, toks, last, fingerprint=fingerprint)
        lines = []
        for i, p in enumerate(batch):
            if p.id in done or not replies[i]:
                continue
            p_turns = Prompt(p.id, p.system, p.user_turns[: len(replies[i])])
            lines.append(_record(p_turns, replies[i], reasons[i], n_tokens[i], meta))
        if lines:
            _append(output_file, "".join(lines))
        stats.conversations_written += len(lines)
        bar.update(len(todo))
        bar.set_postfix_str(f"{stats.new_tokens / max(stats.generation_time_s, 1e-9):.0f} new tok/s")
        if on_batch is not None:
            on_batch(b, len(plan))
    bar.close()
    stats.tokens_per_second = stats.new_tokens / max(stats.generation_time_s, 1e-9)
    stats.stop_reasons = dict(stop_reasons)
    stats.skipped = dict(skipped)
    if skipped:
        log.warning("self_distill: skipped %s", ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    return stats
