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
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402 - the benchmark's model loaders

from torchtune_medusa.generation import measure_step_cost  # noqa: E402
from torchtune_medusa.generation._settings import decode_compile, decode_dtype, decode_threads  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-random", choices=["smollm2", "smollm2-random", "tiny", "llama8b-random"])
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-projection", default="shared", choices=["shared", "own"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--threads", default="auto")
    p.add_argument("--sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    try:
        sizes = bench_decode.parse_step_sizes(args.sizes)
        threads = decode_threads(args.threads)
        dtype = decode_dtype(args.dtype, args.device)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(threads)
    compile = decode_compile(args.compile, args.device, dtype)
    model, _ = bench_decode.load_model(argparse.Namespace(**vars(args), heads=None, checkpoint=None))
    model = model.to(device=args.device, dtype=dtype)
    t0 = time.perf_counter()
    spread = {}
    cost = measure_step_cost(
        model, sizes, context_len=args.context_len, repeats=args.repeats, compile=compile, spread=spread
    )
    res = {
        "model": args.model,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "settings": {"dtype": str(dtype).replace("torch.", ""), "threads": threads, "compile": compile},
        "context_len": args.context_len,
        "step_cost_s": {str(t): c for t, c in cost.items()},
        "relative_to_T1": {str(t): c / cost[sizes[0]] for t, c in cost.items()},
        "relative_spread": {str(t): v for t, v in spread.items()},
        "wall_time_s": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"{args.model} {res['settings']} context {args.context_len}:")
    for t, c in cost.items():
        print(f"  T={t:<4} {c * 1e3:8.2f} ms  {c / cost[sizes[0]]:5.2f}x")
    print(f"wrote {args.out} ({res['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
