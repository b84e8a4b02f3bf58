# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Where the offline assets live: the cache folder (:func:`default_cache_dir`), the folder names, the
:class:`Assets` paths, and :class:`AssetError`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "TORCHTUNE_MEDUSA_CACHE"
# Bump when the produced files change for the same sources: every cache is then rebuilt.
FORMAT_VERSION = 2
MANIFEST = ".manifest.json"
_TMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<pid>" in the folder of their target

SMOLLM2_DIRNAME = "smollm2-135m-instruct"


class AssetError(RuntimeError):
    """An asset cannot be prepared; the message says what is missing and what to run."""


@dataclass(frozen=True)
class Assets:
    """Paths of the prepared offline assets (all inside ``root``)."""

    root: Path
    smollm2_dir: Path
    sharegpt_train: Path
    sharegpt_heldout: Path
    shakespeare: Path


def default_cache_dir() -> Path:
    """``$TORCHTUNE_MEDUSA_CACHE``, else ``$XDG_CACHE_HOME/torchtune_medusa``, else ``~/.cache/torchtune_medusa``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "torchtune_medusa"
    return Path.home() / ".cache" / "torchtune_medusa"
