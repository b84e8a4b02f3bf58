# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Makes ``tune ls/cp/cat/run`` see this package's recipes and configs.

torchtune has no plug-in mechanism, so the wheel ships ``torchtune_medusa_tune.pth``, which imports this module
at interpreter start-up. It costs next to nothing: it imports neither torch nor torchtune (nor
``importlib.abc``); it only puts a one-shot finder on ``sys.meta_path`` that, when (and if) something imports
``torchtune._recipe_registry``, lets that module execute and then appends our entries to it. Failures are
reported on stderr and never break the import of torchtune.
"""

import sys

_REGISTRY_MODULE = "torchtune._recipe_registry"


def _register(module) -> None:
    try:
        from torchtune_medusa._recipe_registry import register

        register(module)
    except Exception as e:  # never break `tune` because of us
        print(f"torchtune-medusa: could not register recipes with the tune CLI: {e!r}", file=sys.stderr)


class _RegistryFinder:
    """A duck-typed meta-path finder that only reacts to torchtune's recipe registry."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        uninstall()
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register(module)

        spec.loader.exec_module = exec_and_register
        return spec


_finder = _RegistryFinder()


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def install() -> None:
    """Register now if torchtune's registry is already imported, else when it gets imported."""
    module = sys.modules.get(_REGISTRY_MODULE)
    if module is not None:
        _register(module)
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


install()
