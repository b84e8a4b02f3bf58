# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Decoding step cost with and without a busy neighbour process, for several thread counts: the measurement
behind the ``threads=auto`` default (every usable core but one).

For each thread count, a fresh process times 1-token and 8-token steps (``measure_step_cost``, SmolLM2-135M, the
given dtype and compile setting) on a quiet machine, then again while one extra process spins on a core. Prints
the table and writes JSON.

Example::

    python benchmarks/bench_threads.py --threads 1,2 --out output/bench_threads.json
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402 - the benchmark's model loaders

from torchtune_medusa.generation import measure_step_cost  # noqa: E402
from torchtune_medusa.generation._settings import decode_compile, decode_dtype  # noqa: E402

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def measure_one(args) -> dict:
    """In this process: quiet, then with one spinning neighbour."""
    torch.set_num_threads(args.one)
    dtype = decode_dtype(args.dtype)
    compile = decode_compile(args.compile, "cpu", dtype)
    loader = argparse.Namespace(model=args.model, num_heads=3, head_projection="shared", heads=None, checkpoint=None)
    model, _ = bench_decode.load_model(loader)
    model = model.to(dtype)
    sizes = (1, 8)
    measure_step_cost(model, sizes, context_len=args.context_len, repeats=1, compile=compile)  # compile, warm up
    quiet = measure_step_cost(model, sizes, context_len=args.context_len, repeats=args.repeats, compile=compile)
    spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=600)])
    try:
        time.sleep(0.5)
        loaded = measure_step_cost(model, sizes, context_len=args.context_len, repeats=args.repeats, compile=compile)
    finally:
        spinner.kill()
    return {
        "threads": args.one,
        "quiet_s": {str(t): v for t, v in quiet.items()},
        "loaded_s": {str(t): v for t, v in loaded.items()},
        "slowdown_T1": loaded[1] / quiet[1],
        "slowdown_T8": loaded[8] / quiet[8],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-random"])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, one process each")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure in this process
    p.add_argument("--out", default="output/bench_threads.json")
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure_one(args)))
        return 0
    counts = [int(t) for t in args.threads.split(",") if t.strip()]
    if not counts or min(counts) < 1:
        p.error(f"--threads {args.threads!r}: give comma-separated positive counts, e.g. 1,2")
    rows = []
    for n in counts:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", str(n)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"threads={n}: quiet T=1 {r['quiet_s']['1'] * 1e3:.1f} ms, T=8 {r['quiet_s']['8'] * 1e3:.1f} ms; "
            f"one busy neighbour: T=1 {r['loaded_s']['1'] * 1e3:.1f} ms ({r['slowdown_T1']:.2f}x), "
            f"T=8 {r['loaded_s']['8'] * 1e3:.1f} ms ({r['slowdown_T8']:.2f}x)",
            flush=True,
        )
    res = {
        "model": args.model,
        "dtype": args.dtype,
        "compile": args.compile,
        "cpu_count": os.cpu_count(),
        "context_len": args.context_len,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
