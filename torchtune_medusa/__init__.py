# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Medusa heads, losses, tree decoding and training recipes for torchtune Llama 3.x models.

Load a trained run and decode with it::

    from torchtune_medusa import load_medusa
    from torchtune_medusa.generation import medusa_generate

    run = load_medusa("output/smollm2_135m_medusa")  # the run's latest epoch_N

Build models and modules from the sub-packages::

    from torchtune_medusa.models import medusa_llama3_1_8b
    from torchtune_medusa.modules import MedusaTransformerDecoder

This top-level module stays import-light (no torch, no torchtune) because the ``tune`` CLI hook imports it at
interpreter start-up: :func:`load_medusa` and :class:`MedusaRun` are imported on first use.

Importing it also installs the start-up hook (:mod:`torchtune_medusa._tune_hook`), for environments that skip
``.pth`` files: our recipes get registered with ``tune`` and torchao's warning about its unused C++ extensions is
filtered out.
"""

from torchtune_medusa import _tune_hook  # noqa: F401

__version__ = "0.1.0"

#: Names served lazily from :mod:`torchtune_medusa._load` (importing it imports torch and torchtune).
_LOAD_API = ("MedusaRun", "load_medusa")
__all__ = ["MedusaRun", "load_medusa"]


def __getattr__(name: str):
    if name in _LOAD_API:
        from torchtune_medusa import _load

        return getattr(_load, name)
    raise AttributeError(f"module 'torchtune_medusa' has no attribute {name!r}")
