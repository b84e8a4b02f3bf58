# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Convert Medusa head checkpoints between formats.

Usage::

    python -m torchtune_medusa.convert --to vllm output/epoch_0 heads_vllm/
    python -m torchtune_medusa.convert --from fasterdecoding_v1 --to torchtune medusa-vicuna/ heads/
    python -m torchtune_medusa.convert --to tensorrt_llm --base-checkpoint-dir Llama-3.2-1B/ heads_v2/ trt/
    python -m torchtune_medusa.convert --to tgi_v2 --base-model-name-or-path meta-llama/Llama-3.1-8B heads/ tgi/

Formats: torchtune, fasterdecoding_v1, fasterdecoding_v2, vllm, tgi_v1, tgi_v2, tensorrt_llm (see
:mod:`torchtune_medusa.models._convert_weights`). ``--from`` defaults to auto-detection.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
from safetensors import safe_open

from torchtune_medusa.models._convert_weights import export_heads, HEAD_FORMATS, import_heads

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_hf_output_weight(hf_dir: str) -> torch.Tensor:
    """The output weight ``[V, D]`` of an HF checkpoint folder: ``lm_head.weight``, or ``model.embed_tokens.weight``
    when the model ties its embeddings.

    Raises:
        FileNotFoundError: no safetensors files in the folder, or neither tensor in them.
    """
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("medusa_")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors base weights in {hf_dir}")
    found = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in ("lm_head.weight", "model.embed_tokens.weight"):
                if key in sf.keys():
                    found[key] = sf.get_tensor(key)
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        if key in found:
            return found[key]
    raise FileNotFoundError(f"neither lm_head.weight nor model.embed_tokens.weight in {hf_dir}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_medusa.convert", description="Convert Medusa head checkpoints between formats."
    )
    parser.add_argument("--from", dest="src_format", choices=HEAD_FORMATS, default=None, help="default: detect")
    parser.add_argument("--to", dest="dst_format", choices=HEAD_FORMATS, required=True)
    parser.add_argument("src", help="folder (or weights file) holding the heads")
    parser.add_argument("dst", help="output folder")
    parser.add_argument(
        "--base-checkpoint-dir",
        default=None,
        help="HF folder of the base model: its output weight is needed to write shared heads as "
        "fasterdecoding_v1 / tgi_v1 / tensorrt_llm / vllm",
    )
    parser.add_argument("--base-model-name-or-path", default=None, help="recorded in the config; required by TGI")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast tensors (default: keep)")
    args = parser.parse_args(argv)

    try:
        heads, cfg = import_heads(args.src, format=args.src_format)
        base_w = load_hf_output_weight(args.base_checkpoint_dir) if args.base_checkpoint_dir else None
        out = export_heads(
            heads,
            args.dst,
            format=args.dst_format,
            base_output_weight=base_w,
            base_model_name_or_path=args.base_model_name_or_path or cfg.base_model_name_or_path,
            vocab_size=cfg.vocab_size,
            dtype=_DTYPES[args.dtype] if args.dtype else None,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"to": args.dst_format, "dst": str(args.dst), **out.torchtune_json()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
