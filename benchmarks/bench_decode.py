# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Decoding speed: autoregressive baseline vs Medusa tree decoding, side by side in one process.

Reports, per tree: median latency per prompt, tokens/s, speedup over the baseline, tau (mean tokens per step,
bonus token included), per-head acceptance, whether greedy output equals the baseline's; plus the cost of a
T-token tree step relative to a 1-token step, the KV-eviction cost as a fraction of a tree step, and a tree
calibrated from measured head accuracies and step costs. Writes ``bench_decode.json`` and ``bench_decode.png``
into ``--out``.

Models (``--model``):

* ``smollm2`` (default when the asset exists): SmolLM2-135M-Instruct from ``torchtune_medusa.assets.prepare()``
  with freshly initialised (untrained) heads, or with trained heads when ``--checkpoint`` is given.
* ``checkpoint``: ``--checkpoint DIR``, a ``medusa_finetune`` output dir (its latest ``epoch_N``) or an HF-format
  Llama folder with ``medusa_lm_head.safetensors`` (+ ``medusa_config.json``) next to it or in ``--heads DIR``,
  loaded with :func:`torchtune_medusa.load_medusa` (the architecture comes from its ``config.json``).
* ``smollm2-random``: a SmolLM2-shaped model with random weights (no asset needed).
* ``tiny``: a 2-layer in-process model whose heads are trained for a few seconds on its own greedy output.
* ``llama8b-random`` (GPU): a Llama-3.1-8B-shaped model with random bf16 weights, for the step-cost curve.

Examples::

    python benchmarks/bench_decode.py --out output/bench            # a few minutes on 2 CPU cores
    python benchmarks/bench_decode.py --model tiny --out output/bench_tiny
    python benchmarks/bench_decode.py --model checkpoint --checkpoint output/smollm2_135m_medusa --out output/bench_ckpt
"""

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from torchtune_medusa.generation import (
    _step,
    calibrate_tree,
    generate,
    load_tree,
    measure_head_accuracies,
    measure_step_cost,
    medusa_generate,
    save_tree,
)
from torchtune_medusa.generation._calibration import CALIBRATION_REPEATS
from torchtune_medusa.generation._kv import evict_to_path, kv_caches, scoped_kv_cache
from torchtune_medusa.generation._lookup import DEFAULT_LOOKUP_TOKENS
from torchtune_medusa.generation._settings import decode_compile, decode_dtype, decode_threads
from torchtune_medusa.generation._step import frequent_tokens
from torchtune_medusa.generation._tree import (
    build_tree_buffers,
    chain,
    MC_SIM_7B_63,
    topk_per_head_tree,
    TREE_FILENAME,
    tree_stats,
)
from torchtune_medusa.models._convert_weights import MEDUSA_CONFIG_FILE

TEXT_PROMPTS = [
    "The history of the printing press begins",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Here is a short list of tips for staying productive while working from home:\n1.",
    "Once upon a time, in a small village by the sea, there lived",
    "Photosynthesis is the process by which plants",
    "Q: What is the capital of France?\nA:",
]


def _log(msg: str) -> None:
    print(f"[bench_decode] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ models


def _tiny_model(num_heads: int):
    from torchtune.models.llama3_1 import llama3_1

    from torchtune_medusa.modules import medusa_heads, MedusaTransformerDecoder

    torch.manual_seed(1)
    base = llama3_1(
        vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=512, intermediate_dim=64
    )
    model = MedusaTransformerDecoder.from_decoder(
        base, medusa_heads(num_heads=num_heads, dim=32, vocab_size=128)
    ).eval()
    # Train the heads briefly on the base model's own greedy continuations (self-distillation), so tau > 1.
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 128, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(48)
    ]
    outs = generate(model, prompts, max_new_tokens=40).tokens
    data = torch.tensor([(p + o)[:42] for p, o in zip(prompts, outs)])
    model.set_return_hidden(True)
    with torch.no_grad():
        h = model(data)
    model.set_return_hidden(False)
    opt = torch.optim.Adam(model.medusa_heads.parameters(), lr=3e-2)
    for _ in range(300):
        loss = sum(
            torch.nn.functional.cross_entropy(
                model.project(h[:, : -(k + 1)], k).flatten(0, 1), data[:, k + 1 :].flatten()
            )
            for k in range(1, num_heads + 1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), None


def _smollm2_random(num_heads: int, projection: str = "shared"):
    from torchtune_medusa.models import medusa_smollm2_135m

    torch.manual_seed(0)
    model = medusa_smollm2_135m(medusa_num_heads=num_heads, medusa_projection=projection)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return model.eval(), None


def _load_hf(checkpoint_dir: Path, heads_dir, num_heads: int, projection: str):
    """An HF-format model with the heads of its own or ``heads_dir``'s sidecar (``medusa_config.json`` says their
    shape), or ``num_heads`` freshly initialised heads; and its tokenizer."""
    from torchtune_medusa._load import head_args_from_config, load_hf_medusa, load_tokenizer

    cfg_path = Path(heads_dir or checkpoint_dir) / MEDUSA_CONFIG_FILE
    if cfg_path.is_file():
        head_args = head_args_from_config(json.loads(cfg_path.read_text()), cfg_path)
    else:
        head_args = dict(medusa_num_heads=num_heads, medusa_projection=projection)
    model, source = load_hf_medusa(checkpoint_dir, heads_dir=heads_dir, **head_args)
    _log(f"loaded {checkpoint_dir}; heads: {source or 'freshly initialised (untrained)'}")
    return model, load_tokenizer(checkpoint_dir)


def _load_trained(args):
    """``--checkpoint``: a training run (its latest epoch_N) or a folder with trained heads, with
    :func:`torchtune_medusa.load_medusa`; an HF folder without heads gets ``--num-heads`` fresh ones."""
    from torchtune_medusa import load_medusa
    from torchtune_medusa._load import latest_epoch_dir

    try:
        ckpt = latest_epoch_dir(args.checkpoint)
        if args.heads or not (ckpt / MEDUSA_CONFIG_FILE).is_file():
            args.tokenizer_dir = str(ckpt)
            return _load_hf(ckpt, args.heads, args.num_heads, args.head_projection)
        run = load_medusa(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--checkpoint {args.checkpoint}: {e}") from None
    _log(f"loaded {run.checkpoint_dir} with its trained heads")
    if args.medusa_choices is None and run.medusa_choices is not None:
        args.medusa_choices = str(run.checkpoint_dir / TREE_FILENAME)  # the tree training calibrated
    args.tokenizer_dir = str(run.checkpoint_dir)
    return run.model, run.tokenizer


def chat_prompts(tokenizer_dir: Path, prompt_file: str, n: int, skip: int = 0, max_len: int = 384):
    """Token ids of the first user turns of a ShareGPT file (rows ``skip..``), in SmolLM2's chat template, as
    ``python -m torchtune_medusa.data.self_distill`` builds them; prompts longer than ``max_len`` are passed over."""
    from torchtune.data import Message

    from torchtune_medusa.data import smollm2_tokenizer
    from torchtune_medusa.data._self_distill import load_prompts

    tok = smollm2_tokenizer(str(tokenizer_dir))
    out = []
    for p in load_prompts(prompt_file)[skip:]:
        messages = [Message("system", p.system)] if p.system is not None else []
        ids = tok.prompt_tokens(messages + [Message("user", p.user_turns[0])])
        if len(ids) <= max_len:
            out.append(ids)
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"--prompt-file {prompt_file}: only {len(out)} prompts of <= {max_len} tokens, {n} wanted")
    return out, list(tok.stop_tokens)


def load_model(args):
    if args.model == "tiny":
        return _tiny_model(args.num_heads)
    if args.model == "smollm2-random":
        return _smollm2_random(args.num_heads, args.head_projection)
    if args.model == "llama8b-random":
        from torchtune_medusa.models import medusa_llama3_1_8b

        with torch.device(args.device):
            model = medusa_llama3_1_8b(medusa_num_heads=args.num_heads).to(torch.bfloat16)
        return model.eval(), None
    if args.model == "checkpoint":
        if not args.checkpoint:
            raise SystemExit("--model checkpoint needs --checkpoint DIR")
        return _load_trained(args)
    # smollm2
    from torchtune_medusa import assets

    try:
        a = assets.prepare(install_missing=False, verbose=False)
        path = Path(a.smollm2_dir)
    except Exception as e:  # noqa: BLE001 - any asset problem: fall back, and say so
        _log(f"SmolLM2 asset unavailable ({e}); using a SmolLM2-shaped random model")
        args.model = "smollm2-random"
        return _smollm2_random(args.num_heads, args.head_projection)
    args.tokenizer_dir = str(path)
    return _load_hf(path, args.heads, args.num_heads, args.head_projection)


# ------------------------------------------------------------------------------------------------ arguments


def builtin_trees(num_heads: int) -> Dict[str, List]:
    """The trees every run compares besides ``calibrated`` and ``trained``, by name, for ``num_heads`` heads."""
    trees: Dict[str, List] = {f"chain{d}": chain(d) for d in sorted({1, min(3, num_heads)})}
    trees["topk4-2-1" if num_heads >= 3 else "topk4"] = topk_per_head_tree([4, 2, 1][: min(3, num_heads)])
    if num_heads >= 4:
        trees["mc_sim_7b_63"] = MC_SIM_7B_63
    else:
        trees[f"mc_sim_7b_63[depth<={num_heads}]"] = [p for p in MC_SIM_7B_63 if len(p) <= num_heads]
    return trees


# Every name --trees accepts (which ones a run has depends on its heads and on --medusa-choices).
TREE_NAMES = [*dict.fromkeys(n for k in range(1, 5) for n in builtin_trees(k)), "calibrated", "trained"]


def parse_trees(text: str) -> List[str]:
    """``--trees``: comma-separated names from :data:`TREE_NAMES` (empty: every tree).

    Raises:
        ValueError: unknown names (the message names them and the valid ones).
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TREE_NAMES]
    if unknown:
        raise ValueError(f"unknown tree name(s) {', '.join(unknown)}; valid names: {', '.join(TREE_NAMES)}")
    return names


def parse_step_sizes(text: str) -> List[int]:
    """``--step-sizes``: comma-separated tree sizes T >= 1, returned sorted without repeats.

    Raises:
        ValueError: anything else (the message names the bad entry).
    """
    sizes = set()
    for entry in text.split(","):
        if not entry.strip().isdigit() or int(entry) < 1:
            raise ValueError(f"{text!r} has {entry.strip()!r}; give comma-separated integers >= 1, e.g. 1,4,16,64")
        sizes.add(int(entry))
    return sorted(sizes)


def parse_lookup_tokens(text: str) -> List[int]:
    """``--lookup-tokens``: comma-separated draft lengths >= 0 (0: no lookup), in order, without repeats. Every tree
    runs with each; the first gives the tree's own entry, the others ``<tree>@lookup<N>``.

    Raises:
        ValueError: anything else (the message names the bad entry).
    """
    values: List[int] = []
    for entry in text.split(","):
        if not entry.strip().isdigit():
            raise ValueError(f"{text!r} has {entry.strip()!r}; give comma-separated integers >= 0, e.g. 6,0")
        if int(entry) not in values:
            values.append(int(entry))
    return values


def run_name(tree: str, lookup_tokens: int, lookups: List[int]) -> str:
    """The results key of ``tree`` decoded with ``lookup_tokens`` (see :func:`parse_lookup_tokens`)."""
    return tree if lookup_tokens == lookups[0] else f"{tree}@lookup{lookup_tokens}"


def load_trained_tree(path: str, num_heads: Optional[int] = None) -> List:
    """The ``--medusa-choices`` tree (a ``medusa_choices.json``), checked against the heads when known.

    Raises:
        ValueError: a missing or unreadable file, or a tree deeper than the heads (the message names the file).
    """
    try:
        tree = load_tree(path)[0]
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path}: not a readable tree file ({type(e).__name__}: {e}); give a medusa_choices.json written by "
            "medusa_finetune or calibrate_tree"
        ) from None
    depth = max(map(len, tree), default=0)
    if num_heads is not None and depth > num_heads:
        raise ValueError(f"{path}: the tree is {depth} deep but the model has only {num_heads} Medusa heads")
    return tree


# ------------------------------------------------------------------------------------------------ measurements


def _portable(value):
    """A path under the home directory written as ``~/...``, so that results files name no machine's paths."""
    home = str(Path.home())
    if isinstance(value, str) and value.startswith(home + os.sep):
        return "~" + value[len(home) :]
    return value


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def legacy_step_cost(reference, sizes, context_len, repeats, threads) -> Dict[str, object]:
    """The step cost of the decoding path before the fast one: fp32, eager, torchtune's attention (GQA K/V expanded
    over the cache), ``threads`` threads (the old default: every core)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    _step.USE_FAST_ATTENTION = False
    try:
        cost = measure_step_cost(reference, sizes, context_len=context_len, repeats=repeats)
    finally:
        _step.USE_FAST_ATTENTION = True
        torch.set_num_threads(saved)
    return {"dtype": "float32", "compile": False, "attention": "torchtune", "threads": threads, "step_cost_s": cost}


def first_divergence(a: List[int], b: List[int]) -> int:
    """Tokens ``a`` and ``b`` share before they first differ (the shorter length when one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


WARM_UP_TOKENS = 4


def warm_up_prompts(prompts: List[List[int]], max_new_tokens: int) -> List[List[int]]:
    """Per timed prompt, a prompt that makes a ``WARM_UP_TOKENS``-token run allocate the KV cache the timed run will:
    the prompt, repeated up to ``len(prompt) + max_new_tokens - WARM_UP_TOKENS`` tokens. Compiled graphs are per
    cache size, so warming up on short runs alone would compile the timed runs' graphs inside the timed runs (the
    baseline's are compiled when its reference outputs are generated, the trees' are not); one per length."""
    out = {}
    for p in prompts:
        length = len(p) + max(max_new_tokens - WARM_UP_TOKENS, 0)
        out.setdefault(length, (p * (length // len(p) + 1))[:length])
    return list(out.values())


@torch.inference_mode()
def fp32_scores(reference, prompt: List[int], output: List[int]) -> Tuple[int, float]:
    """The reference model run over ``prompt + output`` once (teacher forcing): how many output tokens are its
    greedy choice after the same prefix, and the output's summed negative log-likelihood under it."""
    if not output:
        return 0, 0.0
    device = next(reference.parameters()).device
    was_hidden = reference.return_hidden
    reference.set_return_hidden(True)
    try:
        hidden = reference(torch.tensor([prompt + output[:-1]], device=device))[0, len(prompt) - 1 :]
    finally:
        reference.set_return_hidden(was_hidden)
    logp = reference.project(hidden, 0).float().log_softmax(-1)
    target = torch.tensor(output, device=device)
    return int((logp.argmax(-1) == target).sum()), float(-logp.gather(-1, target[:, None]).sum())


def quality_report(
    reference,
    model,
    prompts,
    tree,
    *,
    max_new_tokens,
    stop,
    compile,
    proposal_vocab=None,
    decoded=None,
    lookup_tokens=DEFAULT_LOOKUP_TOKENS,
) -> Dict[str, object]:
    """bf16 is not batch-invariant on CPU, so bf16 greedy output can leave the fp32 greedy path. For each prompt:
    how many tokens the bf16 baseline and bf16 Medusa produce before they first differ from the fp32 greedy
    reference, and, scored by the fp32 model with the output as its prefix (:func:`fp32_scores`), how many of their
    tokens are the fp32 model's greedy choice and their negative log-likelihood. The first number depends on where
    a near-tie first flips, so it is noisy; the second pair scores every token. Medusa is quality-neutral when its
    numbers match the baseline's.

    ``decoded`` maps a prompt (a tuple of ids) to the ``(baseline, medusa)`` outputs the timed runs already
    produced with these settings; those prompts are not decoded again (greedy decoding is deterministic)."""
    rows = []
    decoded = decoded or {}
    for p in prompts:
        ref = generate(reference, [p], max_new_tokens=max_new_tokens, stop_tokens=stop).tokens[0]
        if tuple(p) in decoded:
            base, med = decoded[tuple(p)]
        else:
            base = generate(model, [p], max_new_tokens=max_new_tokens, stop_tokens=stop, compile=compile).tokens[0]
            med = medusa_generate(
                model,
                [p],
                max_new_tokens=max_new_tokens,
                medusa_choices=tree,
                stop_tokens=stop,
                compile=compile,
                proposal_vocab=proposal_vocab,
                lookup_tokens=lookup_tokens,
            ).tokens[0]
        rows.append(
            {
                "reference_tokens": len(ref),
                "baseline": first_divergence(ref, base),
                "medusa": first_divergence(ref, med),
                "scores": {"baseline": fp32_scores(reference, p, base), "medusa": fp32_scores(reference, p, med)},
                "tokens": {"baseline": len(base), "medusa": len(med)},
            }
        )

    def summary(key):
        agree = [r[key] for r in rows]
        tokens = max(sum(r["tokens"][key] for r in rows), 1)
        return {
            "tokens_before_divergence": agree,
            "mean": statistics.mean(agree),
            "median": statistics.median(agree),
            "identical_to_reference": sum(r[key] == r["reference_tokens"] for r in rows),
            "fp32_greedy_agreement": sum(r["scores"][key][0] for r in rows) / tokens,
            "fp32_nll_per_token": sum(r["scores"][key][1] for r in rows) / tokens,
        }

    return {
        "prompts": len(rows),
        "max_new_tokens": max_new_tokens,
        "baseline": summary("baseline"),
        "medusa": summary("medusa"),
    }


def proposal_vocab(args, tokenizer, vocab_size: int) -> Optional[torch.Tensor]:
    """``--proposal-vocab N``: the N most frequent tokens of the replies in ``--proposal-vocab-from`` (a ShareGPT
    JSONL such as the self-distillation data the heads were trained on), or None for the whole vocabulary."""
    if not args.proposal_vocab:
        return None
    if tokenizer is None or not args.proposal_vocab_from:
        raise SystemExit("--proposal-vocab needs --proposal-vocab-from FILE and a model with a tokenizer.json")
    replies = []
    with open(Path(args.proposal_vocab_from).expanduser()) as f:
        for line in itertools.islice(f, 5000):
            turns = json.loads(line).get("conversations", [])
            replies += [t["value"] for t in turns if t.get("from") == "gpt"]
    if args.proposal_vocab > vocab_size:
        raise SystemExit(f"--proposal-vocab {args.proposal_vocab}: the model has only {vocab_size} tokens")
    vocab = frequent_tokens((tokenizer.encode(r, add_eos=False) for r in replies), args.proposal_vocab, vocab_size)
    _log(f"proposal vocabulary: the {len(vocab)} most frequent tokens of {len(replies)} replies")
    return vocab


def step_cost_and_eviction(model, sizes, context_len, repeats, compile=False, proposal_vocab=None) -> Dict[str, object]:
    spread: Dict[int, float] = {}
    cost = measure_step_cost(
        model,
        sizes,
        context_len=context_len,
        repeats=repeats,
        compile=compile,
        proposal_vocab=proposal_vocab,
        spread=spread,
    )
    rel = {t: cost[t] / cost[min(sizes)] for t in sizes}
    # Eviction: gather a path of up to 5 nodes spread over the largest tree in every layer, then roll back.
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    t_tree = max(sizes)
    times = []
    with scoped_kv_cache(model, batch_size=1, cache_len=context_len + t_tree, dtype=dtype):
        caches = kv_caches(model)
        accepted = torch.linspace(0, t_tree - 1, min(5, t_tree)).long().unique().to(device)
        for c in caches:
            c.cache_pos.add_(context_len)
        for i in range(repeats * 10 + 5):
            for c in caches:
                c.cache_pos.add_(t_tree)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            evict_to_path(caches, length=context_len, tree_size=t_tree, accepted=accepted)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 5:
                times.append(time.perf_counter() - t0)
            for c in caches:
                c.cache_pos.sub_(len(accepted))
    evict = _median(times)
    return {
        "context_len": context_len,
        "step_cost_s": {str(t): v for t, v in cost.items()},
        "step_cost_relative_to_T1": {str(t): v for t, v in rel.items()},
        "eviction_s": evict,
        "eviction_fraction_of_step": {str(t): evict / cost[t] for t in sizes},
        "relative_spread": {str(t): v for t, v in spread.items()},
        "_cost": cost,
    }


def _trained_tree_or_exit(args, num_heads: int) -> Optional[List]:
    """The ``--medusa-choices`` tree (also the one found next to ``--checkpoint``), checked before any timing."""
    if not args.medusa_choices:
        return None
    try:
        return load_trained_tree(args.medusa_choices, num_heads)
    except ValueError as e:
        raise SystemExit(f"--medusa-choices {e}") from None


def _selected_trees_or_exit(args, num_heads: int, has_trained: bool) -> List[str]:
    """``--trees``, checked against the trees this model has, before any timing."""
    available = [*builtin_trees(num_heads), "calibrated", *(["trained"] if has_trained else [])]
    selected = parse_trees(args.trees)
    missing = [n for n in selected if n not in available]
    if missing:
        raise SystemExit(
            f"--trees: {', '.join(missing)} not available with this model ({num_heads} heads"
            f"{'' if has_trained else ', no --medusa-choices'}); available: {', '.join(available)}"
        )
    return selected


def run(args) -> Dict[str, object]:
    device = torch.device(args.device)
    threads = decode_threads(args.threads)
    torch.set_num_threads(threads)
    model, tokenizer = load_model(args)
    loaded_dtype = next(model.parameters()).dtype
    dtype = decode_dtype(args.dtype, device) if args.dtype != "as-loaded" else loaded_dtype
    compile = decode_compile(args.compile, device, dtype)
    # An fp32 copy: the reference of the bf16 quality report and of today's (pre-fast-path) step cost.
    wants_reference = (dtype != torch.float32 and args.quality_prompts > 0) or args.compare_legacy
    reference = copy.deepcopy(model).to(device=device, dtype=torch.float32) if wants_reference else None
    model = model.to(device=device, dtype=dtype)
    k = model.num_medusa_heads
    trained = _trained_tree_or_exit(args, k)
    selected = _selected_trees_or_exit(args, k, trained is not None)
    vocab = model.tok_embeddings.num_embeddings
    stop = [int(t) for t in args.stop_tokens.split(",") if t] if args.stop_tokens else []
    calib_prompts = None
    if args.prompt_file:
        if tokenizer is None:
            raise SystemExit("--prompt-file needs a model with a tokenizer.json (smollm2 or an HF checkpoint)")
        prompts, chat_stop = chat_prompts(
            args.tokenizer_dir, args.prompt_file, args.num_prompts + args.calibration_prompts, skip=args.prompt_skip
        )
        prompts, calib_prompts = prompts[: args.num_prompts], prompts[args.num_prompts :] or None
        stop = stop or chat_stop
    elif tokenizer is not None:
        prompts = [tokenizer.encode(t, add_eos=False) for t in TEXT_PROMPTS[: args.num_prompts]]
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(args.num_prompts)]
    _log(
        f"model={args.model} heads={k} vocab={vocab} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
        f"threads={torch.get_num_threads()} device={device}"
    )

    # Step cost curve and eviction cost.
    sizes = parse_step_sizes(args.step_sizes)
    vocab = proposal_vocab(args, tokenizer, model.tok_embeddings.num_embeddings)
    sc = step_cost_and_eviction(model, sizes, args.context_len, args.cost_repeats, compile, vocab)
    if args.compare_legacy:
        legacy = legacy_step_cost(reference, sizes, args.context_len, args.cost_repeats, args.legacy_threads)
        sc["legacy"] = {**legacy, "step_cost_s": {str(t): v for t, v in legacy["step_cost_s"].items()}}
        sc["T1_speedup_over_legacy"] = legacy["step_cost_s"][sizes[0]] / sc["_cost"][sizes[0]]
        _log(
            f"1-token step: {sc['_cost'][sizes[0]] * 1e3:.1f} ms vs {legacy['step_cost_s'][sizes[0]] * 1e3:.1f} ms on "
            f"the legacy path (fp32, eager, torchtune attention, {args.legacy_threads} threads): "
            f"{sc['T1_speedup_over_legacy']:.2f}x"
        )
    _log(
        "step cost relative to T=1: " + ", ".join(f"T={t}: {v:.2f}x" for t, v in sc["step_cost_relative_to_T1"].items())
    )
    _log(
        f"eviction: {sc['eviction_s'] * 1e6:.0f} us = "
        f"{100 * sc['eviction_fraction_of_step'][str(max(sizes))]:.2f}% of a T={max(sizes)} step"
    )

    def decode_baseline(ps):
        return [
            generate(model, [p], max_new_tokens=args.max_new_tokens, stop_tokens=stop, compile=compile).tokens[0]
            for p in ps
        ]

    # Head accuracies on the baseline's own greedy continuations of the benchmark prompts (what acceptance needs),
    # and the tree calibrated on them (on other prompts when there are some: --calibration-prompts).
    def accuracies(ps, outs):
        return measure_head_accuracies(
            model, [p + o for p, o in zip(ps, outs)], topk=10, score_from=[len(p) for p in ps]
        )

    def accuracies_and_calibrated_tree(base_outs):
        acc = accuracies(prompts, base_outs)
        _log("head top-1 accuracy on the baseline's output: " + ", ".join(f"{a:.3f}" for a in acc[:, 0].tolist()))
        calib_acc = accuracies(calib_prompts, decode_baseline(calib_prompts)) if calib_prompts else acc
        calibrated = calibrate_tree(calib_acc, sc["_cost"], max_nodes=args.max_nodes, meta={"model": args.model})
        save_tree(Path(args.out) / "calibrated_tree.json", calibrated)
        _log(
            f"calibrated tree: {len(calibrated.medusa_choices)} nodes, predicted tau "
            f"{calibrated.expected_tokens_per_step:.2f}, predicted speedup {calibrated.expected_speedup:.2f}x"
        )
        return acc, calibrated

    # The calibrated tree is needed before timing only when it is timed; otherwise it is reported from the timed
    # baseline outputs instead of decoding every prompt once more.
    times_calibrated = not selected or "calibrated" in selected
    if times_calibrated:
        acc, calibrated = accuracies_and_calibrated_tree(decode_baseline(prompts))
    trees = builtin_trees(k)
    if times_calibrated and calibrated.medusa_choices:
        trees["calibrated"] = calibrated.medusa_choices
    elif times_calibrated and "calibrated" in selected:
        _log("the calibrated tree is empty (no guess pays off on this hardware): not run")
    if trained is not None:
        trees["trained"] = trained  # e.g. the tree medusa_finetune saved
    if selected:
        trees = {n: trees[n] for n in selected if n in trees}
    lookups = parse_lookup_tokens(args.lookup_tokens)
    runs = {run_name(n, lk, lookups): (ch, lk) for n, ch in trees.items() for lk in lookups}

    # Warm-up, then interleaved repeats: baseline and every run in each round.
    for p in warm_up_prompts(prompts, args.max_new_tokens):
        generate(model, [p], max_new_tokens=WARM_UP_TOKENS, compile=compile)
        for ch, lk in runs.values():
            medusa_generate(
                model,
                [p],
                max_new_tokens=WARM_UP_TOKENS,
                medusa_choices=ch,
                compile=compile,
                proposal_vocab=vocab,
                lookup_tokens=lk,
            )
    times = {"baseline": [[] for _ in prompts], **{n: [[] for _ in prompts] for n in runs}}
    ttft = {n: [] for n in times}
    tokens = {n: [0] * len(prompts) for n in times}
    stats = {n: [None] * len(prompts) for n in runs}
    outputs = {n: [None] * len(prompts) for n in times}  # the last round's, reused by the quality report
    match = {n: True for n in runs}
    for r in range(args.repeats):
        for i, p in enumerate(prompts):
            o = generate(model, [p], max_new_tokens=args.max_new_tokens, stop_tokens=stop, compile=compile)
            times["baseline"][i].append(o.stats.total_time_s)
            ttft["baseline"].append(o.stats.time_to_first_token_s)
            tokens["baseline"][i] = o.stats.new_tokens
            outputs["baseline"][i] = o.tokens[0]
            for n, (ch, lk) in runs.items():
                m = medusa_generate(
                    model,
                    [p],
                    max_new_tokens=args.max_new_tokens,
                    medusa_choices=ch,
                    stop_tokens=stop,
                    compile=compile,
                    proposal_vocab=vocab,
                    lookup_tokens=lk,
                )
                times[n][i].append(m.stats.total_time_s)
                ttft[n].append(m.stats.time_to_first_token_s)
                tokens[n][i] = m.stats.new_tokens
                stats[n][i] = m.stats
                outputs[n][i] = m.tokens[0]
                match[n] &= m.tokens[0] == o.tokens[0]
        _log(f"round {r + 1}/{args.repeats} done")
    if not times_calibrated:
        acc, calibrated = accuracies_and_calibrated_tree(outputs["baseline"])

    def summary(name):
        med = [_median(t) for t in times[name]]
        total_t, total_n = sum(med), sum(tokens[name])
        return {
            "median_latency_s_per_prompt": med,
            "total_median_latency_s": total_t,
            "new_tokens": total_n,
            "tokens_per_second": total_n / total_t,
            "time_to_first_token_s": _median(ttft[name]),
        }

    results = {"baseline": summary("baseline"), "trees": {}}
    base_tps = results["baseline"]["tokens_per_second"]
    for n, (ch, lk) in runs.items():
        s = summary(n)
        st = [x for x in stats[n] if x is not None]
        steps = sum(x.steps for x in st)
        acc_steps = [a for x in st for a in x.accepted_per_step]
        depth = max(len(x.per_head_acceptance) for x in st)
        per_head = [
            sum(x.per_head_acceptance[j] * x.steps for x in st if j < len(x.per_head_acceptance)) / max(steps, 1)
            for j in range(depth)
        ]
        s.update(
            tree_tokens=build_tree_buffers(ch).num_nodes,
            tree=tree_stats(ch),
            tau=sum(acc_steps) / max(len(acc_steps), 1),
            per_head_acceptance=per_head,
            speedup=s["tokens_per_second"] / base_tps,
            greedy_output_equals_baseline=match[n],
            lookup_tokens=lk,
            lookup_step_fraction=sum(x.lookup_steps for x in st) / max(steps, 1),
            lookup_token_fraction=sum(x.lookup_accepted for x in st) / max(sum(x.new_tokens for x in st), 1),
        )
        results["trees"][n] = s
    sc.pop("_cost")
    quality = None
    if dtype != torch.float32 and args.quality_prompts > 0:
        q_tree = next(n for n in ("trained", "calibrated", *runs) if n in runs)
        if args.prompt_file:
            q_prompts = chat_prompts(args.tokenizer_dir, args.prompt_file, args.quality_prompts, skip=args.prompt_skip)[
                0
            ]
        else:
            q_prompts = (prompts * args.quality_prompts)[: args.quality_prompts]
        _log(f"bf16 quality report: {len(q_prompts)} prompts, tree {q_tree}, against the fp32 greedy reference")
        timed = {tuple(p): (outputs["baseline"][i], outputs[q_tree][i]) for i, p in enumerate(prompts)}
        q_choices, q_lookup = runs[q_tree]
        quality = quality_report(
            reference,
            model,
            q_prompts,
            q_choices,
            max_new_tokens=args.max_new_tokens,
            stop=stop,
            compile=compile,
            proposal_vocab=vocab,
            decoded=timed,
            lookup_tokens=q_lookup,
        )
        quality["tree"] = q_tree
    return {
        "config": {k: _portable(v) for k, v in vars(args).items()},
        "settings": {"dtype": str(dtype).replace("torch.", ""), "threads": threads, "compile": compile},
        "proposal_vocab_size": int(vocab.numel()) if vocab is not None else None,
        "quality_vs_fp32": quality,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        },
        "prompts": {
            "source": _portable(args.prompt_file) or "built-in",
            "count": len(prompts),
            "lengths": [len(p) for p in prompts],
        },
        "head_accuracies_top10": acc.tolist(),
        "head_top1": acc[:, 0].tolist(),
        "calibrated_tree": calibrated.to_dict(),
        "step_cost": sc,
        **results,
    }


def plot(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    trees = res["trees"]
    names = list(trees)
    x = [trees[n]["tree_tokens"] for n in names]
    ax = axes[0]
    ax.axhline(res["baseline"]["tokens_per_second"], color="gray", ls="--", label="baseline")
    ax.scatter(x, [trees[n]["tokens_per_second"] for n in names])
    for n, xi in zip(names, x):
        ax.annotate(f"{n}\nτ={trees[n]['tau']:.2f}", (xi, trees[n]["tokens_per_second"]), fontsize=7)
    ax.set_xlabel("tree tokens per step")
    ax.set_ylabel("tokens / s")
    ax.set_title("Tree size vs speed")
    ax.legend()
    ax = axes[1]
    rel = res["step_cost"]["step_cost_relative_to_T1"]
    settings = res.get("settings", {})
    ax.plot([int(t) for t in rel], list(rel.values()), marker="o", label=f"this run ({settings.get('dtype', '')})")
    legacy = res["step_cost"].get("legacy")
    if legacy:
        cost = {int(t): v for t, v in legacy["step_cost_s"].items()}
        ax.plot(
            list(cost), [v / cost[min(cost)] for v in cost.values()], marker="s", ls="--", label="legacy (fp32, eager)"
        )
        ax.legend(fontsize=7)
    ax.set_xlabel("T (tokens in one step)")
    ax.set_ylabel("step cost / 1-token step")
    ax.set_title(f"Step cost at context {res['step_cost']['context_len']}")
    ax = axes[2]
    for n in names:
        pha = trees[n]["per_head_acceptance"]
        ax.plot(range(1, len(pha) + 1), pha, marker="o", label=n)
    ax.set_xlabel("head k")
    ax.set_ylabel("fraction of steps accepting head k")
    ax.set_title("Per-head acceptance")
    ax.legend(fontsize=7)
    fig.suptitle(
        f"{res['config']['model']}: speedup " + ", ".join(f"{n} {trees[n]['speedup']:.2f}x" for n in names), fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="smollm2", choices=["smollm2", "smollm2-random", "tiny", "checkpoint", "llama8b-random"]
    )
    p.add_argument("--checkpoint", help="HF-format model folder (--model checkpoint)")
    p.add_argument("--heads", help="folder with medusa_lm_head.safetensors if not next to the model")
    p.add_argument("--num-heads", type=int, default=4, help="heads to create when the checkpoint has none")
    p.add_argument(
        "--head-projection",
        default="shared",
        choices=["shared", "own"],
        help="layout of heads made when the checkpoint has none (shared: the base output layer, as the configs train)",
    )
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument(
        "--prompt-file",
        help="ShareGPT JSON/JSONL (e.g. the held-out split): chat prompts from its first user turns",
    )
    p.add_argument("--prompt-skip", type=int, default=0, help="with --prompt-file: pass over its first N prompts")
    p.add_argument(
        "--calibration-prompts",
        type=int,
        default=0,
        help="with --prompt-file: calibrate the tree on this many further prompts (default 0: on the benchmark's own)",
    )
    p.add_argument(
        "--medusa-choices",
        help="also run this tree, as 'trained' (a medusa_choices.json; default: the one saved with --checkpoint)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--trees", default="", help=f"comma-separated subset of the trees to run: {', '.join(TREE_NAMES)}")
    p.add_argument(
        "--lookup-tokens",
        default=str(DEFAULT_LOOKUP_TOKENS),
        help="comma-separated lookup-draft lengths to run every tree with (0: the heads alone); the first is the "
        "tree's own entry, the others '<tree>@lookup<N>', e.g. 6,0",
    )
    p.add_argument("--max-nodes", type=int, default=63, help="largest calibrated tree")
    p.add_argument("--step-sizes", default="1,4,16,32,64")
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--cost-repeats", type=int, default=CALIBRATION_REPEATS, help="interleaved step-cost rounds")
    p.add_argument("--stop-tokens", default="", help="comma-separated stop token ids")
    # The shipped decode settings are the defaults (torchtune_medusa.generation._settings says why).
    p.add_argument("--threads", default="auto", help="intra-op threads, or auto: every usable core but one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # bf16 kernels are not batch-invariant, so bf16 greedy outputs can drift from the baseline's (the lossless
    # column says when they did; the quality report measures the drift against fp32 for both).
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "as-loaded"],
        help="auto: bf16 where the hardware computes it natively, else fp32",
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="auto: off for bf16 on a CPU with native bf16 (the prepacked eager step is faster), else on",
    )
    p.add_argument(
        "--quality-prompts",
        type=int,
        default=16,
        help="when not fp32: prompts of the quality report (tokens until bf16 output leaves the fp32 greedy path)",
    )
    p.add_argument(
        "--proposal-vocab",
        type=int,
        default=0,
        help="heads propose only the N most frequent tokens of --proposal-vocab-from (0: the whole vocabulary)",
    )
    p.add_argument("--proposal-vocab-from", help="ShareGPT JSONL whose replies give the token frequencies")
    p.add_argument(
        "--compare-legacy",
        action="store_true",
        help="also time the decoding step of the path before the fast one (fp32, eager, torchtune attention)",
    )
    p.add_argument("--legacy-threads", type=int, default=os.cpu_count() or 1, help="threads of --compare-legacy")
    p.add_argument("--out", default="output/bench_decode")
    args = p.parse_args(argv)
    try:
        decode_threads(args.threads)
    except ValueError as e:
        p.error(f"--threads: {e}")
    checks = (("num_prompts", 1), ("prompt_skip", 0), ("calibration_prompts", 0), ("max_new_tokens", 1))
    checks += (("repeats", 1), ("cost_repeats", 1))
    if args.proposal_vocab and not (args.proposal_vocab_from and Path(args.proposal_vocab_from).expanduser().is_file()):
        p.error(
            f"--proposal-vocab {args.proposal_vocab} needs --proposal-vocab-from FILE (a ShareGPT JSONL), got "
            f"{args.proposal_vocab_from!r}"
        )
    for name, low in (*checks, ("quality_prompts", 0), ("legacy_threads", 1), ("proposal_vocab", 0)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.prompt_file and not Path(args.prompt_file).expanduser().is_file():
        p.error(f"--prompt-file {args.prompt_file}: no such file (held-out split: <cache>/sharegpt/heldout.jsonl)")
    for flag, check in (
        ("--trees", parse_trees),
        ("--step-sizes", parse_step_sizes),
        ("--lookup-tokens", parse_lookup_tokens),
    ):
        try:
            check(getattr(args, flag[2:].replace("-", "_")))
        except ValueError as e:
            p.error(f"{flag}: {e}")
    if args.medusa_choices:
        try:
            load_trained_tree(args.medusa_choices)
        except ValueError as e:
            p.error(f"--medusa-choices {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = run(args)
    res["wall_time_s"] = time.perf_counter() - t0
    (out / "bench_decode.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "bench_decode.png")
    b = res["baseline"]
    print(f"\nbaseline: {b['tokens_per_second']:.1f} tok/s, TTFT {b['time_to_first_token_s'] * 1e3:.1f} ms")
    print("head top-1 accuracy on the baseline's output: " + ", ".join(f"{a:.3f}" for a in res["head_top1"]))
    print(f"{'tree':<26}{'T':>4}{'tau':>7}{'tok/s':>9}{'speedup':>9}  per-head acceptance   lookup   lossless")
    for n, t in res["trees"].items():
        pha = " ".join(f"{a:.2f}" for a in t["per_head_acceptance"])
        lookup = f"{100 * t['lookup_token_fraction']:.0f}%" if t["lookup_tokens"] else "off"
        print(
            f"{n:<26}{t['tree_tokens']:>4}{t['tau']:>7.2f}{t['tokens_per_second']:>9.1f}{t['speedup']:>8.2f}x  "
            f"{pha:<20} {lookup:>6}   {t['greedy_output_equals_baseline']}"
        )
    print("lookup: the share of new tokens accepted from lookup drafts beyond the heads' best path")
    sc = res["step_cost"]
    print(
        "step cost / 1-token step: " + ", ".join(f"T={t}: {v:.2f}" for t, v in sc["step_cost_relative_to_T1"].items())
    )
    print("eviction / step: " + ", ".join(f"T={t}: {100 * v:.2f}%" for t, v in sc["eviction_fraction_of_step"].items()))
    if "T1_speedup_over_legacy" in sc:
        legacy = sc["legacy"]["step_cost_s"]
        print(
            "legacy path (fp32, eager, torchtune attention) step cost / its 1-token step: "
            + ", ".join(f"T={t}: {v / legacy[min(legacy, key=int)]:.2f}" for t, v in legacy.items())
            + f"; this run's 1-token step is {sc['T1_speedup_over_legacy']:.2f}x faster"
        )
    q = res["quality_vs_fp32"]
    if q:
        print(
            f"{res['settings']['dtype']} vs fp32 greedy, {q['prompts']} prompts x {q['max_new_tokens']} tokens: tokens "
            f"before the first difference, mean (median): baseline {q['baseline']['mean']:.1f} "
            f"({q['baseline']['median']:.0f}), Medusa {q['tree']} {q['medusa']['mean']:.1f} "
            f"({q['medusa']['median']:.0f}); "
            f"identical to fp32: baseline {q['baseline']['identical_to_reference']}, "
            f"Medusa {q['medusa']['identical_to_reference']}; scored by the fp32 model, its greedy token / NLL per "
            f"token: baseline {100 * q['baseline']['fp32_greedy_agreement']:.1f}% / "
            f"{q['baseline']['fp32_nll_per_token']:.3f}, Medusa {100 * q['medusa']['fp32_greedy_agreement']:.1f}% / "
            f"{q['medusa']['fp32_nll_per_token']:.3f}"
        )
    print(f"wrote {out / 'bench_decode.json'} and {out / 'bench_decode.png'} ({res['wall_time_s']:.0f} s)")
    differ = [n for n, t in res["trees"].items() if not t["greedy_output_equals_baseline"]]
    if differ:
        what = f"greedy Medusa output differs from the baseline's with tree(s) {', '.join(differ)}"
        if res["settings"]["dtype"] != "float32":
            print(f"note: {what}: bf16 kernels give batch-size-dependent rounding, so this is expected in bf16")
        else:
            print(f"error: {what}; tree decoding must be lossless in fp32", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
