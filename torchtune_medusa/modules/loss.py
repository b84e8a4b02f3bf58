# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Medusa losses: chunked cross-entropy over the base head and K Medusa heads, and Medusa-2 self-distillation.

Both losses take the model's normed final hidden state (``model.set_return_hidden(True)``) instead of logits and
project it to the vocabulary themselves, one sequence chunk and one head at a time, inside a recomputed region
(:func:`torch.utils.checkpoint.checkpoint`, non-reentrant). Only one chunk's logits, their fp32 copy and their
gradient are alive at any time, so the ``(K + 1) x b x s x v`` logits never exist; the price is one extra
projection per chunk and head in the backward pass.

Conventions (shared with the recipe):

- ``labels`` are already shifted for the base head, as torchtune's recipes do: ``labels[:, t]`` is the target of
  the base logits at position ``t``, padded at the end with ``ignore_index``. Head ``k`` (1-based) at position
  ``t`` is scored against ``labels[:, t + k]``, i.e. the token ``k + 1`` steps after position ``t``; positions
  with ``t + k >= s`` are ignored. Hydra heads (``model.medusa_head_type == "hydra"``) also read the tokens
  before their target, teacher-forced: head ``k`` at ``t`` reads the input tokens ``tokens[:, t + 1 : t + k + 1]``
  (what decoding feeds it along an accepted path). Without ``tokens`` it reads ``labels[:, t : t + k]`` (the same
  tokens, unless the labels were replaced, e.g. by the base model's greedy picks) and is scored only where those
  are all non-ignored.
- The returned loss is ``sum_h w_h * (sum of head h's token losses) / n`` where ``n`` is the number of
  non-ignored base labels. The recipe multiplies it by ``n`` and divides the accumulated sum by the total token
  count, so gradient accumulation over micro-batches and ranks is exact.
- Head weights: the base head gets ``base_loss_weight`` (or 0 with ``include_base_loss=False``); head ``k``
  gets ``heads_coefficient * schedule(step) * decay ** k`` (Medusa-2 / axolotl convention: the first head
  already gets ``decay ** 1``).
"""

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchtune_medusa.modules.medusa_heads import following_tokens, to_head_vocab, token_map_index

__all__ = [
    "MedusaCrossEntropyLoss",
    "MedusaLossOutput",
    "MedusaSelfDistillationLoss",
    "medusa_loss_metrics",
]

#: ``project(hidden, head) -> logits``: head 0 is the base output layer, ``1..K`` the Medusa heads. Logits are in
#: the model's dtype; ``hidden`` has shape ``[..., d]`` and the logits ``[..., v]``.
ProjectFn = Callable[[torch.Tensor, int], torch.Tensor]

_SCHEDULES = ("constant", "linear", "sine")
_HEAD_TARGETS = ("labels", "teacher_argmax", "teacher_distribution")


class MedusaLossOutput(NamedTuple):
    """What the Medusa losses return. Row ``h`` of every per-head tensor is head ``h``: 0 is the base head.

    Everything but ``loss`` is detached and made of sums and counts, so that the recipe can add it up over
    micro-batches and ranks before turning it into ratios with :meth:`metrics`.

    Attributes:
        loss: scalar fp32 loss, ``sum_h w_h * sum_of_token_losses_h / n_valid_base_tokens``.
        head_loss_sums: ``[K + 1]`` fp32, the unweighted sum of each head's token losses (cross-entropy, or KL
            for a head trained against the teacher's distribution).
        head_topk_correct: ``[K + 1, len(topk)]`` int64, how many of each head's scored positions have their
            target within the head's top-k, for every k in ``topk``.
        head_counts: ``[K + 1]`` int64, how many positions each head was scored on.
        topk: the k values of the columns of ``head_topk_correct``.
    """

    loss: torch.Tensor
    head_loss_sums: torch.Tensor
    head_topk_correct: torch.Tensor
    head_counts: torch.Tensor
    topk: Tuple[int, ...]

    @property
    def head_losses(self) -> torch.Tensor:
        """``[K + 1]`` per-token mean loss of every head (0 where a head scored no position)."""
        return self.head_loss_sums / self.head_counts.clamp(min=1)

    def metrics(self) -> Dict[str, float]:
        """Flat metrics dict of this output, see :func:`medusa_loss_metrics`."""
        return medusa_loss_metrics(self.head_loss_sums, self.head_topk_correct, self.head_counts, self.topk)


def medusa_loss_metrics(
    head_loss_sums: torch.Tensor,
    head_topk_correct: torch.Tensor,
    head_counts: torch.Tensor,
    topk: Sequence[int],
) -> Dict[str, float]:
    """Turn (possibly accumulated) per-head sums and counts into a flat dict for a metric logger.

    Keys are ``loss/base``, ``top{k}/base`` for the base head and ``loss/head_{i}``, ``top{k}/head_{i}`` for
    Medusa head ``i`` (1-based). Heads that scored no position are left out.

    Args:
        head_loss_sums (torch.Tensor): ``[K + 1]`` summed token losses.
        head_topk_correct (torch.Tensor): ``[K + 1, len(topk)]`` top-k hit counts.
        head_counts (torch.Tensor): ``[K + 1]`` scored positions.
        topk (Sequence[int]): the k of each column of ``head_topk_correct``.

    Returns:
        Dict[str, float]: the metrics.
    """
    sums, correct, counts = head_loss_sums.tolist(), head_topk_correct.tolist(), head_counts.tolist()
    out: Dict[str, float] = {}
    for h, count in enumerate(counts):
        if count <= 0:
            continue
        name = "base" if h == 0 else f"head_{h}"
        out[f"loss/{name}"] = sums[h] / count
        for j, k in enumerate(topk):
            out[f"top{k}/{name}"] = correct[h][j] / count
    return out


class _Term(NamedTuple):
    """One (chunk, head) piece of the loss: what to project and what to score it against."""

    head: int
    weight: float
    hidden: torch.Tensor  # [b, n, d] student rows (a view of the hidden state)
    targets: torch.Tensor  # [b, n] labels (CE, and the validity mask of KL terms)
    teacher_hidden: Optional[torch.Tensor]  # [b, n, d] teacher rows for KL / teacher_argmax, else None
    kl: bool  # score against the teacher's distribution instead of hard targets
    prev_tokens: Optional[torch.Tensor] = None  # [b, n, head] tokens a Hydra head reads (the tokens t+1..t+head)


class _MedusaChunkedLoss(nn.Module):
    """Shared machinery of the Medusa losses: argument checks, head weights, the chunk loop and the metrics."""

    def __init__(
        self,
        *,
        num_output_chunks: int,
        ignore_index: int,
        decay: float,
        heads_coefficient: float,
        schedule: str,
        include_base_loss: bool,
        base_loss_weight: float,
        log_base_metrics: bool,
        topk: Sequence[int],
        recompute: bool,
    ) -> None:
        super().__init__()
        if not isinstance(num_output_chunks, int) or num_output_chunks < 1:
            raise ValueError(f"num_output_chunks must be an int >= 1, got {num_output_chunks!r}")
        if not decay > 0:
            raise ValueError(f"decay (per-head weight factor, head k gets decay**k) must be > 0, got {decay!r}")
        if not heads_coefficient >= 0:
            raise ValueError(f"heads_coefficient must be >= 0, got {heads_coefficient!r}")
        if not base_loss_weight >= 0:
            raise ValueError(f"base_loss_weight must be >= 0, got {base_loss_weight!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        topk = tuple(topk)
        if not topk or any(not isinstance(k, int) or k < 1 for k in topk):
            raise ValueError(f"topk must be a non-empty list of ints >= 1, got {topk!r}")
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.decay = float(decay)
        self.heads_coefficient = float(heads_coefficient)
        self.schedule = schedule
        self.include_base_loss = include_base_loss
        self.base_loss_weight = float(base_loss_weight)
        self.log_base_metrics = log_base_metrics
        self.topk = topk
        self.recompute = bool(recompute)
        self._step: Optional[Tuple[int, int]] = None

    def set_step(self, step: int, total_steps: int) -> None:
        """Tell a scheduled heads coefficient where training is. The recipe calls this before every step.

        The coefficient is ``heads_coefficient * f(min(step / total_steps, 1))`` with ``f(x) = 1`` (constant),
        ``x`` (linear) or ``sin(pi / 2 * x)`` (sine).

        Args:
            step (int): current optimizer step, ``>= 0``.
            total_steps (int): steps over which the coefficient ramps up, ``>= 1``.

        Raises:
            ValueError: if ``step < 0`` or ``total_steps < 1``.
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        self._step = (int(step), int(total_steps))

    def current_heads_coefficient(self) -> float:
        """The heads coefficient at the step given to :meth:`set_step` (schedule applied).

        Raises:
            RuntimeError: if the schedule is not ``"constant"`` and :meth:`set_step` was never called.
        """
        if self.schedule == "constant":
            return self.heads_coefficient
        if self._step is None:
            raise RuntimeError(
                f"schedule={self.schedule!r} needs the training step: call loss.set_step(step, total_steps) first"
            )
        x = min(self._step[0] / self._step[1], 1.0)
        ramp = x if self.schedule == "linear" else math.sin(math.pi / 2 * x)
        return self.heads_coefficient * ramp

    def head_weights(self, num_heads: int) -> List[float]:
        """Weights of heads ``0..num_heads`` (0 = base) at the current step."""
        coef = self.current_heads_coefficient()
        base = self.base_loss_weight if self.include_base_loss else 0.0
        return [base] + [coef * self.decay**k for k in range(1, num_heads + 1)]

    # ------------------------------------------------------------------------------------------------------
    # The chunk loop.

    def _run(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        project: Union[ProjectFn, nn.Module],
        num_heads: Optional[int],
        make_term: Callable[[int, float, torch.Tensor, int, int], Optional[_Term]],
        teacher_project: Optional[ProjectFn] = None,
        token_map: Optional[torch.Tensor] = None,
        tokens: Optional[torch.Tensor] = None,
    ) -> MedusaLossOutput:
        model = getattr(project, "__self__", project)  # the model, when given the model or its bound `project`
        if token_map is None:
            token_map = getattr(model, "medusa_token_map", None)
        hydra = getattr(model, "medusa_head_type", "medusa") == "hydra"
        project, num_heads = _resolve_project(project, num_heads)
        head_index = _head_index(token_map, hidden.device)
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [b, s, d], got {tuple(hidden.shape)}")
        if labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match hidden shape {tuple(hidden.shape)}: "
                "expected labels [b, s] for hidden [b, s, d]"
            )
        weights = self.head_weights(num_heads)
        seq_len = hidden.size(1)
        chunk = max(1, math.ceil(seq_len / self.num_output_chunks))
        device = hidden.device
        loss = torch.zeros((), device=device, dtype=torch.float32)
        loss_sums = torch.zeros(num_heads + 1, device=device, dtype=torch.float32)
        correct = torch.zeros(num_heads + 1, len(self.topk), device=device, dtype=torch.long)
        counts = torch.zeros(num_heads + 1, device=device, dtype=torch.long)
        # One split node, so that the chunks' input grads are concatenated once rather than scattered into a
        # full-size zero tensor per chunk and head.
        for start, h_chunk in zip(range(0, seq_len, chunk), hidden.split(chunk, dim=1)):
            for head in range(num_heads + 1):
                # Head `head` at positions [start, end) is scored against labels[:, start + head : end + head].
                end = min(start + h_chunk.size(1), seq_len - head)
                if end <= start:
                    continue
                if head == 0 and not self.include_base_loss and not self.log_base_metrics:
                    continue
                term = make_term(head, weights[head], h_chunk[:, : end - start], start, end)
                if hydra and head > 0:
                    # Hydra head k at t reads the tokens at t+1..t+k (teacher forcing)
                    source, offset = (labels, 0) if tokens is None else (tokens, 1)
                    term = term._replace(prev_tokens=following_tokens(source, start, end, head, offset))
                term_loss, *stats = self._term(term, project, teacher_project, head_index if head else None)
                if term.weight != 0.0:
                    loss = loss + term.weight * term_loss
                loss_sums[head] += stats[0]
                correct[head] += stats[1]
                counts[head] += stats[2]
        if not loss.requires_grad and torch.is_grad_enabled():
            # Nothing trainable was scored (e.g. Medusa-1 while the heads coefficient ramps up from 0): keep
            # `loss.backward()` valid, as a no-op.
            loss.requires_grad_()
        n_valid = (labels != self.ignore_index).sum().clamp(min=1)
        return MedusaLossOutput(loss / n_valid, loss_sums, correct, counts, self.topk)

    def _term(
        self,
        term: _Term,
        project: ProjectFn,
        teacher_project: Optional[ProjectFn],
        head_index: Optional[Tuple[torch.Tensor, torch.Tensor]],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss_sum, detached loss_sum, top-k hits, count)`` of one term."""
        args = (term, project, teacher_project, head_index)
        # Terms without weight (the base head of Medusa-1, a heads coefficient still at 0) give metrics only.
        if term.weight == 0.0 or not torch.is_grad_enabled():
            with torch.no_grad():
                return self._term_forward(*args)
        if not self.recompute:
            return self._term_forward(*args)
        # Recomputed in backward, so only this term's logits live until its backward is done. The metrics come
        # after the loss in `_term_forward`, so the recomputation stops before them (checkpoint's early stop).
        return checkpoint(self._term_forward, *args, use_reentrant=False)

    def _term_forward(
        self,
        term: _Term,
        project: ProjectFn,
        teacher_project: Optional[ProjectFn],
        head_index: Optional[Tuple[torch.Tensor, torch.Tensor]],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """With ``head_index = (token_map, index_of)`` the head scores only the map's tokens: targets are mapped
        to map indices; a target outside the map is left out of the loss (no logit can learn it) but counted as
        a miss in the accuracy, and a teacher's distribution is restricted to the map."""
        targets = term.targets.reshape(-1)
        # Only scored rows are projected: prompts, padding and the last k positions of head k cost nothing.
        scored = targets != self.ignore_index
        prev = None
        if term.prev_tokens is not None:  # a Hydra head is scored where it has all the tokens it reads
            prev = term.prev_tokens.reshape(-1, term.prev_tokens.size(-1))
            scored = scored & (prev != self.ignore_index).all(-1)
        rows = scored.nonzero().squeeze(-1)
        targets = targets.index_select(0, rows)
        if prev is None:
            logits = project(_rows(term.hidden, rows), term.head)
        else:
            logits = project(_rows(term.hidden, rows), term.head, prev.index_select(0, rows))
        teacher_logits = None
        if term.teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = teacher_project(_rows(term.teacher_hidden, rows), 0)
        if teacher_logits is not None:  # accuracy (and teacher_argmax's target) = the teacher's greedy token
            targets = teacher_logits.argmax(-1)
        if head_index is not None:
            token_map, index_of = head_index
            targets = to_head_vocab(targets, index_of)  # -1 outside the map: never in the top-k
            if teacher_logits is not None:
                teacher_logits = teacher_logits.index_select(-1, token_map)
        if term.kl:
            loss_sum = self.kl_sum(logits, teacher_logits)
        else:
            loss_sum = self.cross_entropy_sum(logits, targets.masked_fill(targets < 0, self.ignore_index))
        with torch.no_grad():
            return (loss_sum, *self._stats(loss_sum.detach(), logits.detach(), targets))

    def _stats(
        self, loss_sum: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maxk = min(max(self.topk), logits.size(-1))
        top = logits.topk(maxk, dim=-1).indices  # [n, maxk]
        hit = top == targets.unsqueeze(-1)
        cum = hit.cumsum(-1)  # a target appears at most once in top, so cum[:, k-1] = hit within top-k
        correct = torch.stack([cum[:, min(k, maxk) - 1].sum() for k in self.topk])
        return loss_sum.float(), correct, torch.tensor(targets.numel(), device=targets.device)

    def compile_chunk_losses(self, backend: str = "inductor") -> None:
        """Compile only the per-chunk upcast + cross-entropy / KL (:meth:`cross_entropy_sum`, :meth:`kl_sum`), as
        torchtune's ``training.compile_loss`` does for ``CEWithChunkedOutputLoss``; the chunking, the projections
        and the checkpointing stay eager. ``torch.compile(loss)`` on the whole module works as well."""
        self.cross_entropy_sum = torch.compile(self.cross_entropy_sum, backend=backend)
        self.kl_sum = torch.compile(self.kl_sum, backend=backend)

    def cross_entropy_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed fp32 cross-entropy of ``logits [n, v]`` (any dtype) against ``targets [n]``."""
        return F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index, reduction="sum")

    def kl_sum(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``sum over rows of KL(softmax(teacher) || softmax(student))``, in fp32."""
        student_logp = F.log_softmax(logits.float(), dim=-1)
        teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
        return F.kl_div(student_logp, teacher_logp, reduction="sum", log_target=True)


def _head_index(token_map: Optional[torch.Tensor], device: torch.device):
    """``(token_map, index_of)`` for the terms of heads with a token map; None without one."""
    if token_map is None:
        return None
    token_map = token_map.to(device)
    return token_map, token_map_index(token_map)


def _rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``hidden [b, n, d]`` flattened to ``[b * n, d]``: ``[len(rows), d]``."""
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, rows)


def _resolve_project(project: Union[ProjectFn, nn.Module], num_heads: Optional[int]) -> Tuple[ProjectFn, int]:
    """Accept either a projection callable plus ``num_heads`` or a model with ``project``/``num_medusa_heads``."""
    if hasattr(project, "project") and hasattr(project, "num_medusa_heads"):
        num_heads = project.num_medusa_heads if num_heads is None else num_heads
        project = project.project
    if num_heads is None:
        raise ValueError("num_heads is required when project is a plain callable")
    if not isinstance(num_heads, int) or num_heads < 0:
        raise ValueError(f"num_heads must be an int >= 0, got {num_heads!r}")
    return project, num_heads


class MedusaCrossEntropyLoss(_MedusaChunkedLoss):
    """Cross-entropy over the base head and K Medusa heads, computed chunk by chunk from the hidden state.

    Head ``k`` (1-based) at position ``t`` is scored against ``labels[:, t + k]`` (``labels`` already shifted for
    the base head). Logits are produced with ``project(hidden_chunk, head)`` per sequence chunk and head, upcast to
    fp32 and scored inside a non-reentrant activation-checkpointed region, so only one chunk's logits exist at a
    time. See the module docstring for the normalisation and the weights.

    Example config::

        loss:
          _component_: torchtune_medusa.modules.loss.MedusaCrossEntropyLoss
          heads_coefficient: 0.2
          decay: 0.8
          include_base_loss: False   # Medusa-1: heads only

    Args:
        num_output_chunks (int): sequence chunks, as torchtune's ``CEWithChunkedOutputLoss``. Default 8.
        ignore_index (int): label to ignore. Default -100.
        decay (float): head ``k`` is weighted by ``decay ** k``; must be > 0. Default 0.8 (Medusa-2).
        heads_coefficient (float): overall weight of the Medusa heads, >= 0. Default 0.2, the value of the
            Medusa-2 (axolotl) and Liger-Kernel recipes; use 1.0 with ``decay=1.0`` for FasterDecoding's
            unweighted Medusa-1 sum.
        schedule (str): ramp of the heads coefficient over :meth:`set_step`'s steps: ``"constant"``,
            ``"linear"`` (``step / total``) or ``"sine"`` (``sin(pi / 2 * step / total)``). Default constant.
        include_base_loss (bool): also train the base head (Medusa-2). With False (Medusa-1) the base head only
            contributes metrics. Default True.
        base_loss_weight (float): weight of the base head's loss when included. Default 1.0.
        log_base_metrics (bool): with ``include_base_loss=False``, still compute the base head's metrics (one
            no-grad projection per chunk). Default True.
        topk (Sequence[int]): the k of the top-k accuracies to count. Default (1, 5, 10).
        recompute (bool): recompute each term's logits in backward instead of keeping them (activation
            checkpointing per chunk and head). False keeps every scored chunk's logits alive until backward, for a
            third less projection work: worth it on CPU or with small vocabularies and batches. Default True.

    Raises:
        ValueError: on ``num_output_chunks < 1``, ``decay <= 0``, negative coefficients, an unknown schedule or a
            bad ``topk``.
    """

    def __init__(
        self,
        *,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        decay: float = 0.8,
        heads_coefficient: float = 0.2,
        schedule: str = "constant",
        include_base_loss: bool = True,
        base_loss_weight: float = 1.0,
        log_base_metrics: bool = True,
        topk: Sequence[int] = (1, 5, 10),
        recompute: bool = True,
    ) -> None:
        super().__init__(
            num_output_chunks=num_output_chunks,
            ignore_index=ignore_index,
            decay=decay,
            heads_coefficient=heads_coefficient,
            schedule=schedule,
            include_base_loss=include_base_loss,
            base_loss_weight=base_loss_weight,
            log_base_metrics=log_base_metrics,
            topk=topk,
            recompute=recompute,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        project: Union[ProjectFn, nn.Module],
        num_heads: Optional[int] = None,
        token_map: Optional[torch.Tensor] = None,
        tokens: Optional[torch.Tensor] = None,
    ) -> MedusaLossOutput:
        """
        Args:
            hidden (torch.Tensor): normed final hidden state ``[b, s, d]`` (the model's ``set_return_hidden``
                output), in the model's dtype.
            labels (torch.Tensor): ``[b, s]`` labels already shifted for the base head.
            project (Union[ProjectFn, nn.Module]): ``project(hidden, head) -> logits`` (``model.project``), or the
                :class:`~torchtune_medusa.modules.MedusaTransformerDecoder` itself.
            num_heads (Optional[int]): number of Medusa heads K; taken from the model when ``project`` is one.
            token_map (Optional[torch.Tensor]): ``[N]`` token ids the Medusa heads score (their logits are
                ``[..., N]``, see :class:`~torchtune_medusa.modules.MedusaHeadList`); by default the model's, when
                ``project`` is the model or its ``project``. Targets outside the map count as misses and are left
                out of the loss.
            tokens (Optional[torch.Tensor]): ``[b, s]`` input tokens, read by Hydra heads (see the module
                docstring); ignored for Medusa heads.

        Returns:
            MedusaLossOutput: the loss and the per-head metrics.

        Raises:
            ValueError: if ``labels`` is not ``[b, s]`` for ``hidden [b, s, d]`` or ``num_heads`` is missing.
            RuntimeError: if a non-constant schedule was never given the step (:meth:`set_step`).
        """

        def make_term(head: int, weight: float, h: torch.Tensor, start: int, end: int) -> _Term:
            return _Term(head, weight, h, labels[:, start + head : end + head], None, False)

        return self._run(hidden, labels, project, num_heads, make_term, token_map=token_map, tokens=tokens)


class MedusaSelfDistillationLoss(_MedusaChunkedLoss):
    """Medusa-2 self-distillation: the base head learns ``KL(teacher || student)``, the heads learn from the
    labels or from the teacher, all chunked like :class:`MedusaCrossEntropyLoss`.

    The teacher is the same model with its LoRA adapters disabled, so there is no second model in memory: the
    recipe runs a no-grad teacher forward under ``torchtune.modules.peft.disable_adapter(model)`` to get
    ``teacher_hidden`` and passes a ``teacher_project`` that enters ``disable_adapter`` itself, e.g.::

        def teacher_project(h, head):
            with disable_adapter(model):
                return model.project(h, head)

    ``teacher_project`` is called under ``torch.no_grad()``, chunk by chunk, and again when a chunk is recomputed
    in backward; it is only ever asked for head 0. Head ``k`` at position ``t`` is scored against the teacher's
    base prediction at ``t + k``, on the positions where ``labels[:, t + k]`` is not ignored.

    Metrics: a head scored against the teacher (the base head, and every head unless ``head_target="labels"``)
    reports its KL or CE as loss and its agreement with the teacher's argmax as accuracy.

    Args:
        head_target (str): what the Medusa heads learn: ``"labels"`` (dataset labels, e.g. self-generated data as
            in Medusa-2), ``"teacher_argmax"`` (CE against the teacher's greedy token at ``t + k``) or
            ``"teacher_distribution"`` (KL to the teacher's distribution at ``t + k``). Default "labels".
        num_output_chunks, ignore_index, decay, heads_coefficient, schedule, include_base_loss, base_loss_weight,
            log_base_metrics, topk, recompute: as in :class:`MedusaCrossEntropyLoss` (``include_base_loss`` switches the
            base head's KL term). Defaults as there.

    Raises:
        ValueError: on an unknown ``head_target`` and the bad values :class:`MedusaCrossEntropyLoss` rejects.
    """

    def __init__(
        self,
        *,
        head_target: str = "labels",
        num_output_chunks: int = 8,
        ignore_index: int = -100,
        decay: float = 0.8,
        heads_coefficient: float = 0.2,
        schedule: str = "constant",
        include_base_loss: bool = True,
        base_loss_weight: float = 1.0,
        log_base_metrics: bool = True,
        topk: Sequence[int] = (1, 5, 10),
        recompute: bool = True,
    ) -> None:
        super().__init__(
            num_output_chunks=num_output_chunks,
            ignore_index=ignore_index,
            decay=decay,
            heads_coefficient=heads_coefficient,
            schedule=schedule,
            include_base_loss=include_base_loss,
            base_loss_weight=base_loss_weight,
            log_base_metrics=log_base_metrics,
            topk=topk,
            recompute=recompute,
        )
        if head_target not in _HEAD_TARGETS:
            raise ValueError(f"head_target must be one of {_HEAD_TARGETS}, got {head_target!r}")
        self.head_target = head_target

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        project: Union[ProjectFn, nn.Module],
        teacher_hidden: torch.Tensor,
        teacher_project: ProjectFn,
        num_heads: Optional[int] = None,
        token_map: Optional[torch.Tensor] = None,
        tokens: Optional[torch.Tensor] = None,
    ) -> MedusaLossOutput:
        """
        Args:
            hidden (torch.Tensor): student's normed final hidden state ``[b, s, d]``.
            labels (torch.Tensor): ``[b, s]`` labels already shifted for the base head; they give the mask of
                every term and the targets of ``head_target="labels"``.
            project (Union[ProjectFn, nn.Module]): the student's ``project`` (or the model).
            teacher_hidden (torch.Tensor): teacher's normed final hidden state ``[b, s, d]`` (no grad).
            teacher_project (ProjectFn): the teacher's projection (see the class docstring).
            num_heads (Optional[int]): number of Medusa heads K; taken from the model when ``project`` is one.
            token_map (Optional[torch.Tensor]): ``[N]`` token ids the Medusa heads score (their logits are
                ``[..., N]``, see :class:`~torchtune_medusa.modules.MedusaHeadList`); by default the model's, when
                ``project`` is the model or its ``project``. Targets outside the map count as misses and are left
                out of the loss.
            tokens (Optional[torch.Tensor]): ``[b, s]`` input tokens, read by Hydra heads (see the module
                docstring); ignored for Medusa heads.

        Returns:
            MedusaLossOutput: the loss and the per-head metrics.

        Raises:
            ValueError: on mismatched shapes of ``hidden``, ``teacher_hidden`` and ``labels``.
        """
        if teacher_hidden.shape != hidden.shape:
            raise ValueError(
                f"teacher_hidden shape {tuple(teacher_hidden.shape)} does not match hidden shape {tuple(hidden.shape)}"
            )
        teacher_hidden = teacher_hidden.detach()
        heads_use_teacher = self.head_target != "labels"
        heads_kl = self.head_target == "teacher_distribution"

        def make_term(head: int, weight: float, h: torch.Tensor, start: int, end: int) -> _Term:
            rows = slice(start + head, end + head)
            if head == 0 or heads_use_teacher:
                kl = head == 0 or heads_kl
                return _Term(head, weight, h, labels[:, rows], teacher_hidden[:, rows], kl)
            return _Term(head, weight, h, labels[:, rows], None, False)

        return self._run(hidden, labels, project, num_heads, make_term, teacher_project, token_map, tokens)
