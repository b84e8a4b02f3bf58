# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Peak memory and time of a Medusa loss's forward + backward at a Llama-3-like vocabulary.

Cases, all from the same normed hidden state ``[b, s, d]`` (requires grad, as under LoRA / a trainable backbone):

- ``naive``: full fp32 logits of the base head and the K Medusa heads (what ``MedusaOutput`` holds), plain
  ``F.cross_entropy`` per shifted head.
- ``torchtune``: torchtune's ``CEWithChunkedOutputLoss`` on the base head only, with the model's chunked output
  (``num_output_chunks`` bf16 logit chunks, as ``TransformerDecoder.chunked_output`` makes them).
- ``ours``: :class:`~torchtune_medusa.modules.loss.MedusaCrossEntropyLoss` over the base head and K heads.

The projection weights (base output layer and heads, shared-projection layout) are frozen so that every case
measures the loss's own memory (logits, their fp32 copies, their gradients, the hidden-state gradient) and not
the parameter gradients, which the optimizer owns and which are the same whatever the loss.

Memory: each case runs in a fresh subprocess. On CUDA the peak is ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the loss. On CPU (Linux) it is the process's peak RSS (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before the run) minus its RSS before the run; glibc is told to serve every
allocation above 1 MiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the RSS and the peak
RSS follows the live tensors. Time is the median over ``--repeats`` forward + backward runs (the first one,
which also gives the peak, included).

Usage::

    python benchmarks/bench_loss_memory.py                      # S=256, a few minutes on 2 CPU cores
    python benchmarks/bench_loss_memory.py --seq-len 2048 --repeats 1 --out benchmarks/results/loss_memory_s2048.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("naive", "torchtune", "ours")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_kib(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_case(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from torchtune_medusa.modules import medusa_heads, MedusaTransformerDecoder
    from torchtune_medusa.modules.loss import MedusaCrossEntropyLoss

    class Projector(nn.Module):
        """Just the parts of MedusaTransformerDecoder that the losses touch (no embeddings, no layers)."""

        project = MedusaTransformerDecoder.project
        num_medusa_heads = MedusaTransformerDecoder.num_medusa_heads

        def __init__(self) -> None:
            super().__init__()
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
            self.medusa_heads = medusa_heads(
                num_heads=args.num_heads, dim=args.dim, vocab_size=args.vocab_size, own_projection=False
            )

    num_heads, num_chunks = args.num_heads, args.num_output_chunks
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in bf16 directly: an fp32 copy would raise the peak RSS before we start
    with torch.device(device):
        model = Projector().requires_grad_(False)
        for p in model.parameters():
            p.normal_(0, 0.02)
        hidden = torch.randn(args.batch_size, args.seq_len, args.dim, dtype=dtype).requires_grad_()
        labels = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    labels[:, -1] = -100
    # a short warm-up sequence pays the libraries' one-off allocations before the measured run
    warm_hidden, warm_labels = hidden[:, : num_chunks * 2].detach().requires_grad_(), labels[:, : num_chunks * 2]
    weights = [1.0] + [args.heads_coefficient * args.decay**k for k in range(1, num_heads + 1)]
    medusa = MedusaCrossEntropyLoss(
        num_output_chunks=num_chunks, heads_coefficient=args.heads_coefficient, decay=args.decay
    )
    torchtune_ce = CEWithChunkedOutputLoss(num_output_chunks=num_chunks)

    def naive(hidden, labels):
        n = (labels != -100).sum()
        loss = 0.0
        for k in range(num_heads + 1):
            logits = model.project(hidden, k).float()
            target = torch.cat([labels[:, k:], labels.new_full((labels.size(0), k), -100)], dim=1)
            ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum")
            loss = loss + weights[k] * ce
        return loss / n

    def torchtune(hidden, labels):
        return torchtune_ce([model.output(c) for c in hidden.chunk(num_chunks, dim=1)], labels)

    def ours(hidden, labels):
        return medusa(hidden, labels, model).loss

    fn = {"naive": naive, "torchtune": torchtune, "ours": ours}[args.case]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(warm_hidden, warm_labels).backward()
    sync()
    times, peak_kib = [], None
    for i in range(args.repeats):
        hidden.grad = None
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            before = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        loss = fn(hidden, labels)
        loss.backward()
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0:
            if device.type == "cuda":
                peak_kib = (torch.cuda.max_memory_allocated() - before) // 1024
            else:
                peak_kib = _rss_kib("VmHWM") - before
        del loss
    return {
        "case": args.case,
        "peak_extra_mib": peak_kib / 1024,
        "time_s_median": statistics.median(times),
        "times_s": times,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=128256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--num-heads", type=int, default=5)
    p.add_argument("--num-output-chunks", type=int, default=8)
    p.add_argument("--heads-coefficient", type=float, default=0.2)
    p.add_argument("--decay", type=float, default=0.8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.case:  # child: one case, JSON on the last stdout line
        print(json.dumps(run_case(args)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    results = {}
    for case in args.cases:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--case", case, "--device", args.device]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"case {case} failed:\n{proc.stderr}")
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[case]
        print(f"{case:>10}: peak extra {r['peak_extra_mib']:9.1f} MiB, median {r['time_s_median']:7.2f} s", flush=True)

    ratios = {}
    if "torchtune" in results:
        tt = results["torchtune"]
        for case, r in results.items():
            ratios[f"{case}_vs_torchtune_memory"] = r["peak_extra_mib"] / tt["peak_extra_mib"]
            ratios[f"{case}_vs_torchtune_time"] = r["time_s_median"] / tt["time_s_median"]
        for case in results:
            print(
                f"{case:>10} / torchtune: memory x{ratios[f'{case}_vs_torchtune_memory']:.2f}, "
                f"time x{ratios[f'{case}_vs_torchtune_time']:.2f}"
            )
    config = {k: v for k, v in vars(args).items() if k not in ("case", "out", "cases")}
    import torch

    report = {
        "benchmark": "loss_memory",
        "config": config,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "results": results,
        "ratios": ratios,
    }
    out = args.out or Path(__file__).parent / "results" / f"loss_memory_{args.device}_s{args.seq_len}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
