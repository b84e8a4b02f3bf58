# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

from torchtune_medusa.modules.loss import (
    medusa_loss_metrics,
    MedusaCrossEntropyLoss,
    MedusaLossOutput,
    MedusaSelfDistillationLoss,
)
from torchtune_medusa.modules.medusa_heads import (
    MEDUSA_HEAD_TYPES,
    medusa_heads,
    MedusaHead,
    MedusaHeadList,
    MedusaResBlock,
)
from torchtune_medusa.modules.transformer import MedusaOutput, MedusaTransformerDecoder

__all__ = [
    "MEDUSA_HEAD_TYPES",
    "MedusaCrossEntropyLoss",
    "MedusaHead",
    "MedusaHeadList",
    "MedusaLossOutput",
    "MedusaOutput",
    "MedusaResBlock",
    "MedusaSelfDistillationLoss",
    "MedusaTransformerDecoder",
    "medusa_heads",
    "medusa_loss_metrics",
]
