# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Makes ``tune ls/cp/cat/run`` see this package's recipes and configs, and keeps torchao quiet.

torchtune has no plug-in mechanism, so the wheel ships ``torchtune_medusa_tune.pth``, which imports this module
at interpreter start-up. It costs next to nothing: it imports neither torch nor torchtune (nor
``importlib.abc``, nor ``logging``); it only puts a one-shot finder on ``sys.meta_path`` that, when (and if)
something imports ``torchtune._recipe_registry``, lets that module execute and then appends our entries to it.
Failures are reported on stderr and never break the import of torchtune.

The same finder, when something imports ``torchao`` (torchtune does, on import), first installs a logging filter
that drops torchao's "Skipping import of cpp extensions due to incompatible torch version" warning: torchao's
prebuilt C++ kernels match a single torch version (0.15 was built for torch 2.9.1, and torchtune 0.6.1 needs
``torchao<0.16``), while we pin torch 2.13; nothing here uses those kernels (QLoRA's NF4 tensor is pure Python).
Every other torchao message is kept.
"""

import sys

_REGISTRY_MODULE = "torchtune._recipe_registry"
_TORCHAO_MODULE = "torchao"
TORCHAO_CPP_WARNING = "Skipping import of cpp extensions due to incompatible torch version"
# Modules whose import the finder still waits for.
_pending = set()


def _register(module) -> None:
    try:
        from torchtune_medusa._recipe_registry import register

        register(module)
    except Exception as e:  # never break `tune` because of us
        print(f"torchtune-medusa: could not register recipes with the tune CLI: {e!r}", file=sys.stderr)


def _drop_torchao_cpp_warning(record) -> bool:
    """Logging filter (a callable): False for torchao's warning about its unused C++ extensions."""
    return not record.getMessage().startswith(TORCHAO_CPP_WARNING)


def quiet_torchao() -> None:
    """Install the filter on torchao's logger (idempotent); call before ``import torchao`` to take effect."""
    import logging

    logger = logging.getLogger(_TORCHAO_MODULE)
    if not any(getattr(f, "__name__", None) == _drop_torchao_cpp_warning.__name__ for f in logger.filters):
        logger.addFilter(_drop_torchao_cpp_warning)


def _done(fullname: str) -> None:
    _pending.discard(fullname)
    if not _pending:
        uninstall()


class _RegistryFinder:
    """A duck-typed meta-path finder that only reacts to torchtune's recipe registry and to torchao."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == _TORCHAO_MODULE and fullname in _pending:
            _done(fullname)
            quiet_torchao()
            return None  # the usual finders import it
        if fullname != _REGISTRY_MODULE or fullname not in _pending:
            return None
        _done(fullname)
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
    """Register now if torchtune's registry is already imported, else when it gets imported; quiet torchao when
    it gets imported (if it is already, its warning has been printed)."""
    module = sys.modules.get(_REGISTRY_MODULE)
    if module is not None:
        _register(module)
    else:
        _pending.add(_REGISTRY_MODULE)
    if _TORCHAO_MODULE not in sys.modules:
        _pending.add(_TORCHAO_MODULE)
    if _pending and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


install()
