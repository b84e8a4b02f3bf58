# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Dataset builders (usable as ``_component_`` in configs), the SmolLM2 ChatML tokenizer, and
self-distillation data generation (``python -m torchtune_medusa.data.self_distill --help``)."""

from torchtune_medusa.data._chat import ChatDataset, conversation_to_messages, medusa_chat_dataset, SkipConversation
from torchtune_medusa.data._hidden_states import (
    hidden_states_dir,
    self_distilled_hidden_dataset,
    SelfDistilledHiddenStates,
    weights_fingerprint,
)
from torchtune_medusa.data._text import medusa_text_dataset, TextBlockDataset
from torchtune_medusa.data._tokenizer import smollm2_tokenizer, SmolLM2Tokenizer

__all__ = [
    "ChatDataset",
    "SelfDistilledHiddenStates",
    "SkipConversation",
    "SmolLM2Tokenizer",
    "TextBlockDataset",
    "conversation_to_messages",
    "hidden_states_dir",
    "medusa_chat_dataset",
    "medusa_text_dataset",
    "self_distilled_hidden_dataset",
    "smollm2_tokenizer",
    "weights_fingerprint",
]
