# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Tiny in-process models shared by the tests (no files, no network)."""

import torch
from torchtune.models.llama3_1 import llama3_1

from torchtune_medusa.models import smollm2
from torchtune_medusa.modules import medusa_heads, MedusaTransformerDecoder

TINY = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128)


def tiny_medusa(
    *,
    num_heads: int = 3,
    num_layers: int = 1,
    own_projection: bool = True,
    tied: bool = False,
    seed: int = 0,
    randomize_heads: bool = True,
    head_type: str = "medusa",
) -> MedusaTransformerDecoder:
    """A 2-layer Llama (llama3_1, or smollm2-style with a tied output when ``tied``) with random weights and
    ``num_heads`` Medusa heads. With ``randomize_heads`` the residual weights are random too (not zero), so
    that heads disagree with the base model, which makes decoding tests meaningful."""
    torch.manual_seed(seed)
    if tied:
        base = smollm2(intermediate_dim=64, rope_base=10_000, **TINY)
    else:
        base = llama3_1(intermediate_dim=64, **TINY)
    heads = medusa_heads(
        num_heads=num_heads,
        dim=TINY["embed_dim"],
        vocab_size=TINY["vocab_size"],
        num_layers=num_layers,
        own_projection=own_projection,
        head_type=head_type,
    )
    model = MedusaTransformerDecoder.from_decoder(base, heads)
    if randomize_heads:
        with torch.no_grad():
            for name, p in model.medusa_heads.named_parameters():
                p.normal_(0, 0.2 if "linear" in name else 0.5)
    return model.eval()


TINY_CHAT_ARGS = dict(
    vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=256
)


def write_tiny_hf_checkpoint(folder, *, seed: int = 0):
    """A random SmolLM2-style model (tied output, ``TINY_CHAT_ARGS``) saved as an HF-format checkpoint
    (``model.safetensors`` + ``config.json``) with the tiny ChatML tokenizer of ``tests/data_common.py``, so that
    recipes can load it through ``MedusaHFCheckpointer`` and ``smollm2_tokenizer``. Returns the folder."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    from tests.data_common import write_tiny_tokenizer

    folder = Path(folder)
    write_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    base = smollm2(**TINY_CHAT_ARGS, rope_base=10_000)
    state_dict = {k: v.contiguous() for k, v in base.state_dict().items()}
    a = TINY_CHAT_ARGS
    save_file(
        tune_to_hf(state_dict, num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], dim=a["embed_dim"]),
        str(folder / "model.safetensors"),
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a["embed_dim"],
        "num_attention_heads": a["num_heads"],
        "num_key_value_heads": a["num_kv_heads"],
        "num_hidden_layers": a["num_layers"],
        "intermediate_size": a["intermediate_dim"],
        "vocab_size": a["vocab_size"],
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": a["max_seq_len"],
        "rms_norm_eps": 1e-5,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tiny_chat_medusa(*, num_heads: int = 3, projection: str = "own", seed: int = 0) -> MedusaTransformerDecoder:
    """The Medusa model of a tiny run (``TINY_CHAT_ARGS``; the base of :func:`write_tiny_hf_checkpoint` for the same
    ``seed``) with random, non-zero heads, in eval mode."""
    from torchtune_medusa.models import medusa_smollm2

    torch.manual_seed(seed)
    base = smollm2(**TINY_CHAT_ARGS, rope_base=10_000)
    model = medusa_smollm2(**TINY_CHAT_ARGS, rope_base=10_000, medusa_num_heads=num_heads, medusa_projection=projection)
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in model.medusa_heads.named_parameters():
            p.normal_(0, 0.2 if "linear" in name else 0.5)
    return model.eval()


def write_tiny_run(run_dir, *, epochs=(0,), num_heads: int = 3, projection: str = "own", tree=((0,), (0, 0))):
    """A ``medusa_finetune`` output dir as the recipe leaves it, without training: ``run_dir/epoch_N/`` for each N
    in ``epochs`` holds the tiny HF checkpoint, heads (``medusa_lm_head.safetensors`` + ``medusa_config.json``) of
    :func:`tiny_chat_medusa` with seed N, and ``tree`` as ``medusa_choices.json`` (none when ``tree`` is None).
    Returns ``run_dir``."""
    from pathlib import Path

    from torchtune_medusa.generation import save_tree
    from torchtune_medusa.models import export_heads

    run_dir = Path(run_dir)
    for epoch in epochs:
        folder = write_tiny_hf_checkpoint(run_dir / f"epoch_{epoch}", seed=epoch)
        export_heads(tiny_chat_medusa(num_heads=num_heads, projection=projection, seed=epoch), folder)
        if tree is not None:
            save_tree(folder, tree)
    return run_dir
