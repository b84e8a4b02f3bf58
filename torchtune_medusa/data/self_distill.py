# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""``python -m torchtune_medusa.data.self_distill``: write SmolLM2's own replies to ShareGPT prompts.

Example (the offline assets by default; rerun the same command to resume)::

    python -m torchtune_medusa.data.self_distill --output self_distill.jsonl --limit 200
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import List, Optional

import torch

from torchtune_medusa._load import load_hf_base
from torchtune_medusa.data._self_distill import check_output_file, self_distill
from torchtune_medusa.data._tokenizer import smollm2_tokenizer
from torchtune_medusa.generation._settings import decode_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad numbers and a foreign ``--output`` file before the model is loaded (``parser.error``)."""
    for name, low in (("max_new_tokens", 1), ("batch_size", 1), ("max_prompt_len", 1), ("limit", 1), ("top_k", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    try:
        check_output_file(args.output)
    except ValueError as e:
        parser.error(f"--output: {e}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_medusa.data.self_distill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="JSONL to write; appended to, and resumed from")
    parser.add_argument("--model-dir", help="HF-format SmolLM2 directory (default: the offline asset)")
    parser.add_argument("--data", nargs="+", help="ShareGPT JSON/JSONL prompts (default: the asset's train split)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="prompts decoded together (default 32, the fastest measured)"
    )
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are skipped and counted")
    parser.add_argument("--multi-turn", action="store_true", help="answer every user turn, not only the first")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N >= 1 conversations of the data")
    parser.add_argument("--system-prompt", default=None, help="system message for prompts that have none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help="auto (default): bf16 where the device computes it natively (AVX512-BF16/AMX CPUs, recent GPUs), "
        "else fp32. The dtype is recorded with every reply, and a file is only resumed with the same one",
    )
    parser.add_argument(
        "--compile",
        choices=["on", "off"],
        default="off",
        help="decode with the compiled step; off by default (no faster for batched decoding on CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core)")
    parser.add_argument(
        "--shard",
        default="0/1",
        help="i/n: this process does every n-th batch from batch i (run n processes with --threads 1 and their own "
        "--output files: on CPU, n one-thread processes beat one n-thread process)",
    )
    parser.add_argument(
        "--save-hidden",
        action="store_true",
        help="also save the hidden state behind every reply token (next to OUTPUT, in a .hidden/ folder: about "
        "1.2 KB per token for SmolLM2 in bf16), so that Medusa-1 heads train on them with no second pass over the "
        "data (dataset._component_=torchtune_medusa.data.self_distilled_hidden_dataset)",
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be i/n with 0 <= i < n (e.g. 0/2), got {args.shard!r}")

    if args.model_dir is None or args.data is None:
        from torchtune_medusa.assets import prepare

        assets = prepare()
        args.model_dir = args.model_dir or str(assets.smollm2_dir)
        args.data = args.data or [str(assets.sharegpt_train)]
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = smollm2_tokenizer(args.model_dir, system_prompt=args.system_prompt)
    t0 = time.perf_counter()
    dtype = decode_dtype(args.dtype, args.device) if args.dtype == "auto" else DTYPES[args.dtype]
    model = load_hf_base(args.model_dir, device=args.device, dtype=dtype)
    print(f"[self_distill] loaded {args.model_dir} in {time.perf_counter() - t0:.1f} s")
    try:
        stats = self_distill(
            model,
            tokenizer,
            args.data,
            args.output,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            batch_size=args.batch_size,
            max_prompt_len=args.max_prompt_len,
            multi_turn=args.multi_turn,
            limit=args.limit,
            model_name=f"SmolLM2-135M-Instruct ({DTYPE_NAMES[dtype]})",
            compile=args.compile == "on",
            shard=shard,
            save_hidden=args.save_hidden,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(stats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
