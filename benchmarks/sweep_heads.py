# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Choose Medusa-1 head settings on held-out data: a grid of losses x learning rates x residual blocks per head,
every setting trained on the same cached hidden states, scored after every epoch.

With a frozen backbone the heads only ever see the backbone's normed hidden states, so they are computed once
(train and held-out) and every setting trains on them: a sweep costs one backbone pass plus the heads' own work.
Training files written by ``self_distill --save-hidden`` cost no backbone pass at all: their saved states are used.
Targets are the base model's greedy tokens (the recipe's ``head_targets: base_greedy``), heads score the
``--truncated-vocab`` most frequent targets (the recipe's ``truncated_vocab_size``), and the loss is the
recipe's :class:`~torchtune_medusa.modules.MedusaCrossEntropyLoss` (``--loss ce``) or the KL to the base model's
distribution k steps ahead (``--loss kl``, :class:`~torchtune_medusa.modules.MedusaSelfDistillationLoss` with
``head_target="teacher_distribution"``). Held-out top-1 counts targets outside the token map as misses. Prints a
table (held-out head top-1 per setting and epoch) and writes JSON.

Example::

    python benchmarks/sweep_heads.py --train replies.jsonl --heldout heldout_replies.jsonl \\
        --lr 3e-3,1e-2 --layers 1,2 --epochs 3 --out output/sweep_heads.json
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from torchtune.data import padded_collate_sft

from torchtune_medusa._load import load_hf_base
from torchtune_medusa.data import medusa_chat_dataset, self_distilled_hidden_dataset, smollm2_tokenizer
from torchtune_medusa.generation._settings import DTYPES
from torchtune_medusa.models import medusa_smollm2_135m
from torchtune_medusa.modules import MedusaCrossEntropyLoss, MedusaSelfDistillationLoss, MedusaTransformerDecoder
from torchtune_medusa.training._head_vocab import head_token_map

IGNORE = -100


def hidden_states(model: MedusaTransformerDecoder, dataset, batch_size: int, every: int = 1):
    """Per sample (every ``every``-th one): the normed hidden state of every position, the base-shifted greedy
    targets (the base model's pick after each trained position, ``IGNORE`` elsewhere) and the input tokens (which
    Hydra heads read: in raw text they are not the greedy picks). Samples are batched by length, so that little
    is padded."""
    model.set_return_hidden(True)
    out = []
    picked = sorted(range(0, len(dataset), every), key=lambda i: len(dataset[i]["tokens"]))
    with torch.no_grad():
        for start in range(0, len(picked), batch_size):
            samples = [dataset[i] for i in picked[start : start + batch_size]]
            batch = padded_collate_sft(samples, padding_idx=0, ignore_idx=IGNORE)
            hidden = model(batch["tokens"])
            greedy = model.project(hidden, 0).argmax(-1)
            labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE)], 1)
            targets = torch.where(labels != IGNORE, greedy, labels)
            for row, sample in enumerate(samples):
                n = len(sample["tokens"])
                out.append((hidden[row, :n].clone(), targets[row, :n].clone(), batch["tokens"][row, :n].clone()))
            print(f"\rhidden states {len(out)}/{len(picked)}", end="", flush=True)
    print()
    return out


def saved_hidden_states(files, dtype: torch.dtype, every: int = 1):
    """``(hidden, targets, tokens)`` per reply of ``self_distill --save-hidden`` files (greedy replies: a reply's
    tokens are the base model's picks after each of its positions, so the input tokens are the targets shifted by
    one), or None when the files hold no saved states."""
    try:
        saved = self_distilled_hidden_dataset(data_files=files)
    except ValueError:
        return None
    if not saved.greedy_targets:
        return None
    rows = []
    for i in range(0, len(saved), every):
        targets = torch.tensor(saved[i]["labels"][1:])
        tokens = torch.cat([torch.zeros(1, dtype=torch.long), targets[:-1].clamp(min=0)])
        rows.append((saved.hidden_state(i).to(dtype), targets, tokens))
    return rows


def make_loss(name: str, decay: float):
    common = dict(num_output_chunks=4, heads_coefficient=1.0, include_base_loss=False, recompute=False)
    if name == "ce":
        return MedusaCrossEntropyLoss(decay=decay, **common)
    if name == "kl":
        return MedusaSelfDistillationLoss(
            head_target="teacher_distribution", decay=decay, log_base_metrics=False, **common
        )
    raise SystemExit(f"--loss: {name!r} is not ce or kl")


def batches(data, batch_size: int, generator=None):
    order = torch.randperm(len(data), generator=generator) if generator is not None else range(len(data))
    order = list(order)
    for start in range(0, len(order), batch_size):
        rows = [data[int(i)] for i in order[start : start + batch_size]]
        length = max(h.size(0) for h, _, _ in rows)
        hidden = torch.zeros(len(rows), length, rows[0][0].size(-1), dtype=rows[0][0].dtype)
        targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        tokens = torch.zeros(len(rows), length, dtype=torch.long)
        for i, (h, t, x) in enumerate(rows):
            hidden[i, : h.size(0)], targets[i, : t.size(0)], tokens[i, : x.size(0)] = h, t, x
        yield hidden, targets, tokens


def evaluate(model, loss_fn, data, batch_size: int):
    correct = counts = 0
    with torch.no_grad():
        for hidden, targets, tokens in batches(data, batch_size):
            out = loss_fn(hidden, targets, model.project, num_heads=model.num_medusa_heads, tokens=tokens)
            correct = correct + out.head_topk_correct[:, 0]
            counts = counts + out.head_counts
    return (correct[1:].double() / counts[1:].clamp(min=1)).tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, nargs="+", help="self-distilled ShareGPT JSONL file(s)")
    parser.add_argument(
        "--mix-sharegpt",
        default="0",
        help="comma-separated numbers of raw ShareGPT rows (the asset's train split, from its end) to add to the "
        "self-distilled data, one data set per number; their targets are the base model's greedy tokens",
    )
    parser.add_argument("--heldout", required=True, help="held-out self-distilled ShareGPT JSONL")
    parser.add_argument("--heldout-samples", type=int, default=64)
    parser.add_argument("--train-every", type=int, default=1, help="use every N-th training sample (a quicker sweep)")
    parser.add_argument("--lr", default="3e-3,1e-2")
    parser.add_argument("--loss", default="ce", help="comma-separated: ce (greedy targets) and/or kl (distribution)")
    parser.add_argument("--layers", default="1,2")
    parser.add_argument(
        "--head-type",
        default="medusa",
        help="comma-separated: medusa and/or hydra (head k also reads the k tokens before its target)",
    )
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--truncated-vocab", type=int, default=8192)
    parser.add_argument("--decay", type=float, default=0.8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("output/sweep_heads.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchtune_medusa.assets import prepare

    model_dir = str(prepare().smollm2_dir)
    tokenizer = smollm2_tokenizer(model_dir, max_seq_len=args.max_seq_len)
    train = medusa_chat_dataset(tokenizer, data_files=args.train, split="train", max_seq_len=args.max_seq_len)
    mixes = [int(x) for x in args.mix_sharegpt.split(",")]
    raw = None
    if max(mixes) > 0:
        raw = medusa_chat_dataset(
            tokenizer, data_files=str(prepare().sharegpt_train), split=f"train[-{max(mixes)}:]", max_seq_len=512
        )
    heldout = medusa_chat_dataset(
        tokenizer, data_files=args.heldout, split=f"train[:{args.heldout_samples}]", max_seq_len=args.max_seq_len
    )
    base_sd = load_hf_base(model_dir, dtype=DTYPES[args.dtype]).state_dict()
    token_map = head_token_map(args.truncated_vocab, saved=None, dataset=train, vocab_size=49152, ignore_index=IGNORE)
    t0 = time.perf_counter()
    probe = medusa_smollm2_135m(medusa_num_heads=args.heads, medusa_projection="shared").to(DTYPES[args.dtype])
    probe.load_state_dict(base_sd, strict=False)
    train_data = saved_hidden_states(args.train, DTYPES[args.dtype], args.train_every)
    if train_data is None:
        train_data = hidden_states(probe, train, 8, args.train_every)
    heldout_data = hidden_states(probe, heldout, 8)
    raw_data = hidden_states(probe, raw, 8) if raw is not None else []
    datasets = {mix: train_data + (raw_data[: len(raw_data) * mix // max(mixes)] if mix else []) for mix in mixes}
    trained_tokens = {mix: sum(int((t != IGNORE).sum()) for _, t, _ in d) for mix, d in datasets.items()}
    hidden_s = time.perf_counter() - t0
    print(f"hidden states of {len(train_data)} + {len(heldout_data)} samples in {hidden_s:.0f}s")
    results = []
    losses = args.loss.split(",")
    for name in losses:
        make_loss(name, args.decay)  # a bad name fails before training
    head_types = args.head_type.split(",")
    grid = itertools.product(
        mixes, head_types, losses, [float(x) for x in args.lr.split(",")], [int(x) for x in args.layers.split(",")]
    )
    for mix, head_type, loss_name, lr, layers in grid:
        data = datasets[mix]
        torch.manual_seed(0)
        model = medusa_smollm2_135m(
            medusa_num_heads=args.heads,
            medusa_num_layers=layers,
            medusa_projection="shared",
            medusa_head_type=head_type,
        )
        model = model.to(DTYPES[args.dtype])
        model.load_state_dict(base_sd, strict=False)
        model.set_medusa_token_map(token_map)
        model.requires_grad_(False)
        model.medusa_heads.requires_grad_(True)
        loss_fn = make_loss(loss_name, args.decay)
        score_fn = make_loss("ce", args.decay)
        optimizer = torch.optim.AdamW(model.medusa_heads.parameters(), lr=lr, weight_decay=0.0)
        steps = args.epochs * -(-len(data) // args.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
        curve = []
        t1 = time.perf_counter()
        for epoch in range(args.epochs):
            g = torch.Generator().manual_seed(epoch)
            for hidden, targets, tokens in batches(data, args.batch_size, g):
                if loss_name == "kl":
                    out = loss_fn(
                        hidden, targets, model.project, hidden, model.project, num_heads=args.heads, tokens=tokens
                    )
                else:
                    out = loss_fn(hidden, targets, model.project, num_heads=args.heads, tokens=tokens)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.medusa_heads.parameters(), 1.0)
                optimizer.step()
                schedule.step()
            top1 = evaluate(model, score_fn, heldout_data, args.batch_size)
            curve.append({"epoch": epoch + 1, "heldout_top1": top1})
            print(
                f"sharegpt +{mix} ({trained_tokens[mix]} tokens) {head_type} {loss_name} lr {lr:g} layers {layers} "
                f"epoch {epoch + 1}: "
                "held-out top-1 " + " ".join(f"{a:.3f}" for a in top1),
                flush=True,
            )
        results.append(
            {
                "mix_sharegpt_rows": mix,
                "head_type": head_type,
                "loss": loss_name,
                "trained_tokens": trained_tokens[mix],
                "lr": lr,
                "layers": layers,
                "curve": curve,
                "train_s": time.perf_counter() - t1,
            }
        )
    best = max(results, key=lambda r: max(c["heldout_top1"][0] for c in r["curve"]))
    print(
        f"\nbest head-1: sharegpt +{best['mix_sharegpt_rows']}, {best['head_type']}, {best['loss']}, "
        f"lr {best['lr']:g}, layers {best['layers']}"
    )
    summary = {
        "self_distilled_samples": len(train_data),
        "heldout_samples": len(heldout_data),
        "truncated_vocab": args.truncated_vocab,
        "dtype": args.dtype,
        "heads": args.heads,
        "batch_size": args.batch_size,
        "hidden_states_s": hidden_s,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
