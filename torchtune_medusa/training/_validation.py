# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""In-recipe validation of Medusa heads.

Two measurements, both on held-out data:

1. :func:`evaluate_heads` (teacher forcing, every rank on its share of the batches, sums all-reduced): per-head
   loss and top-k accuracy against the data, and a ``[K, topk]`` *agreement table*: how often head ``k``'s rank-r
   candidate at position ``t`` equals the base model's own greedy pick at ``t + k`` (the token greedy Medusa
   decoding would have to accept). The table is teacher-forced along the held-out text, not along the model's
   own greedy continuation as FasterDecoding's ``heads_accuracy.py`` does; on self-distilled data the two agree.
2. :func:`evaluate_decoding` (rank 0, unsharded model): real Medusa tree decoding with KV-cache eviction
   (:func:`torchtune_medusa.generation.medusa_generate`, greedy) on held-out prompts, reporting tau (mean tokens
   per step, bonus token included) and per-head acceptance.

:func:`tree_of_size` turns the agreement table into the best prefix-closed tree of a given size
(:func:`torchtune_medusa.generation._tree.grow_tree`).
"""

import copy
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchtune import utils

from torchtune_medusa.generation import medusa_generate
from torchtune_medusa.generation._calibration import calibrate_tree, CALIBRATION_REPEATS, measure_step_cost
from torchtune_medusa.generation._lookup import DEFAULT_LOOKUP_TOKENS
from torchtune_medusa.generation._settings import decode_compile, decode_dtype, decode_threads
from torchtune_medusa.generation._tree import grow_tree
from torchtune_medusa.modules.medusa_heads import following_tokens, to_head_vocab, token_map_index

__all__ = [
    "HeldOutHiddenStates",
    "calibrate_tree_for_speed",
    "curve_point",
    "evaluate_decoding",
    "evaluate_heads",
    "prompts_from_dataset",
    "tree_of_size",
    "validate_decoding",
]

log = utils.get_logger("INFO")


class HeldOutHiddenStates:
    """``hidden_fn`` for :func:`evaluate_heads` that computes each held-out batch's hidden state once: with a
    frozen backbone (Medusa-1) they never change, so frequent validations (a learning curve) cost only the heads.
    Neither do the base head's results: :attr:`base_results` is the ``base_results`` to pass to every
    :func:`evaluate_heads` call (the base projection onto the whole vocabulary was over half of a SmolLM2 validation).

    Args:
        compute (Callable): ``batch -> [b, s, d]`` hidden state.
    """

    def __init__(self, compute: Callable[[Dict[str, torch.Tensor]], torch.Tensor]) -> None:
        self.compute = compute
        self._hidden: Optional[List[torch.Tensor]] = None
        self.base_results: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def bind(self, batches: Sequence[Dict[str, torch.Tensor]]) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
        """The ``hidden_fn`` of these batches (the same held-out batches at every call, in the same order)."""
        if self._hidden is None:
            self._hidden = [self.compute(b) for b in batches]
        by_batch = {id(b): h for b, h in zip(batches, self._hidden)}
        return lambda batch: by_batch[id(batch)]


def curve_point(step: int, train_tokens: int, metrics: Dict[str, float]) -> Dict[str, float]:
    """One point of the learning curve: held-out head top-1 after ``train_tokens`` trained tokens."""
    heads = {k[len("val/") :]: v for k, v in metrics.items() if k.startswith("val/top1/head_")}
    return {"step": step, "train_tokens": train_tokens, **heads}


@torch.no_grad()
def evaluate_heads(
    *,
    batches: Sequence[Dict[str, torch.Tensor]],
    hidden_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor],
    project: Callable[[torch.Tensor, int], torch.Tensor],
    num_heads: int,
    ignore_index: int,
    topk: int = 10,
    num_chunks: int = 8,
    device: torch.device,
    world_size: int = 1,
    token_map: Optional[torch.Tensor] = None,
    head_type: str = "medusa",
    base_results: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> Dict[str, Any]:
    """Teacher-forced per-head metrics on held-out batches.

    Args:
        batches: collated batches with ``tokens`` and (unshifted) ``labels`` (plus ``mask``/``input_pos`` when
            packed). Every rank must pass the same number of batches (the forwards are collective under FSDP).
        hidden_fn: ``batch -> [b, s, d]`` normed hidden state.
        project: ``(hidden, head) -> logits`` (``model.project``).
        num_heads (int): Medusa heads K.
        ignore_index (int): label to ignore.
        topk (int): width of the agreement table and the largest top-k accuracy. Default 10.
        num_chunks (int): sequence chunks per projection (memory). Default 8.
        device (torch.device): device of the sums.
        world_size (int): ranks to all-reduce over.
        token_map (Optional[torch.Tensor]): the heads' token map (their logits are over it), or None. Targets
            outside it count as misses, and are left out of the heads' loss.
        head_type (str): ``"hydra"``: head k at t reads the input tokens ``t+1..t+k`` (teacher forcing, what tree
            decoding feeds it along an accepted path), passed as ``project(hidden, head, prev_tokens)``.
        base_results (Optional[List]): with a frozen backbone, the same list at every call (e.g.
            :attr:`HeldOutHiddenStates.base_results`): the first call fills it with each batch's base-head results
            (greedy picks and metric sums), later calls reuse them instead of projecting onto the vocabulary again.
            None: the base head is evaluated at every call.

    Returns:
        Dict[str, Any]: ``metrics`` (flat ``val/...`` floats: ``val/loss/{base,head_k}``, ``val/top1/...``,
        ``val/top{topk}/...``, ``val/agree1/head_k``) and ``agreement`` (the ``[K, topk]`` table as lists).
    """
    k1 = num_heads + 1
    loss_sums = torch.zeros(k1, dtype=torch.float64, device=device)
    top1 = torch.zeros(k1, dtype=torch.float64, device=device)
    topk_hits = torch.zeros(k1, dtype=torch.float64, device=device)
    counts = torch.zeros(k1, dtype=torch.float64, device=device)
    agree = torch.zeros(num_heads, topk, dtype=torch.float64, device=device)
    agree_counts = torch.zeros(num_heads, dtype=torch.float64, device=device)
    index_of = None
    if token_map is not None:
        token_map = token_map.to(device)
        index_of = token_map_index(token_map)
    if base_results is not None and len(base_results) not in (0, len(batches)):
        raise ValueError(f"base_results holds {len(base_results)} batches' results, not {len(batches)}: pass []")
    for i, batch in enumerate(batches):
        labels = batch["labels"]
        # shift for the base head, as in training: labels[:, t] is the target of position t
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
        hidden = hidden_fn(batch)
        seq_len = hidden.size(1)
        chunk = max(1, -(-seq_len // num_chunks))
        if base_results is not None and i < len(base_results):
            base_argmax, sums = base_results[i]
        else:
            base_argmax = torch.empty_like(labels)
            sums = torch.zeros(4, 1, dtype=torch.float64, device=device)  # loss, top-1, top-k, count
            for start in range(0, seq_len, chunk):
                end = min(seq_len, start + chunk)
                logits = project(hidden[:, start:end], 0).float()
                base_argmax[:, start:end] = logits.argmax(-1)
                _accumulate(logits, labels[:, start:end], ignore_index, topk, 0, *sums)
            if base_results is not None:
                base_results.append((base_argmax, sums))
        for total, batch_sum in zip((loss_sums, top1, topk_hits, counts), sums):
            total[0] += batch_sum[0]
        for head in range(1, k1):
            for start in range(0, seq_len - head, chunk):
                end = min(seq_len - head, start + chunk)
                if head_type == "hydra":
                    prev = following_tokens(batch["tokens"], start, end, head)
                    logits = project(hidden[:, start:end], head, prev).float()
                else:
                    logits = project(hidden[:, start:end], head).float()
                tgt = labels[:, start + head : end + head]
                _accumulate(logits, tgt, ignore_index, topk, head, loss_sums, top1, topk_hits, counts, index_of)
                # agreement with the base model's greedy pick k positions later (what decoding accepts)
                valid = tgt != ignore_index
                ranks = logits.topk(min(topk, logits.size(-1)), dim=-1).indices
                if token_map is not None:
                    ranks = token_map[ranks]
                hit = (ranks == base_argmax[:, start + head : end + head].unsqueeze(-1)) & valid.unsqueeze(-1)
                agree[head - 1, : hit.size(-1)] += hit.sum(dim=(0, 1)).double()
                agree_counts[head - 1] += valid.sum().double()
    if world_size > 1:
        for t in (loss_sums, top1, topk_hits, counts, agree, agree_counts):
            dist.all_reduce(t)
    metrics: Dict[str, float] = {}
    for h in range(k1):
        if counts[h] == 0:
            continue
        name = "base" if h == 0 else f"head_{h}"
        metrics[f"val/loss/{name}"] = float(loss_sums[h] / counts[h])
        metrics[f"val/top1/{name}"] = float(top1[h] / counts[h])
        metrics[f"val/top{topk}/{name}"] = float(topk_hits[h] / counts[h])
    table = (agree / agree_counts.clamp(min=1).unsqueeze(-1)).tolist()
    for h in range(num_heads):
        metrics[f"val/agree1/head_{h + 1}"] = table[h][0]
    return {"metrics": metrics, "agreement": table}


def _accumulate(logits, targets, ignore_index, topk, head, loss_sums, top1, topk_hits, counts, index_of=None) -> None:
    flat = logits.reshape(-1, logits.size(-1))
    tgt = targets.reshape(-1)
    valid = tgt != ignore_index
    if not valid.any():
        return
    if index_of is not None:  # targets as token-map indices; -1 (outside the map) never hits, has no loss
        tgt = to_head_vocab(tgt, index_of)
        loss_tgt = tgt.masked_fill(tgt < 0, ignore_index)
    else:
        loss_tgt = tgt
    loss_sums[head] += torch.nn.functional.cross_entropy(
        flat, loss_tgt, ignore_index=ignore_index, reduction="sum"
    ).double()
    ranks = flat.topk(min(topk, flat.size(-1)), dim=-1).indices
    hits = (ranks == tgt.unsqueeze(-1)) & valid.unsqueeze(-1)
    top1[head] += hits[:, 0].sum().double()
    topk_hits[head] += hits.any(-1).sum().double()
    counts[head] += valid.sum().double()


def prompts_from_dataset(dataset, num_prompts: int, ignore_index: int, max_prompt_len: int) -> List[List[int]]:
    """Held-out prompts: for each of the first samples, the tokens before its first trained label (the user
    turn and the assistant header of a chat sample), truncated on the left to ``max_prompt_len``. Samples
    without trained labels or without a prompt part are skipped; text samples (every label trained) give their
    first ``max_prompt_len // 2`` tokens."""
    prompts: List[List[int]] = []
    for i in range(len(dataset)):
        if len(prompts) >= num_prompts:
            break
        sample = dataset[i]
        tokens, labels = list(sample["tokens"]), list(sample["labels"])
        first = next((j for j, lab in enumerate(labels) if lab != ignore_index), None)
        if first is None:
            continue
        if first == 0:  # plain text: every token is trained
            first = min(len(tokens), max(1, max_prompt_len // 2))
        prompt = tokens[:first][-max_prompt_len:]
        if prompt:
            prompts.append(prompt)
    return prompts


@torch.no_grad()
def evaluate_decoding(
    model: nn.Module,
    prompts: List[List[int]],
    *,
    max_new_tokens: int,
    medusa_choices,
    stop_tokens: Sequence[int] = (),
    max_cache_len: Optional[int] = None,
    lookup_tokens: int = DEFAULT_LOOKUP_TOKENS,
) -> Dict[str, Any]:
    """Greedy Medusa tree decoding of ``prompts`` (one after another) with KV-cache eviction, and lookup drafts of
    ``lookup_tokens`` tokens (0: the heads alone) as ``medusa_generate`` decodes by default.

    Returns:
        Dict[str, Any]: ``val/tau``, ``val/acceptance/head_k``, ``val/decode_tokens_per_second``,
        ``val/decode_new_tokens``, ``val/decode_steps``, and ``val/lookup_steps`` / ``val/lookup_accepted`` (the
        lookup drafts that decoding verifies next to the heads' tree, see ``medusa_generate``).
    """
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        out = medusa_generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            medusa_choices=medusa_choices,
            temperature=0.0,
            acceptance="greedy",
            stop_tokens=tuple(stop_tokens),
            max_cache_len=max_cache_len,
            lookup_tokens=lookup_tokens,
        )
    finally:
        model.train(was_training)
    stats = out.stats
    metrics: Dict[str, Any] = {
        "val/tau": float(stats.mean_accepted),
        "val/decode_steps": int(stats.steps),
        "val/decode_new_tokens": int(stats.new_tokens),
        "val/decode_tokens_per_second": float(stats.tokens_per_second),
        "val/decode_wall_s": time.perf_counter() - t0,
        "val/lookup_steps": int(stats.lookup_steps),
        "val/lookup_accepted": int(stats.lookup_accepted),
    }
    for k, a in enumerate(stats.per_head_acceptance, start=1):
        metrics[f"val/acceptance/head_{k}"] = float(a)
    return metrics


def tree_of_size(agreement: Sequence[Sequence[float]], num_nodes: int) -> List[List[int]]:
    """The most valuable prefix-closed tree of ``num_nodes`` nodes for the measured agreement table
    (node value = product of the agreements along its path), as ``medusa_choices`` rank paths."""
    return [list(path) for path, _ in grow_tree(agreement, num_nodes)]


def calibrate_tree_for_speed(
    model: nn.Module,
    agreement: Sequence[Sequence[float]],
    max_nodes: int,
    *,
    dtype: torch.dtype,
    context_len: int,
    compile: bool = False,
) -> List[List[int]]:
    """The tree with the most expected tokens per second on this machine: the measured agreement table and
    the measured cost of T-token tree steps (possibly the empty tree, when plain decoding is faster).

    Steps are timed as decoding will run them: in ``dtype`` (``validation.decode_dtype``, default auto: bf16 where
    the hardware computes it natively), on CPU with the decoding thread count (every core but one), and compiled
    or eager as ``validation.decode_compile`` says (:func:`calibration_compile`). Compiled, only sizes up to 16
    tokens are timed (each costs a compile); larger ones are extrapolated.

    Args:
        model (nn.Module): an unsharded Medusa model.
        agreement (Sequence[Sequence[float]]): the ``[K, topk]`` agreement table of :func:`evaluate_heads`.
        max_nodes (int): the largest tree to consider (``validation.calibrate_tree_nodes``).
        dtype (torch.dtype): the decoding dtype (the model is copied when it has another one).
        context_len (int): the context length the steps are timed at (``validation.max_prompt_len``).
        compile (bool): time the compiled step. Default False.

    Returns:
        List[List[int]]: the tree's rank paths (``medusa_choices``).
    """
    largest = min(max_nodes + 1, 16) if compile else max_nodes + 1
    sizes = sorted({1, 2, 4, 8, 16, 32, 64, largest} & set(range(1, largest + 1)))
    device = next(model.parameters()).device
    timed = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(decode_threads("auto"))
    try:
        step_cost = measure_step_cost(
            timed, sizes, context_len=context_len, repeats=CALIBRATION_REPEATS, compile=compile
        )
    finally:
        torch.set_num_threads(threads)
    del timed
    best = calibrate_tree(agreement, step_cost, max_nodes=max_nodes)
    cost_ms = {t: round(c * 1e3, 2) for t, c in step_cost.items()}
    log.info(
        f"Tree calibrated on measured {'compiled' if compile else 'eager'} step costs: {len(best.medusa_choices)} "
        f"nodes, expected tau {best.expected_tokens_per_step:.2f}, step cost (ms) by tree tokens {cost_ms}"
    )
    return best.medusa_choices


def calibration_compile(value: Any, device: torch.device) -> bool:
    """Whether tree calibration times compiled steps (``validation.decode_compile``): ``"auto"`` compiles on GPUs,
    where eager steps are bound by kernel launches and their cost hardly grows with the tree, so eager timings
    would pick trees far too big; on CPU eager and compiled costs grow alike within run-to-run noise (SmolLM2 bf16
    on a 2-core AVX512-BF16 CPU, 4 / 8 / 16 tree tokens: compiled 1.09-1.23x / 1.25-1.34x / 1.66-1.74x a 1-token
    step, eager 1.23x / 1.27x / 1.53x), while compiling each size costs minutes there (4.5 for ``make demo``).
    ``"on"``/``"off"`` force it.

    Raises:
        ValueError: a value :func:`~torchtune_medusa.generation.decode_settings` does not accept.
    """
    if value == "auto":
        return torch.device(device).type == "cuda"
    return decode_compile(value, device)


def validate_decoding(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    val_cfg: Any,
    medusa_choices: Any,
    calibrated_tree: Optional[List[List[int]]],
    agreement: Optional[Sequence[Sequence[float]]],
    stop_tokens: Sequence[int],
    device: torch.device,
) -> Tuple[Dict[str, Any], Optional[List[List[int]]]]:
    """Rank 0's part of validation, on an unsharded model: with ``validation.tree_cost: measured`` the tree is
    calibrated on this machine's step cost (:func:`calibrate_tree_for_speed`); then the held-out prompts are
    decoded (:func:`evaluate_decoding`) with the calibrated tree (unless ``decode_with_calibrated_tree: False``)
    or ``medusa_choices``.

    Args:
        model (nn.Module): the unsharded Medusa model.
        prompts (Sequence[Sequence[int]]): held-out prompt tokens (may be empty).
        val_cfg (Any): the ``validation`` config section.
        medusa_choices (Any): the configured tree (a name or rank paths).
        calibrated_tree (Optional[List[List[int]]]): the tree calibrated so far, or None.
        agreement (Optional[Sequence[Sequence[float]]]): the agreement table of :func:`evaluate_heads`, or None.
        stop_tokens (Sequence[int]): the tokenizer's stop tokens.
        device (torch.device): the training device.

    Returns:
        Tuple[Dict[str, Any], Optional[List[List[int]]]]: the decoding metrics and the calibrated tree.
    """
    metrics: Dict[str, Any] = {}
    num_nodes = val_cfg.get("calibrate_tree_nodes", None)
    if agreement is not None and num_nodes and val_cfg.get("tree_cost", "none") == "measured":
        calibrated_tree = calibrate_tree_for_speed(
            model,
            agreement,
            int(num_nodes),
            dtype=decode_dtype(str(val_cfg.get("decode_dtype", "auto")), device),
            context_len=int(val_cfg.get("max_prompt_len", 128)),
            compile=calibration_compile(val_cfg.get("decode_compile", "auto"), device),
        )
    if prompts:
        choices = medusa_choices
        if val_cfg.get("decode_with_calibrated_tree", True) and calibrated_tree is not None:
            choices = calibrated_tree
        metrics.update(
            evaluate_decoding(
                model,
                prompts,
                max_new_tokens=int(val_cfg.get("max_new_tokens", 64)),
                medusa_choices=choices,
                stop_tokens=stop_tokens,
                lookup_tokens=val_cfg.get("lookup_tokens", DEFAULT_LOOKUP_TOKENS),
            )
        )
        metrics["val/tree_nodes"] = len(choices) if not isinstance(choices, str) else choices
    return metrics, calibrated_tree
