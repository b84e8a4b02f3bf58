# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Tree calibration: pick the candidate tree that maximises expected tokens per second on *this* hardware.

Inputs are two measurements:

* **head accuracies** ``acc[k][r]`` = P(head k+1's rank-r candidate is the right token), from the training loss
  metrics or from :func:`measure_head_accuracies` (teacher-forced over held-out sequences);
* **step cost** ``cost(T)`` = seconds of one tree step with ``T`` tree tokens at a given context length, from
  :func:`measure_step_cost`.

With one right token per depth, at most one child of a node can be right, so the expected number of tokens a step
produces is ``1 + sum over nodes of prod(acc along the node's path)`` (the 1 is the bonus token), assuming the
heads are independent. :func:`calibrate_tree` grows the tree node by node in order of that value (best first,
keeping it prefix-closed), evaluates ``expected_tokens(n) / cost(n + 1)`` at every size and keeps the best size,
which may be 0 nodes (plain decoding) when the heads are poor or verification is expensive. FasterDecoding's search
only counts nodes (a fixed 63) and hard-codes its data size; here both the accuracy denominators and the hardware's
cost curve are measured.
"""

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from torchtune_medusa.generation._kv import kv_caches
from torchtune_medusa.generation._step import (
    Acceptance,
    cache_len_for,
    DecodeState,
    decoding_scope,
    start_decoding,
    step_functions,
    sync,
    tree_step,
)
from torchtune_medusa.generation._tree import build_tree_buffers, grow_tree, TREE_FORMAT
from torchtune_medusa.generation._tree import Path as RankPath
from torchtune_medusa.modules.medusa_heads import following_tokens, to_head_vocab, token_map_index

log = logging.getLogger(__name__)


@torch.inference_mode()
def measure_head_accuracies(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    topk: int = 10,
    num_heads: Optional[int] = None,
    score_from: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Teacher-forced top-k accuracy of every Medusa head over held-out token sequences.

    Head k at position t predicts the token at ``t + k + 1``; a hit at rank r means that token is head k's r-th
    most likely (strictly higher logits count, so ties favour the target). For decoding, the right token is the
    one the base model would produce, so sequences the base model generated itself (greedy continuations, the
    self-distillation data) measure exactly what acceptance needs; human-written text gives a lower bound.

    Args:
        model (nn.Module): a :class:`~torchtune_medusa.modules.MedusaTransformerDecoder` without KV caches.
        sequences (Sequence[Sequence[int]]): token sequences; each is run alone (no padding).
        topk (int): ranks to count. Default 10.
        num_heads (Optional[int]): measure only the first heads. Default all.
        score_from (Optional[Sequence[int]]): per sequence, the index of the first target token to score (the
            prompt length, so that only the generated continuation counts). Default 0: every position.

    Returns:
        torch.Tensor: ``[K, topk]`` float64, ``acc[k, r]`` = hits at rank r / positions for head k+1.
    """
    k_total = model.num_medusa_heads if num_heads is None else min(num_heads, model.num_medusa_heads)
    token_map = getattr(model, "medusa_token_map", None)  # heads over a token map: a target outside it is a miss
    index_of = token_map_index(token_map) if token_map is not None else None
    hits = torch.zeros(k_total, topk, dtype=torch.float64)
    counts = torch.zeros(k_total, dtype=torch.float64)
    prev = getattr(model, "return_hidden", False)
    device = next(model.parameters()).device
    model.set_return_hidden(True)
    if score_from is not None and len(score_from) != len(sequences):
        raise ValueError(f"score_from has {len(score_from)} entries for {len(sequences)} sequences")
    try:
        for i, seq in enumerate(sequences):
            tokens = torch.as_tensor(list(seq), device=device)[None]
            s = tokens.shape[1]
            h = model(tokens)[0]  # [s, d]
            first = max(int(score_from[i]) if score_from is not None else 0, 0)
            for k in range(1, k_total + 1):
                # head k at position t predicts target t + k + 1; score targets first..s-1
                start = max(first - k - 1, 0)
                if s <= start + k + 1:
                    continue
                # a Hydra head reads the tokens at t+1..t+k (the sequence's own: teacher forcing)
                before = following_tokens(tokens[0], start, s - k - 1, k)
                logits = model.project(h[start : s - k - 1], k, before).float()  # [n, v]
                target = tokens[0, start + k + 1 :]
                head_target = target if index_of is None else to_head_vocab(target, index_of)
                rank = (logits > logits.gather(-1, head_target.clamp(min=0)[:, None])).sum(-1)  # [n]
                rank = rank[(rank < topk) & (head_target >= 0)].cpu()
                hits[k - 1] += torch.bincount(rank, minlength=topk).double()
                counts[k - 1] += target.numel()
    finally:
        model.set_return_hidden(prev)
    return hits / counts.clamp(min=1)[:, None]


# Interleaved timing rounds of every tree size for a calibration: 5 let one noisy round of a 2-core VM pick an 8-node
# tree where 4 nodes decode faster; a round of SmolLM2 sizes 1..25 costs about half a second there.
CALIBRATION_REPEATS = 15


def step_cost_tree(tree_tokens: int, num_heads: int) -> List[RankPath]:
    """A tree of ``tree_tokens`` tokens (root included) shaped like a calibrated one: grown by :func:`grow_tree`
    from accuracies that fall with depth and rank, at most ``num_heads`` deep. :func:`measure_step_cost` times
    trees of this shape."""
    if tree_tokens > 1 and num_heads < 1:
        raise ValueError(f"a {tree_tokens}-token tree needs Medusa heads; the model has none")
    acc = [[0.6**k / (r + 1) for r in range(10)] for k in range(1, num_heads + 1)]
    return [p for p, _ in grow_tree(acc, tree_tokens - 1)]


@torch.inference_mode()
def measure_step_cost(
    model: nn.Module,
    tree_sizes: Sequence[int] = (1, 4, 16, 32, 64),
    *,
    context_len: int = 256,
    repeats: int = 5,
    warmup: int = 1,
    compile: bool = False,
    proposal_vocab: Optional[torch.Tensor] = None,
    timer: Callable[[], float] = time.perf_counter,
    spread: Optional[Dict[int, float]] = None,
) -> Dict[int, float]:
    """Median seconds of one decoding step that verifies ``T`` tree tokens, for each ``T`` in ``tree_sizes``.

    What is timed is :func:`~torchtune_medusa.generation._step.tree_step`, the step ``medusa_generate`` runs
    (heads' proposal, one forward of the tree, acceptance, eviction), on a :func:`step_cost_tree` of ``T`` tokens
    over a cache holding ``context_len`` tokens; ``T == 1`` is exactly a plain decoding step. Sizes are timed in
    interleaved rounds (each round visits every size, in a rotated order), so a burst of background load hits
    them alike; when the timings of a size spread by more than 20% a warning says the machine looks busy.
    Caches are created for the measurement and removed afterwards.

    Args:
        model (nn.Module): a Medusa decoder (a plain torchtune decoder for ``T == 1`` only).
        tree_sizes (Sequence[int]): tree tokens per step to time (root included).
        context_len (int): tokens already in the cache.
        repeats (int): timed rounds; the median is returned.
        warmup (int): untimed rounds first.
        compile (bool): time the compiled step (as ``medusa_generate(compile=True)`` runs it).
        proposal_vocab (Optional[torch.Tensor]): the heads' proposal vocabulary, as ``medusa_generate`` takes it.
        timer (Callable[[], float]): clock (tests pass a fake one).
        spread (Optional[Dict[int, float]]): filled with each size's interquartile range / median.

    Returns:
        Dict[int, float]: ``{T: seconds}``.

    Raises:
        ValueError: for a context that does not fit the model, or ``T > 1`` on a model without heads.
    """
    sizes = sorted({int(t) for t in tree_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"tree_sizes must be positive token counts, got {list(tree_sizes)}")
    device = next(model.parameters()).device
    heads = getattr(model, "num_medusa_heads", 0)
    trees = {t: build_tree_buffers(step_cost_tree(t, heads), num_heads=heads or None, device=device) for t in sizes}
    cache_len = context_len + sizes[-1]
    if cache_len > model.max_seq_len:
        raise ValueError(f"context_len + max tree size = {cache_len} exceeds the model's max_seq_len")
    cache_len = cache_len_for(cache_len, int(model.max_seq_len), compile)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, model.tok_embeddings.num_embeddings, (context_len,), generator=gen).to(device)
    fns = step_functions(model, compile=compile, proposal_vocab=proposal_vocab)
    times: Dict[int, List[float]] = {t: [] for t in sizes}
    with decoding_scope(model, batch_size=1, cache_len=cache_len, pack_weights=not fns.compiled):
        caches = kv_caches(model)
        start = start_decoding(fns, ctx, cache_len, Acceptance())
        for r in range(warmup + repeats):
            for t in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
                state = DecodeState(**vars(start))
                sync(device)
                t0 = timer()
                tree_step(fns, caches, state, trees[t], Acceptance())
                sync(device)
                elapsed = timer() - t0
                if r >= warmup:
                    times[t].append(elapsed)
                for c in caches:
                    c.cache_pos.sub_(state.length - context_len)
    out = {t: statistics.median(ts) for t, ts in times.items()}
    iqr = {t: _relative_spread(ts) for t, ts in times.items()}
    if spread is not None:
        spread.update(iqr)
    noisy = {t: round(v, 2) for t, v in iqr.items() if v > 0.2}
    if noisy:
        log.warning(
            "measure_step_cost: timings vary by more than 20%% of their median (T: spread %s); the machine looks "
            "busy, so a tree calibrated on them may be off. Measure again on a quiet machine, or with more repeats.",
            noisy,
        )
    return out


def _relative_spread(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (q[2] - q[0]) / max(statistics.median(xs), 1e-12)


def _monotone(points: List[Tuple[int, float]]) -> List[Tuple[int, float]]:
    """The closest non-decreasing fit to ``points`` (sorted by T) by pooling adjacent violators: a bigger tree
    never costs less than a smaller one; noise that says otherwise is averaged out."""
    blocks: List[List[float]] = []  # [sum, count]
    for _, y in points:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    ys = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return [(x, y) for (x, _), y in zip(points, ys)]


def _cost_fn(step_cost: Union[Mapping[int, float], Callable[[int], float]]) -> Callable[[int], float]:
    """``T -> seconds``: the measured costs made non-decreasing (:func:`_monotone`), interpolated linearly and
    extrapolated past the largest measured tree with the mean slope of the whole measured range (never falling:
    a tree step never costs less than a 1-token step)."""
    if callable(step_cost):
        return step_cost
    pts = sorted((int(k), float(v)) for k, v in step_cost.items())
    if not pts:
        raise ValueError("step_cost is empty")
    if any(not y > 0 for _, y in pts):
        raise ValueError(f"step costs must be positive seconds, got {dict(pts)}")
    fitted = _monotone(pts)
    if any(abs(y - f) > 0.2 * y for (_, y), (_, f) in zip(pts, fitted)):
        log.warning(
            "step costs fall as trees grow (%s); treating them as equal where they do: measure on a quiet machine",
            {x: round(y * 1e3, 3) for x, y in pts},
        )
    (x_first, y_first), (x_last, y_last) = fitted[0], fitted[-1]
    slope = (y_last - y_first) / (x_last - x_first) if x_last > x_first else 0.0

    def cost(t: int) -> float:
        if t <= x_first:
            return y_first
        if t >= x_last:
            return y_last + slope * (t - x_last)
        i = next(i for i in range(1, len(fitted)) if fitted[i][0] >= t)
        (x0, y0), (x1, y1) = fitted[i - 1], fitted[i]
        return y0 + (y1 - y0) * (t - x0) / (x1 - x0)

    return cost


# calibrate_tree's default: a smaller tree predicted at most this much slower than the best is chosen instead.
SMALLER_TREE_TOLERANCE = 0.03


@dataclass
class CalibratedTree:
    """The chosen tree and the numbers it was chosen with.

    Attributes:
        medusa_choices (List[List[int]]): the tree (pass to ``medusa_generate``).
        expected_tokens_per_step (float): predicted tau, bonus token included.
        expected_step_cost_s (float): interpolated cost of one step of this tree.
        expected_speedup (float): predicted tokens/s relative to plain decoding (a 1-token step).
        head_accuracies (List[List[float]]): the ``[K, topk]`` table used.
        step_cost (Dict[int, float]): the measured ``{T: seconds}`` used (empty if a callable was given).
        sizes (List[Dict[str, float]]): for every grown size: ``nodes``, ``tree_tokens``, ``expected_tau``,
            ``cost_s``, ``tokens_per_s``.
        meta (Dict[str, object]): free-form (model name, context length, device...).
    """

    medusa_choices: List[List[int]]
    expected_tokens_per_step: float
    expected_step_cost_s: float
    expected_speedup: float
    head_accuracies: List[List[float]]
    step_cost: Dict[int, float] = field(default_factory=dict)
    sizes: List[Dict[str, float]] = field(default_factory=list)
    meta: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["step_cost"] = {str(k): v for k, v in self.step_cost.items()}
        d["format"] = TREE_FORMAT
        return d


def expected_tokens_per_step(medusa_choices, head_accuracies) -> float:
    """``1 + sum over nodes of prod(acc[depth][rank] along the path)`` (assumes independent heads)."""
    acc = [list(map(float, row)) for row in head_accuracies]
    total = 1.0
    for path in build_tree_buffers(medusa_choices, topk=len(acc[0]) if acc else 10, num_heads=len(acc)).choices:
        v = 1.0
        for d, r in enumerate(path):
            v *= acc[d][r]
        total += v
    return total


def calibrate_tree(
    head_accuracies: Union[torch.Tensor, Sequence[Sequence[float]]],
    step_cost: Union[Mapping[int, float], Callable[[int], float]],
    *,
    max_nodes: int = 63,
    tolerance: float = SMALLER_TREE_TOLERANCE,
    meta: Optional[Dict[str, object]] = None,
) -> CalibratedTree:
    """Grow the tree with the most expected tokens per second, or the smallest one within ``tolerance`` of it.

    The prediction favours big trees in two ways: it assumes the heads are right independently (deeper nodes are
    right less often than the product of their accuracies says, because head 2 tends to be wrong where head 1
    is), and bigger steps time noisier. So when a smaller tree is predicted within ``tolerance`` of the best,
    the smaller tree wins. ``make demo`` showed the cost of the predicted best: with the same heads, an 8-node tree
    predicted 3 % faster than a 4-node one decoded at 1.34x, the 4-node tree at 1.44-1.48x (SmolLM2, 2-core CPU).

    Args:
        head_accuracies: ``[K, topk]``, ``acc[k][r]`` = P(head k+1's rank-r candidate is right).
        step_cost: ``{T: seconds}`` measured by :func:`measure_step_cost` (interpolated piecewise-linearly), or a
            callable ``T -> seconds``.
        max_nodes (int): largest tree to consider (nodes, root excluded). Default 63.
        tolerance (float): relative shortfall in predicted tokens/s that a smaller tree may have and still be
            chosen. Default ``SMALLER_TREE_TOLERANCE`` (0.03); 0 picks the predicted best.
        meta (Optional[Dict[str, object]]): stored with the result.

    Returns:
        CalibratedTree: the chosen tree (possibly empty: plain decoding wins) and the whole size sweep.

    Raises:
        ValueError: for accuracies that are not probabilities of one right rank, or a tolerance outside [0, 1).
    """
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance}: pass a relative shortfall in [0, 1), e.g. 0.03")
    if isinstance(head_accuracies, torch.Tensor):
        head_accuracies = head_accuracies.tolist()
    acc = [[float(a) for a in row] for row in head_accuracies]
    if any(not 0.0 <= a <= 1.0 for row in acc for a in row):
        raise ValueError("head accuracies must be probabilities in [0, 1]")
    for k, row in enumerate(acc, start=1):
        if sum(row) > 1.0 + 1e-6:
            raise ValueError(
                f"head {k}'s accuracies by rank sum to {sum(row):.3f} > 1, but at most one rank can be right: pass "
                "acc[k][r] = P(rank r is the right token), as measure_head_accuracies returns"
            )
    cost = _cost_fn(step_cost)
    nodes = grow_tree(acc, max_nodes)
    base_speed = 1.0 / cost(1)
    sizes = []
    tau = 1.0
    for n in range(len(nodes) + 1):
        if n:
            tau += nodes[n - 1][1]
        c = cost(n + 1)
        sizes.append({"nodes": n, "tree_tokens": n + 1, "expected_tau": tau, "cost_s": c, "tokens_per_s": tau / c})
    top_speed = max(size["tokens_per_s"] for size in sizes)
    best_n = next(n for n, size in enumerate(sizes) if size["tokens_per_s"] >= top_speed * (1 - tolerance) - 1e-12)
    best_speed = sizes[best_n]["tokens_per_s"]
    return CalibratedTree(
        medusa_choices=[list(p) for p, _ in nodes[:best_n]],
        expected_tokens_per_step=sizes[best_n]["expected_tau"],
        expected_step_cost_s=sizes[best_n]["cost_s"],
        expected_speedup=best_speed / base_speed,
        head_accuracies=acc,
        step_cost={int(k): float(v) for k, v in step_cost.items()} if not callable(step_cost) else {},
        sizes=sizes,
        meta=dict(meta or {}),
    )
