# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Medusa heads, losses, tree decoding and training recipes for torchtune Llama 3.x models.

This top-level module stays import-light (no torch, no torchtune) because the ``tune`` CLI hook imports it at
interpreter start-up. Import the sub-packages for the real functionality::

    from torchtune_medusa.models import medusa_llama3_1_8b
    from torchtune_medusa.modules import MedusaTransformerDecoder

Importing it also installs the start-up hook (:mod:`torchtune_medusa._tune_hook`), for environments that skip
``.pth`` files: our recipes get registered with ``tune`` and torchao's warning about its unused C++ extensions is
filtered out.
"""

from torchtune_medusa import _tune_hook  # noqa: F401

__version__ = "0.1.0"
