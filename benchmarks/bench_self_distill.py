# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Self-distillation throughput (new tokens per second) of SmolLM2-135M for several decode settings, side by side.

Every setting answers the same prompts (the first ``--prompts`` usable ones of the ShareGPT train split) with
``self_distill`` into a scratch file; settings are run in rotated rounds and the median of ``--repeats`` is
reported, with the first call of a compiled setting (which compiles) not timed. Prints a table and writes JSON.
Time only on a quiet machine.

Example::

    python benchmarks/bench_self_distill.py --settings fp32:16:off,bf16:64:off,bf16:64:on --out output/sd_bench.json
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from torchtune_medusa._load import load_hf_base
from torchtune_medusa.data._self_distill import self_distill
from torchtune_medusa.data._tokenizer import smollm2_tokenizer
from torchtune_medusa.generation import _packing, _step
from torchtune_medusa.generation._settings import DTYPES

FLAGS = {
    "unpacked": "bf16 linear weights not prepacked for oneDNN (the eager path before generation/_packing.py)",
    "sdpa": "batched bf16 attention on an fp32 cache with SDPA (the path before _grouped_matmul_attention)",
}


def parse_settings(text: str):
    """``dtype:batch:compile[:flag...]`` items, e.g. ``bf16:64:on`` or ``bf16:32:off:unpacked:sdpa`` (flags: the
    paths before a change, see ``FLAGS``)."""
    settings = []
    for item in text.split(","):
        parts = item.split(":")
        dtype, batch, compile, *flags = parts if len(parts) >= 3 else ["", "", ""]  # too short: refused below
        if dtype not in DTYPES or compile not in ("on", "off") or not set(flags) <= set(FLAGS) or not batch.isdigit():
            raise SystemExit(
                f"--settings: {item!r} is not dtype:batch:on|off[:flag...] (dtype one of {sorted(DTYPES)}, "
                f"flags from {sorted(FLAGS)})"
            )
        settings.append(
            {
                "dtype": dtype,
                "batch_size": int(batch),
                "compile": compile == "on",
                "packed": "unpacked" not in flags,
                "batched_attention": "sdpa" not in flags,
            }
        )
    return settings


def run_once(model, tokenizer, data, setting, args) -> dict:
    _packing.USE_PACKED_LINEAR = setting["packed"]
    _step.USE_BATCHED_BF16_ATTENTION = setting["batched_attention"]
    with tempfile.TemporaryDirectory() as tmp:
        stats = self_distill(
            model,
            tokenizer,
            data,
            Path(tmp) / "out.jsonl",
            max_new_tokens=args.max_new_tokens,
            batch_size=setting["batch_size"],
            max_prompt_len=args.max_prompt_len,
            limit=args.prompts,
            compile=setting["compile"],
            progress=False,
        )
    return {"new_tokens": stats.new_tokens, "seconds": stats.generation_time_s, "tok_s": stats.tokens_per_second}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="fp32:16:off,bf16:32:off,bf16:64:off,bf16:64:on")
    parser.add_argument("--prompts", type=int, default=128, help="first N conversations of the train split")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, every core)")
    parser.add_argument("--out", type=Path, default=Path("output/bench_self_distill.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchtune_medusa.assets import prepare

    assets = prepare()
    tokenizer = smollm2_tokenizer(str(assets.smollm2_dir))
    data = [str(assets.sharegpt_train)]
    settings = parse_settings(args.settings)
    models = {s["dtype"]: load_hf_base(str(assets.smollm2_dir), dtype=DTYPES[s["dtype"]]) for s in settings}
    for s in settings:
        if s["compile"]:  # compile outside the timed rounds
            run_once(models[s["dtype"]], tokenizer, data, s, args)
    runs = [[] for _ in settings]
    for r in range(args.repeats):
        for i in [(r + j) % len(settings) for j in range(len(settings))]:  # rotated rounds
            s = settings[i]
            t0 = time.perf_counter()
            runs[i].append(run_once(models[s["dtype"]], tokenizer, data, s, args))
            print(f"round {r} {s}: {runs[i][-1]['tok_s']:.0f} new tok/s ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = []
    for s, rs in zip(settings, runs):
        rows.append({**s, "new_tokens": rs[0]["new_tokens"], "tok_s_median": statistics.median(r["tok_s"] for r in rs)})
    base = rows[0]["tok_s_median"]
    print(f"\n{'dtype':6} {'batch':>5} {'compile':>7} {'packed':>6} {'bf16 attn':>9} {'new tok/s':>10} {'vs first':>8}")
    for row in rows:
        print(
            f"{row['dtype']:6} {row['batch_size']:>5} {str(row['compile']):>7} {str(row['packed']):>6} "
            f"{str(row['batched_attention']):>9} "
            f"{row['tok_s_median']:>10.0f} "
            f"{row['tok_s_median'] / base:>7.2f}x"
        )
    result = {
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_len": args.max_prompt_len,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
