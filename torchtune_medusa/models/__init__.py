# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Medusa model builders (component builders and sized presets) and head-format conversion."""

from torchtune_medusa.models._component_builders import (
    lora_medusa_llama3_1,
    lora_medusa_llama3_2,
    lora_medusa_smollm2,
    medusa_llama3_1,
    medusa_llama3_2,
    MEDUSA_PROJECTIONS,
    medusa_smollm2,
    validate_medusa_args,
    wrap_with_medusa_heads,
)
from torchtune_medusa.models._convert_weights import (
    export_heads,
    HEAD_FORMATS,
    import_heads,
    MedusaHeadConfig,
)
from torchtune_medusa.models._model_builders import (
    DEFAULT_LORA_ATTN_MODULES,
    lora_medusa_llama3_1_8b,
    lora_medusa_llama3_1_70b,
    lora_medusa_llama3_1_405b,
    lora_medusa_llama3_2_1b,
    lora_medusa_llama3_2_3b,
    lora_medusa_llama3_3_70b,
    lora_medusa_smollm2_135m,
    medusa_llama3_1_8b,
    medusa_llama3_1_70b,
    medusa_llama3_1_405b,
    medusa_llama3_2_1b,
    medusa_llama3_2_3b,
    medusa_llama3_3_70b,
    medusa_smollm2_135m,
    qlora_medusa_llama3_1_8b,
    qlora_medusa_llama3_1_70b,
    qlora_medusa_llama3_1_405b,
    qlora_medusa_llama3_2_1b,
    qlora_medusa_llama3_2_3b,
    qlora_medusa_llama3_3_70b,
    qlora_medusa_smollm2_135m,
)
from torchtune_medusa.models._smollm2 import smollm2, smollm2_135m

__all__ = [
    "DEFAULT_LORA_ATTN_MODULES",
    "HEAD_FORMATS",
    "MEDUSA_PROJECTIONS",
    "MedusaHeadConfig",
    "export_heads",
    "import_heads",
    "lora_medusa_llama3_1",
    "lora_medusa_llama3_1_405b",
    "lora_medusa_llama3_1_70b",
    "lora_medusa_llama3_1_8b",
    "lora_medusa_llama3_2",
    "lora_medusa_llama3_2_1b",
    "lora_medusa_llama3_2_3b",
    "lora_medusa_llama3_3_70b",
    "lora_medusa_smollm2",
    "lora_medusa_smollm2_135m",
    "medusa_llama3_1",
    "medusa_llama3_1_405b",
    "medusa_llama3_1_70b",
    "medusa_llama3_1_8b",
    "medusa_llama3_2",
    "medusa_llama3_2_1b",
    "medusa_llama3_2_3b",
    "medusa_llama3_3_70b",
    "medusa_smollm2",
    "medusa_smollm2_135m",
    "qlora_medusa_llama3_1_405b",
    "qlora_medusa_llama3_1_70b",
    "qlora_medusa_llama3_1_8b",
    "qlora_medusa_llama3_2_1b",
    "qlora_medusa_llama3_2_3b",
    "qlora_medusa_llama3_3_70b",
    "qlora_medusa_smollm2_135m",
    "smollm2",
    "smollm2_135m",
    "validate_medusa_args",
    "wrap_with_medusa_heads",
]
