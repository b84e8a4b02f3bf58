# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Parameter counts and bf16 bytes of the Medusa heads of every preset, for both projection layouts.

Models are built on the meta device (no memory). Prints a table and writes JSON::

    python benchmarks/bench_head_params.py [--heads 4] [--layers 1] [--out output/bench_head_params.json]
"""

import argparse
import json
from pathlib import Path

import torch

import torchtune_medusa.models as M

PRESETS = [
    "llama3_1_8b",
    "llama3_1_70b",
    "llama3_1_405b",
    "llama3_2_1b",
    "llama3_2_3b",
    "llama3_3_70b",
    "smollm2_135m",
]
BF16_BYTES = 2


def measure(name: str, projection: str, heads: int, layers: int) -> dict:
    with torch.device("meta"):
        model = getattr(M, f"medusa_{name}")(
            medusa_num_heads=heads, medusa_num_layers=layers, medusa_projection=projection
        )
    per_head = [sum(p.numel() for p in h.parameters()) for h in model.medusa_heads]
    # base parameters: tied outputs are counted once (TiedLinear holds no parameter of its own)
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("medusa_heads."))
    head0 = model.medusa_heads[0]
    return {
        "preset": f"medusa_{name}",
        "projection": projection,
        "num_heads": heads,
        "num_layers": layers,
        "hidden_size": head0.dim,
        "vocab_size": head0.vocab_size,
        "params_per_head": per_head[0],
        "bytes_per_head_bf16": per_head[0] * BF16_BYTES,
        "params_heads_total": sum(per_head),
        "bytes_heads_total_bf16": sum(per_head) * BF16_BYTES,
        "params_base": base,
        "heads_over_base": sum(per_head) / base,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--out", default="output/bench_head_params.json")
    args = parser.parse_args()

    rows = [measure(n, proj, args.heads, args.layers) for n in PRESETS for proj in ("own", "shared")]
    header = (
        f"{'preset':<24}{'layout':<8}{'D':>7}{'V':>9}{'params/head':>14}{'bf16/head':>12}{'total bf16':>12}"
        f"{'% of base':>11}"
    )
    print(f"Medusa heads: K={args.heads}, L={args.layers} (1 GB = 1e9 bytes)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['preset']:<24}{r['projection']:<8}{r['hidden_size']:>7}{r['vocab_size']:>9}"
            f"{r['params_per_head']:>14,}{_fmt_bytes(r['bytes_per_head_bf16']):>12}"
            f"{_fmt_bytes(r['bytes_heads_total_bf16']):>12}{100 * r['heads_over_base']:>10.1f}%"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"num_heads": args.heads, "num_layers": args.layers, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
