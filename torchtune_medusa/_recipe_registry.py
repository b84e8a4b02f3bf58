# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The recipes and configs this package adds to the ``tune`` CLI.

Imported at interpreter start-up through ``_tune_hook``: it must import neither torch nor torchtune at module
level (``register`` receives torchtune's registry module as an argument).
"""

import os
from typing import Dict, List, NamedTuple, Tuple


class RecipeEntry(NamedTuple):
    name: str
    file_name: str
    supports_distributed: bool
    configs: Tuple[str, ...]  # paths relative to the configs folder, with the .yaml suffix


RECIPES: Tuple[RecipeEntry, ...] = (
    RecipeEntry(
        name="medusa_finetune",
        file_name="medusa_finetune.py",
        supports_distributed=True,
        configs=(
            "smollm2/135M_medusa.yaml",
            "smollm2/135M_medusa2.yaml",
            "llama3_2/1B_medusa.yaml",
            "llama3_1/8B_medusa.yaml",
            "llama3_1/8B_medusa_qlora.yaml",
            "llama3_3/llama_medusa.yaml",
        ),
    ),
    RecipeEntry(
        name="medusa_generate",
        file_name="medusa_generate.py",
        supports_distributed=False,
        configs=(
            "smollm2/135M_generate.yaml",
            "llama3_1/8B_generate.yaml",
        ),
    ),
)


def _package_resource(name: str) -> str:
    """Locate ``recipes`` or ``configs``: inside the installed package (wheel), or at the repository top level
    next to the package (source checkout and editable install)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(package_dir, name)
    if os.path.isdir(inside):
        return inside
    return os.path.join(os.path.dirname(package_dir), name)


def recipes_dir() -> str:
    return _package_resource("recipes")


def configs_dir() -> str:
    return _package_resource("configs")


def config_names(config_file: str) -> List[str]:
    """Both names a config answers to in the CLI: torchtune's suffix-less style and the file name."""
    return [config_file[: -len(".yaml")], config_file]


def resolved_recipes() -> Dict[str, Tuple[RecipeEntry, str, List[Tuple[str, str]]]]:
    """name -> (entry, absolute recipe path, [(config name, absolute config path), ...])."""
    out = {}
    for entry in RECIPES:
        configs = [
            (name, os.path.join(configs_dir(), config_file))
            for config_file in entry.configs
            for name in config_names(config_file)
        ]
        out[entry.name] = (entry, os.path.join(recipes_dir(), entry.file_name), configs)
    return out


def register(registry_module) -> None:
    """Append our recipes to torchtune's ``_ALL_RECIPES`` (idempotent).

    The paths are absolute: torchtune joins them onto its own ``recipes`` folder with ``pathlib``, which keeps
    the right-hand side when it is absolute.
    """
    known = {recipe.name for recipe in registry_module._ALL_RECIPES}
    for name, (entry, recipe_path, configs) in resolved_recipes().items():
        if name in known:
            continue
        registry_module._ALL_RECIPES.append(
            registry_module.Recipe(
                name=name,
                file_path=recipe_path,
                configs=[registry_module.Config(name=c, file_path=p) for c, p in configs],
                supports_distributed=entry.supports_distributed,
            )
        )
