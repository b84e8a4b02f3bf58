# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The cost of one decoding step against the number of tree tokens T it verifies, for one model and one set of
decode settings: ``measure_step_cost`` (the step ``medusa_generate`` runs), median of interleaved rounds.
Prints the curve and writes it as JSON.

Examples::

    python benchmarks/step_cost.py --model smollm2-random --out output/step_cost/smollm2.json
    python benchmarks/step_cost.py --model llama8b-random --device cuda --compile on --sizes 1,8,32,128 \\
        --context-len 1024 --out output/step_cost/llama8b.json
    # CPU, bf16: the compiled step, the prepacked eager step and the eager step before prepacking, side by side
    python benchmarks/step_cost.py --model smollm2 --compile on,off --packing on,off --sizes 1,2,4,8,16 \\
        --rounds 3 --out output/step_cost/smollm2_variants.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402 - the benchmark's model loaders

from torchtune_medusa.generation import _packing, measure_step_cost  # noqa: E402
from torchtune_medusa.generation._settings import decode_compile, decode_dtype, decode_threads  # noqa: E402


def _variant_name(compile: bool, packed: bool) -> str:
    return "compiled" if compile else ("eager" if packed else "eager, unpacked")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-random", choices=["smollm2", "smollm2-random", "tiny", "llama8b-random"])
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-projection", default="shared", choices=["shared", "own"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", default="auto", help="auto, on or off, or a list (on,off) to time side by side")
    p.add_argument(
        "--packing",
        default="on",
        help="eager bf16 CPU steps on prepacked weights: on, off, or on,off to time both side by side",
    )
    p.add_argument("--threads", default="auto")
    p.add_argument("--sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per size in each round")
    p.add_argument("--rounds", type=int, default=1, help="rounds over the variants (rotated); medians over rounds")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    try:
        sizes = bench_decode.parse_step_sizes(args.sizes)
        threads = decode_threads(args.threads)
        dtype = decode_dtype(args.dtype, args.device)
        compiles = [decode_compile(c, args.device, dtype) for c in args.compile.split(",")]
    except ValueError as e:
        p.error(str(e))
    if not set(args.packing.split(",")) <= {"on", "off"}:
        p.error(f"--packing {args.packing!r}: pass on, off or on,off")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: pass at least 1")
    packings = [v == "on" for v in args.packing.split(",")]
    # Packing only changes eager steps: a compiled variant is timed once whatever --packing says.
    variants = list(dict.fromkeys((c, c or v) for c in compiles for v in packings))
    torch.set_num_threads(threads)
    model, _ = bench_decode.load_model(argparse.Namespace(**vars(args), heads=None, checkpoint=None))
    model = model.to(device=args.device, dtype=dtype)
    t0 = time.perf_counter()
    costs = {v: [] for v in variants}
    spreads = {v: {} for v in variants}
    for r in range(args.rounds):
        for i in range(len(variants)):
            compile, packed = variant = variants[(r + i) % len(variants)]
            _packing.USE_PACKED_LINEAR = packed
            costs[variant].append(
                measure_step_cost(
                    model,
                    sizes,
                    context_len=args.context_len,
                    repeats=args.repeats,
                    compile=compile,
                    spread=spreads[variant],
                )
            )
    _packing.USE_PACKED_LINEAR = True
    rows = []
    for compile, packed in variants:
        cost = {t: statistics.median(c[t] for c in costs[(compile, packed)]) for t in sizes}
        rows.append(
            {
                "variant": _variant_name(compile, packed),
                "settings": {"dtype": str(dtype).replace("torch.", ""), "threads": threads, "compile": compile},
                "packed_weights": packed and not compile and _packing.packing_supported(next(model.parameters())),
                "step_cost_s": {str(t): c for t, c in cost.items()},
                "relative_to_T1": {str(t): c / cost[sizes[0]] for t, c in cost.items()},
                "relative_spread": {str(t): v for t, v in spreads[(compile, packed)].items()},
            }
        )
    res = {
        "model": args.model,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        **rows[0],
        "context_len": args.context_len,
        "rounds": args.rounds,
        "variants": rows,
        "wall_time_s": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    first = rows[0]["step_cost_s"][str(sizes[0])]
    print(f"{args.model}, {str(dtype).replace('torch.', '')}, {threads} thread(s), context {args.context_len}:")
    print(f"{'variant':16}" + "".join(f"{'T=' + str(t):>16}" for t in sizes))
    for row in rows:
        cells = [row["step_cost_s"][str(t)] for t in sizes]
        print(f"{row['variant']:16}" + "".join(f"{c * 1e3:8.1f} ms {c / cells[0]:4.2f}x" for c in cells))
    if len(rows) > 1:
        print(
            "T=1 step of each variant against the first: "
            + ", ".join(f"{row['variant']} {row['step_cost_s'][str(sizes[0])] / first:.2f}x" for row in rows)
        )
    print(f"wrote {args.out} ({res['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
