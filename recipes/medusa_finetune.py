# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Placeholder for the Medusa training recipe: parses and checks its config, then exits.

The full recipe (a fork of torchtune's ``full_finetune_distributed``) replaces this file.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from torchtune_medusa._config import register_resolvers

register_resolvers()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    missing = [key for key in ("model", "checkpointer", "dataset", "output_dir") if key not in cfg]
    if missing:
        raise ValueError(f"medusa_finetune: config is missing the key(s) {missing}; start from `tune cp` of a config")
    print(
        f"medusa_finetune: parsed config for model {cfg.model._component_} "
        f"(checkpoint_dir={cfg.checkpointer.checkpoint_dir}); training is not implemented yet."
    )


if __name__ == "__main__":
    sys.exit(recipe_main())
