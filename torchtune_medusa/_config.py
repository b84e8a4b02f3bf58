# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""OmegaConf resolvers our configs use. Recipes call :func:`register_resolvers` at import time.

``${medusa_cache:}`` is the offline asset cache (``$TORCHTUNE_MEDUSA_CACHE`` or the user cache dir), so the
embedded default configs work without editing paths.
"""

import omegaconf
from omegaconf import OmegaConf


def _medusa_cache() -> str:
    from torchtune_medusa.assets import default_cache_dir

    return str(default_cache_dir())


def _register_resolver():
    # OmegaConf 2.4 renamed register_new_resolver to register_resolver and deprecates the old name; before 2.4,
    # register_resolver is the legacy (strings-only) API.
    major, minor = (int(part) for part in omegaconf.__version__.split(".")[:2])
    return OmegaConf.register_resolver if (major, minor) >= (2, 4) else OmegaConf.register_new_resolver


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("medusa_cache"):
        _register_resolver()("medusa_cache", _medusa_cache)
