# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

from torchtune_medusa.models._smollm2 import smollm2, smollm2_135m

__all__ = [
    "smollm2",
    "smollm2_135m",
]
