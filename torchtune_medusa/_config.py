# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""OmegaConf resolvers our configs use. Recipes call :func:`register_resolvers` at import time.

``${medusa_cache:}`` is the offline asset cache (``$TORCHTUNE_MEDUSA_CACHE`` or the user cache dir), so the
embedded default configs work without editing paths.
"""

from omegaconf import OmegaConf


def _medusa_cache() -> str:
    from torchtune_medusa.assets import default_cache_dir

    return str(default_cache_dir())


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("medusa_cache"):
        OmegaConf.register_new_resolver("medusa_cache", _medusa_cache)
