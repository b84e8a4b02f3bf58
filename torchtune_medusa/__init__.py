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
"""

__version__ = "0.1.0"
