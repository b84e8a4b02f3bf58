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

The output folder must be new or empty; ``--force`` writes into a non-empty one, replacing only earlier head
files of the same names (never a base model's ``model.safetensors`` or ``config.json``).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
from safetensors import safe_open, SafetensorError

from torchtune_medusa.models._convert_weights import (
    export_files,
    export_heads,
    HEAD_FORMATS,
    import_heads,
    MedusaHeadConfig,
    needs_base_output_weight,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_hf_output_weight(hf_dir: str) -> torch.Tensor:
    """The output weight ``[V, D]`` of an HF checkpoint folder: ``lm_head.weight``, or ``model.embed_tokens.weight``
    when the model ties its embeddings.

    Raises:
        FileNotFoundError: no safetensors files in the folder, or neither tensor in them.
        ValueError: a truncated or corrupt safetensors file (named).
    """
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("medusa_")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors base weights in {hf_dir}")
    found = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in ("lm_head.weight", "model.embed_tokens.weight"):
                    if key in sf.keys():
                        found[key] = sf.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{f} is not a readable safetensors file, it is truncated or corrupt ({e})") from e
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        if key in found:
            return found[key]
    raise FileNotFoundError(f"neither lm_head.weight nor model.embed_tokens.weight in {hf_dir}")


def check_output_dir(dst: Path, dst_format: str, *, force: bool) -> None:
    """The output must be a new or empty folder, or ``force`` must be given (then only earlier head files get
    replaced: :func:`~torchtune_medusa.models.export_heads` never overwrites any other file).

    Raises:
        FileExistsError: ``dst`` is a file, or a non-empty folder without ``force``.
    """
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"output {dst} is a file; give a folder (new or empty)")
    entries = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else []
    if entries and not force:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"output folder {dst} is not empty (it holds {shown}); give a new or empty folder, or pass --force to "
            f"write {' and '.join(export_files(dst_format))} into it (only earlier Medusa head files are replaced)"
        )


def check_cli_inputs(
    cfg: MedusaHeadConfig, dst_format: str, src: str, base_checkpoint_dir: Optional[str], base_model: Optional[str]
) -> None:
    """What the output format needs from the command line, checked before the base weights are read.

    Raises:
        ValueError: a needed ``--base-checkpoint-dir`` or ``--base-model-name-or-path`` is missing.
    """
    if needs_base_output_weight(cfg, dst_format) and not base_checkpoint_dir:
        raise ValueError(
            f"--to {dst_format} needs the base model's output layer: the heads in {src} share it "
            "(medusa_projection 'shared'), and this format stores it with the heads; pass --base-checkpoint-dir "
            "<the base model's HF folder> to copy it in, or convert --to fasterdecoding_v2 (or tgi_v2), which "
            "keeps the heads shared"
        )
    if dst_format in ("tgi_v1", "tgi_v2") and not base_model:
        raise ValueError(
            f"--to {dst_format}: TGI loads the base model from the config's base_model_name_or_path, which {src} "
            "does not record; pass --base-model-name-or-path <hub id or local folder>"
        )


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
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty output folder, replacing earlier head files there (never other files)",
    )
    args = parser.parse_args(argv)

    try:
        check_output_dir(Path(args.dst), args.dst_format, force=args.force)
        heads, cfg = import_heads(args.src, format=args.src_format)
        base_model = args.base_model_name_or_path or cfg.base_model_name_or_path
        check_cli_inputs(cfg, args.dst_format, args.src, args.base_checkpoint_dir, base_model)
        base_w = load_hf_output_weight(args.base_checkpoint_dir) if args.base_checkpoint_dir else None
        if base_w is not None and tuple(base_w.shape) != (cfg.vocab_size or base_w.shape[0], cfg.hidden_size):
            raise ValueError(
                f"--base-checkpoint-dir {args.base_checkpoint_dir}: its output weight has shape "
                f"{tuple(base_w.shape)} but the heads need ({cfg.vocab_size}, {cfg.hidden_size}) (vocab size, hidden "
                "size); pass the folder of the base model the heads were trained on"
            )
        out = export_heads(
            heads,
            args.dst,
            format=args.dst_format,
            base_output_weight=base_w,
            base_model_name_or_path=base_model,
            vocab_size=cfg.vocab_size,
            dtype=_DTYPES[args.dtype] if args.dtype else None,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"to": args.dst_format, "dst": str(args.dst), **out.torchtune_json()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
