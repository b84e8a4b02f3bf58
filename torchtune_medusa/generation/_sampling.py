# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Token selection shared by the baseline and Medusa decoding, and the two tree acceptance rules.

Both decoders pick every token they commit with :func:`sample_next`, so that the baseline and Medusa runs of
the same model make the same choices (greedy: bit-identical; sampling: the same distribution).
"""

from typing import Optional, Tuple

import torch


def _probs(logits: torch.Tensor, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits (torch.Tensor): ``[..., v]`` next-token logits.
        temperature (float): 0 means greedy (argmax, first index on ties); > 0 samples from
            ``softmax(logits / temperature)``.
        top_k (Optional[int]): keep only the k most likely tokens before sampling (ignored when greedy).
        generator (Optional[torch.Generator]): random generator for sampling (seeded by the callers).

    Returns:
        torch.Tensor: ``[...]`` long token ids.
    """
    if temperature <= 0.0:
        if logits.device.type == "cpu":  # the CPU's fp32 argmax is ~3x its bf16 one; the cast is exact
            logits = logits.float()
        return logits.argmax(dim=-1)
    probs = _probs(logits, temperature, top_k)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def greedy_node_mask(tree_tokens: torch.Tensor, parent_choice: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Exact-match acceptance per tree node: node i is right iff its token equals the token the base model picks
    at its parent (``parent_choice[parent[i]]``; the argmax at temperature 0, one sample per node otherwise, which
    keeps sampling lossless: the committed tokens are then exactly ancestral samples).

    Args:
        tree_tokens (torch.Tensor): ``[T]`` tokens of the tree nodes.
        parent_choice (torch.Tensor): ``[T]`` the base model's pick after each node.
        parent (torch.Tensor): ``[T]`` parent node of each node.

    Returns:
        torch.Tensor: ``[T]`` bool (the root's entry is meaningless; paths start below it).
    """
    return tree_tokens == parent_choice[parent]


def typical_node_mask(
    tree_tokens: torch.Tensor,
    tree_logits: torch.Tensor,
    parent: torch.Tensor,
    *,
    temperature: float,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Typical acceptance per tree node (Medusa): node i with token c is accepted iff
    ``p(c) > min(epsilon, delta * exp(-H(p)))`` where ``p = softmax(logits[parent[i]] / T)`` and
    ``H(p) = -sum p log(p + 1e-5)``.

    Args:
        tree_tokens (torch.Tensor): ``[T]`` tokens of the tree nodes.
        tree_logits (torch.Tensor): ``[T, v]`` base logits after each node.
        parent (torch.Tensor): ``[T]`` parent node of each node.
        temperature (float): > 0.
        posterior_threshold (float): epsilon. Default 0.09.
        posterior_alpha (float): delta. Default 0.3.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``(ok [T] bool, log_p [T])``, the acceptance and ``log p(c)`` of each
        node's token under its parent's distribution (used to break ties between equally long paths).
    """
    threshold = typical_threshold(tree_logits, temperature, posterior_threshold, posterior_alpha)  # [T]
    p = torch.softmax(tree_logits.float() / temperature, dim=-1)  # [T, v]
    p_tok = p[parent, tree_tokens]  # [T]
    return p_tok > threshold[parent], torch.log(p_tok.clamp_min(1e-30))


def select_path(
    node_ok: torch.Tensor,
    retrieve_indices: torch.Tensor,
    retrieve_valid: torch.Tensor,
    node_score: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick the root-to-leaf path with the longest accepted run (padding never accepted, whatever it holds).

    Args:
        node_ok (torch.Tensor): ``[T]`` bool acceptance of each node.
        retrieve_indices (torch.Tensor): ``[P, D + 1]`` node paths (column 0 is the root).
        retrieve_valid (torch.Tensor): ``[P, D + 1]`` bool, False on padding.
        node_score (Optional[torch.Tensor]): ``[T]`` tie-break score summed over the accepted run (the largest wins);
            without it the first longest path wins.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``(best, accept_len)``, 0-dim long device tensors; ``accept_len`` counts
        speculated tokens (the root is not counted).
    """
    ok = node_ok[retrieve_indices[:, 1:]] & retrieve_valid[:, 1:]  # [P, D]
    run = ok.long().cumprod(dim=-1)
    lengths = run.sum(dim=-1)  # [P]
    if node_score is None:
        best = lengths.argmax()
    else:
        score = (node_score[retrieve_indices[:, 1:]] * run).sum(dim=-1)
        longest = lengths == lengths.max()
        best = torch.where(longest, score, torch.full_like(score, float("-inf"))).argmax()
    return best, lengths[best]


def typical_threshold(logits: torch.Tensor, temperature: float, epsilon: float, delta: float) -> torch.Tensor:
    """The typical-acceptance threshold ``min(epsilon, delta * exp(-H))`` of ``p = softmax(logits / T)``, with
    ``H = -sum p log(p + 1e-5)``.

    Args:
        logits (torch.Tensor): ``[..., v]``.
        temperature (float): > 0.
        epsilon (float): hard threshold (``posterior_threshold``).
        delta (float): entropy-scaled factor (``posterior_alpha``).

    Returns:
        torch.Tensor: ``[...]`` thresholds.
    """
    p = torch.softmax(logits.float() / temperature, dim=-1)
    entropy = -(p * torch.log(p + 1e-5)).sum(dim=-1)
    return torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
