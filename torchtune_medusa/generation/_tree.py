# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Candidate trees for Medusa decoding (``medusa_choices``) and the index buffers a tree step needs.

A tree is a list of *rank paths*: ``(0,)`` is head 1's most likely token, ``(0, 2)`` is head 2's third most likely
token placed after it, and so on. The root (tree node 0) is the base model's own next token and is not listed.
Node ``i > 0`` is the i-th path after sorting by ``(len, path)``; it sits at depth ``len(path)`` and carries
``head_{len(path)}``'s rank-``path[-1]`` candidate.
"""

import heapq
import json
import operator
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from torchtune_medusa._files import MEDUSA_CHOICES_FILE, write_json

Path = Tuple[int, ...]

# The trees published with FasterDecoding/Medusa (medusa/model/medusa_choices.py), written out as data. Each has 63
# nodes (64 tree tokens with the root), ranks < 10 and depth <= 4. They were searched for Vicuna/Zephyr heads on
# A100s; for other heads and hardware prefer a calibrated tree (torchtune_medusa.generation.calibrate_tree).
# fmt: off
MC_SIM_7B_63: List[Path] = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,), (9,),
    (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1),
    (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0),
    (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
]
VICUNA_7B_STAGE2: List[Path] = [
    (0,), (0, 0), (1,), (0, 1), (0, 0, 0), (1, 0), (2,), (0, 2), (0, 0, 1), (0, 3), (3,), (0, 1, 0), (2, 0), (4,),
    (0, 0, 2), (0, 4), (1, 1), (1, 0, 0), (0, 0, 0, 0), (5,), (0, 0, 3), (0, 5), (0, 2, 0), (3, 0), (0, 1, 1),
    (0, 6), (6,), (0, 7), (0, 0, 4), (4, 0), (1, 2), (0, 8), (7,), (0, 3, 0), (0, 0, 0, 1), (0, 0, 5), (2, 1),
    (0, 0, 6), (1, 0, 1), (0, 0, 1, 0), (2, 0, 0), (5, 0), (0, 9), (0, 1, 2), (8,), (0, 4, 0), (0, 2, 1), (1, 3),
    (0, 0, 7), (0, 0, 0, 2), (0, 0, 8), (1, 1, 0), (0, 1, 0, 0), (6, 0), (9,), (0, 1, 3), (0, 0, 0, 3), (1, 0, 2),
    (0, 5, 0), (3, 1), (0, 0, 2, 0), (7, 0), (1, 4),
]
VICUNA_13B_STAGE2: List[Path] = [
    (0,), (0, 0), (1,), (0, 0, 0), (0, 1), (1, 0), (2,), (0, 2), (0, 0, 1), (0, 1, 0), (3,), (0, 3), (2, 0),
    (0, 0, 2), (0, 0, 0, 0), (0, 4), (1, 0, 0), (1, 1), (4,), (0, 0, 3), (0, 5), (0, 2, 0), (5,), (3, 0), (0, 1, 1),
    (0, 6), (0, 0, 4), (0, 0, 0, 1), (0, 7), (0, 0, 5), (1, 2), (0, 0, 1, 0), (0, 3, 0), (1, 0, 1), (4, 0),
    (0, 0, 6), (0, 8), (2, 0, 0), (0, 9), (6,), (7,), (2, 1), (5, 0), (0, 1, 2), (0, 0, 0, 2), (8,), (0, 4, 0),
    (0, 1, 0, 0), (0, 2, 1), (0, 0, 7), (1, 1, 0), (1, 3), (0, 0, 2, 0), (9,), (0, 0, 8), (0, 5, 0), (0, 0, 0, 3),
    (0, 0, 9), (0, 1, 3), (1, 0, 2), (0, 0, 1, 1), (3, 0, 0), (1, 0, 0, 0),
]
VICUNA_33B_STAGE2: List[Path] = [
    (0,), (0, 0), (1,), (0, 1), (0, 0, 0), (1, 0), (2,), (0, 2), (0, 0, 1), (0, 3), (3,), (0, 1, 0), (2, 0), (0, 4),
    (4,), (0, 0, 2), (1, 1), (1, 0, 0), (0, 5), (5,), (0, 0, 0, 0), (0, 0, 3), (3, 0), (0, 2, 0), (0, 6), (0, 1, 1),
    (6,), (0, 0, 4), (0, 7), (7,), (1, 2), (4, 0), (8,), (0, 3, 0), (0, 0, 5), (0, 0, 0, 1), (0, 8), (2, 1), (0, 9),
    (1, 0, 1), (2, 0, 0), (0, 0, 6), (5, 0), (0, 0, 1, 0), (1, 3), (0, 1, 2), (0, 4, 0), (0, 0, 7), (0, 2, 1), (9,),
    (1, 1, 0), (0, 0, 0, 2), (6, 0), (0, 0, 8), (0, 1, 0, 0), (7, 0), (0, 1, 3), (0, 5, 0), (1, 4), (0, 0, 9),
    (3, 1), (1, 0, 2), (2, 2),
]
ZEPHYR_STAGE2: List[Path] = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (2, 0), (0, 0, 1), (0, 4),
    (5,), (0, 5), (0, 1, 0), (1, 1), (6,), (0, 0, 2), (3, 0), (0, 6), (7,), (0, 7), (0, 8), (0, 0, 3), (1, 0, 0),
    (0, 9), (0, 2, 0), (1, 2), (4, 0), (8,), (9,), (2, 1), (0, 1, 1), (0, 0, 4), (0, 0, 0, 0), (5, 0), (0, 3, 0),
    (1, 3), (0, 0, 5), (0, 0, 6), (6, 0), (2, 0, 0), (1, 0, 1), (0, 1, 2), (0, 4, 0), (1, 4), (3, 1), (2, 2),
    (0, 0, 7), (7, 0), (0, 2, 1), (0, 0, 8), (0, 1, 3), (0, 5, 0), (1, 5), (0, 0, 9), (1, 1, 0), (0, 0, 0, 1),
    (0, 0, 1, 0), (4, 1), (2, 3),
]
# fmt: on

WELL_KNOWN_TREES: Dict[str, List[Path]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    "vicuna_7b_stage2": VICUNA_7B_STAGE2,
    "vicuna_13b_stage2": VICUNA_13B_STAGE2,
    "vicuna_33b_stage2": VICUNA_33B_STAGE2,
    "zephyr_stage2": ZEPHYR_STAGE2,
}

DEFAULT_TOPK = 10

#: The tree saved next to trained heads (``epoch_N/medusa_choices.json``).
TREE_FILENAME = MEDUSA_CHOICES_FILE
#: The ``format`` entry of a saved tree.
TREE_FORMAT = "torchtune_medusa.tree/1"


def chain(depth: int) -> List[Path]:
    """The top-1 chain ``[(0,), (0, 0), ...]`` of ``depth`` nodes (what vLLM and TGI speculate)."""
    if depth < 0:
        raise ValueError(f"chain depth must be >= 0, got {depth}")
    return [(0,) * d for d in range(1, depth + 1)]


def topk_per_head_tree(topk_per_head: Sequence[int]) -> List[Path]:
    """The full tree with ``topk_per_head[d]`` children per node at depth ``d + 1`` (a Cartesian product).

    Example: ``topk_per_head_tree([3, 2])`` has 3 + 3*2 = 9 nodes. Sizes grow multiplicatively; keep the product
    small (a tree step costs time linear in its size once the hardware is saturated).
    """
    if any(k < 1 for k in topk_per_head):
        raise ValueError(f"every entry of topk_per_head must be >= 1, got {list(topk_per_head)}")
    paths: List[Path] = []
    frontier: List[Path] = [()]
    for k in topk_per_head:
        frontier = [p + (r,) for p in frontier for r in range(k)]
        paths.extend(frontier)
    return paths


def resolve_choices(medusa_choices) -> List[Path]:
    """Accept a tree name (``"mc_sim_7b_63"``, ``"chain4"``), a tree saved by ``save_tree`` (a ``.json`` file or
    a directory holding ``medusa_choices.json``), or a list of rank paths; return tuples."""
    if isinstance(medusa_choices, str):
        name = medusa_choices
        if name in WELL_KNOWN_TREES:
            return list(WELL_KNOWN_TREES[name])
        if name.startswith("chain") and name[5:].isdigit():
            return chain(int(name[5:]))
        if name.endswith(".json") or os.path.isdir(name):
            return load_tree(name)[0]
        raise ValueError(
            f"unknown tree name {name!r}; known: {sorted(WELL_KNOWN_TREES)}, 'chain<N>', or a saved tree's .json path"
        )
    paths = []
    for p in medusa_choices:
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise ValueError(f"each medusa_choices entry must be a sequence of ranks, got {p!r}")
        try:
            paths.append(tuple(operator.index(r) for r in p))  # ints (also numpy/torch ints), never floats
        except TypeError:
            raise ValueError(f"ranks must be integers, got path {p!r}") from None
    return paths


def validate_choices(medusa_choices, *, topk: int = DEFAULT_TOPK, num_heads: Optional[int] = None) -> List[Path]:
    """Check a tree and return its paths sorted by ``(len, path)``.

    Raises:
        ValueError: on an empty or non-integer path, a negative rank or a rank ``>= topk``, a duplicate, a path
            whose prefix is missing, or a path deeper than ``num_heads``.
    """
    paths: List[Path] = []
    for p in medusa_choices:
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
            raise ValueError(f"each medusa_choices entry must be a sequence of ranks, got {p!r}")
        if len(p) == 0:
            raise ValueError("empty path in medusa_choices (the root is implicit; do not list it)")
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in p):
            raise ValueError(f"ranks must be integers, got path {p!r}")
        paths.append(tuple(p))
    seen = set()
    for p in paths:
        if p in seen:
            raise ValueError(f"duplicate path {list(p)} in medusa_choices")
        seen.add(p)
    for p in paths:
        bad = [r for r in p if r < 0 or r >= topk]
        if bad:
            raise ValueError(f"path {list(p)} has rank {bad[0]} outside [0, topk={topk})")
        if num_heads is not None and len(p) > num_heads:
            raise ValueError(f"path {list(p)} has depth {len(p)} but the model has only {num_heads} Medusa heads")
        for d in range(1, len(p)):
            if p[:d] not in seen:
                raise ValueError(f"path {list(p)} needs its prefix {list(p[:d])}, which is not in medusa_choices")
    return sorted(paths, key=lambda x: (len(x), x))


@dataclass
class TreeBuffers:
    """Index buffers for one candidate tree (node 0 = root; ``T = len(choices) + 1`` tree tokens).

    Attributes:
        choices (List[Tuple[int, ...]]): the sorted rank paths; node ``i`` is ``choices[i - 1]``.
        topk (int): candidates taken per head (ranks are ``< topk``).
        max_depth (int): the deepest path (0 for a root-only tree); heads ``1..max_depth`` are used.
        attn_mask (torch.Tensor): ``[T, T]`` bool, True where node i may attend to node j (ancestors and itself).
        depth (torch.Tensor): ``[T]`` long, depth of each node; the position offset of a tree token.
        parent (torch.Tensor): ``[T]`` long, parent node (the root is its own parent).
        tree_indices (torch.Tensor): ``[T]`` long; node i takes ``candidates[tree_indices[i]]`` from the flat vector
            ``[root, head1 top-k..., head2 top-k..., ...]`` (length ``1 + max_depth * topk``).
        retrieve_indices (torch.Tensor): ``[P, max_depth + 1]`` long, one root-to-leaf path of nodes per leaf;
            padding points at the root (0) and is marked by ``retrieve_valid``.
        retrieve_valid (torch.Tensor): ``[P, max_depth + 1]`` bool, False on padding.
        ancestors (torch.Tensor): ``[T, max_depth + 1]`` long, ``ancestors[i, d]`` is the node at depth ``d`` on
            node i's path (``ancestors[i, 0] = 0``; 0 past node i's depth).
        level_parents (List[torch.Tensor]): per depth ``d = 1..max_depth``, the nodes at depth ``d - 1`` that
            have children, in node order. Hydra heads propose per parent (their candidates depend on the path).
        parent_slot (torch.Tensor): ``[T]`` long, node i's parent's index in ``level_parents[depth_i - 1]``.
        rank (torch.Tensor): ``[T]`` long, node i's rank (the last entry of its path; 0 for the root).
        level_starts (List[int]): ``max_depth + 2`` offsets: the nodes at depth ``d`` are
            ``level_starts[d]..level_starts[d + 1] - 1`` (nodes are sorted by depth).
        draft_nodes (int): nodes after the heads' ones that form a chain below the root, carrying a draft from
            elsewhere (a lookup draft, see :func:`with_draft_chain`); 0 for a heads-only tree. The proposal fields
            (``tree_indices``, ``ancestors``, ``level_parents``, ``parent_slot``, ``rank``, ``level_starts``) cover
            the heads' nodes only; the verification fields (``attn_mask``, ``depth``, ``parent``, ``retrieve_*``)
            cover all nodes.
    """

    choices: List[Path]
    topk: int
    max_depth: int
    attn_mask: torch.Tensor
    depth: torch.Tensor
    parent: torch.Tensor
    tree_indices: torch.Tensor
    retrieve_indices: torch.Tensor
    retrieve_valid: torch.Tensor
    ancestors: torch.Tensor
    level_parents: List[torch.Tensor]
    parent_slot: torch.Tensor
    rank: torch.Tensor
    level_starts: List[int]
    draft_nodes: int = 0

    @property
    def num_nodes(self) -> int:
        """Tree tokens per step, root included."""
        return len(self.choices) + 1 + self.draft_nodes

    @property
    def head_nodes(self) -> int:
        """Tree tokens the heads fill, root included (the draft chain comes after them)."""
        return len(self.choices) + 1

    @property
    def verify_depth(self) -> int:
        """The deepest node, draft chain included: a step may commit this many tokens plus the bonus one."""
        return max(self.max_depth, self.draft_nodes)

    @property
    def num_leaves(self) -> int:
        return self.retrieve_indices.shape[0]

    def to(self, device) -> "TreeBuffers":
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            return [move(x) for x in v] if isinstance(v, list) else v

        return TreeBuffers(**{k: move(v) for k, v in self.__dict__.items()})


def build_tree_buffers(
    medusa_choices,
    *,
    topk: int = DEFAULT_TOPK,
    num_heads: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> TreeBuffers:
    """Validate ``medusa_choices`` and build its :class:`TreeBuffers`.

    Args:
        medusa_choices: rank paths (lists or tuples), or a tree name (see :func:`resolve_choices`). An empty list
            gives a root-only tree (plain decoding through the tree code path).
        topk (int): candidates per head; every rank must be below it. Default 10.
        num_heads (Optional[int]): if given, the tree may not be deeper than this.
        device (Optional[torch.device]): where to put the buffers.

    Returns:
        TreeBuffers: the buffers.

    Raises:
        ValueError: see :func:`validate_choices`.
    """
    paths = validate_choices(resolve_choices(medusa_choices), topk=topk, num_heads=num_heads)
    n = len(paths) + 1
    index = {p: i + 1 for i, p in enumerate(paths)}
    max_depth = max((len(p) for p in paths), default=0)
    attn_mask = torch.eye(n, dtype=torch.bool)
    attn_mask[:, 0] = True
    depth = torch.zeros(n, dtype=torch.long)
    parent = torch.zeros(n, dtype=torch.long)
    tree_indices = torch.zeros(n, dtype=torch.long)
    for p, i in index.items():
        depth[i] = len(p)
        parent[i] = index[p[:-1]] if len(p) > 1 else 0
        tree_indices[i] = 1 + (len(p) - 1) * topk + p[-1]
        for d in range(1, len(p)):
            attn_mask[i, index[p[:d]]] = True
    prefixes = {p[:d] for p in paths for d in range(1, len(p))}
    ancestors = torch.zeros(n, max_depth + 1, dtype=torch.long)
    rank = torch.zeros(n, dtype=torch.long)
    parent_slot = torch.zeros(n, dtype=torch.long)
    level_parents = []
    for d in range(1, max_depth + 1):
        parents = [0] if d == 1 else [index[p] for p in paths if len(p) == d - 1 and p in prefixes]
        slot = {node: j for j, node in enumerate(parents)}
        for p in paths:
            if len(p) == d:
                parent_slot[index[p]] = slot[index[p[:-1]] if d > 1 else 0]
        level_parents.append(torch.tensor(parents, dtype=torch.long))
    for p, i in index.items():
        rank[i] = p[-1]
        ancestors[i, 1 : len(p) + 1] = torch.tensor([index[p[:d]] for d in range(1, len(p) + 1)])
    level_starts = [0] + [1 + sum(1 for p in paths if len(p) < d) for d in range(1, max_depth + 2)]
    leaves = [p for p in paths if p not in prefixes]
    rows, valid = [], []
    for leaf in leaves or [()]:
        nodes = [0] + [index[leaf[:d]] for d in range(1, len(leaf) + 1)]
        rows.append(nodes + [0] * (max_depth + 1 - len(nodes)))
        valid.append([True] * len(nodes) + [False] * (max_depth + 1 - len(nodes)))
    buffers = TreeBuffers(
        choices=paths,
        topk=topk,
        max_depth=max_depth,
        attn_mask=attn_mask,
        depth=depth,
        parent=parent,
        tree_indices=tree_indices,
        retrieve_indices=torch.tensor(rows, dtype=torch.long),
        retrieve_valid=torch.tensor(valid, dtype=torch.bool),
        ancestors=ancestors,
        level_parents=level_parents,
        parent_slot=parent_slot,
        rank=rank,
        level_starts=level_starts,
    )
    return buffers.to(device) if device is not None else buffers


def with_draft_chain(tree: TreeBuffers, num_tokens: int) -> TreeBuffers:
    """``tree`` with a chain of ``num_tokens`` more nodes below the root, for a draft that does not come from the
    heads (a lookup draft): chain node ``j`` (1-based) is node ``tree.head_nodes + j - 1`` at depth ``j``, and its
    root-to-leaf path is the last row of ``retrieve_indices``, so that the heads' paths win ties.

    Args:
        tree (TreeBuffers): a heads-only tree (``draft_nodes == 0``).
        num_tokens (int): chain length, ``>= 1``.

    Returns:
        TreeBuffers: the combined tree, on ``tree``'s device.

    Raises:
        ValueError: if ``num_tokens < 1`` or ``tree`` already has a chain.
    """
    if num_tokens < 1:
        raise ValueError(f"a draft chain needs at least one token, got {num_tokens}")
    if tree.draft_nodes:
        raise ValueError("this tree already has a draft chain")
    t0, device = tree.head_nodes, tree.depth.device
    t = t0 + num_tokens
    chain_nodes = torch.arange(t0, t, device=device)
    attn_mask = torch.zeros(t, t, dtype=torch.bool, device=device)
    attn_mask[:t0, :t0] = tree.attn_mask
    attn_mask[t0:, 0] = True
    attn_mask[t0:, t0:] = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril()
    depth = torch.cat([tree.depth, torch.arange(1, num_tokens + 1, device=device)])
    parent = torch.cat([tree.parent, torch.cat([chain_nodes.new_zeros(1), chain_nodes[:-1]])])
    width = max(tree.max_depth, num_tokens) + 1
    pad = width - tree.retrieve_indices.shape[1]
    chain_row = torch.cat([chain_nodes.new_zeros(1), chain_nodes, chain_nodes.new_zeros(width - 1 - num_tokens)])
    chain_valid = torch.arange(width, device=device) <= num_tokens
    retrieve_indices = torch.cat([torch.nn.functional.pad(tree.retrieve_indices, (0, pad)), chain_row[None]])
    retrieve_valid = torch.cat([torch.nn.functional.pad(tree.retrieve_valid, (0, pad)), chain_valid[None]])
    fields = dict(tree.__dict__)
    fields.update(
        attn_mask=attn_mask,
        depth=depth,
        parent=parent,
        retrieve_indices=retrieve_indices,
        retrieve_valid=retrieve_valid,
        draft_nodes=num_tokens,
    )
    return TreeBuffers(**fields)


def tree_stats(medusa_choices) -> Dict[str, object]:
    """Nodes per depth, leaves and size of a tree (for reports)."""
    paths = validate_choices(resolve_choices(medusa_choices), topk=1 << 30)
    prefixes = {p[:d] for p in paths for d in range(1, len(p))}
    per_depth: Dict[int, int] = {}
    for p in paths:
        per_depth[len(p)] = per_depth.get(len(p), 0) + 1
    return {
        "nodes": len(paths),
        "tree_tokens": len(paths) + 1,
        "leaves": sum(p not in prefixes for p in paths),
        "nodes_per_depth": [per_depth[d] for d in sorted(per_depth)],
    }


def grow_tree(accuracies: Sequence[Sequence[float]], num_nodes: int) -> List[Tuple[Path, float]]:
    """Greedily grow a prefix-closed tree by node value (the product of accuracies along its path).

    Args:
        accuracies: ``[K, topk]``; ``accuracies[k][r]`` = P(head k+1's rank-r candidate is the right token).
        num_nodes (int): nodes to add.

    Returns:
        List[Tuple[Path, float]]: the nodes in the order they were added with their values; every prefix of the
        list is itself a valid tree, and the best-first order makes each prefix the most valuable tree of its size
        among prefix-closed trees (node values never exceed their parent's).
    """
    num_heads = len(accuracies)
    heap: List[Tuple[float, Path]] = []
    if num_heads:
        for r, a in enumerate(accuracies[0]):
            heapq.heappush(heap, (-float(a), (r,)))
    out: List[Tuple[Path, float]] = []
    while heap and len(out) < num_nodes:
        neg, path = heapq.heappop(heap)
        out.append((path, -neg))
        if len(path) < num_heads:
            for r, a in enumerate(accuracies[len(path)]):
                heapq.heappush(heap, (neg * float(a), path + (r,)))
    return out


def save_tree(path: Union[str, os.PathLike], tree: Union[Any, Sequence[Sequence[int]]], **meta) -> pathlib.Path:
    """Write a tree as JSON. A directory means ``<dir>/medusa_choices.json`` (next to the heads' checkpoint).

    Args:
        path (Union[str, os.PathLike]): the file, or the directory to write ``medusa_choices.json`` into.
        tree (Union[CalibratedTree, Sequence[Sequence[int]]]): rank paths, or a
            :class:`~torchtune_medusa.generation.CalibratedTree` (anything with ``to_dict()``), whose whole record
            (accuracies, step costs, size sweep) is kept.
        **meta: free-form entries stored under ``meta``.

    Returns:
        pathlib.Path: the file written.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / TREE_FILENAME
    if hasattr(tree, "to_dict"):
        data = tree.to_dict()
        data["meta"].update(meta)
    else:
        data = {"format": TREE_FORMAT, "medusa_choices": [list(map(int, p)) for p in tree], "meta": meta}
    return write_json(path, data, indent=1)


def load_tree(path: Union[str, os.PathLike]) -> Tuple[List[Path], Dict[str, Any]]:
    """Read a tree written by :func:`save_tree` (a file or a directory holding ``medusa_choices.json``).

    Args:
        path (Union[str, os.PathLike]): the file, or the directory holding ``medusa_choices.json``.

    Returns:
        Tuple[List[Tuple[int, ...]], Dict[str, Any]]: the validated, sorted rank paths and the whole JSON record.

    Raises:
        FileNotFoundError: no such tree file.
        ValueError: a file that is not JSON, has no ``medusa_choices`` entry, or holds an invalid tree (the message
            names the file).
    """
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        path = path / TREE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no such tree file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the tree file {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or "medusa_choices" not in data:
        raise ValueError(f"the tree file {path} has no 'medusa_choices' entry")
    try:
        tree = build_tree_buffers(data["medusa_choices"], topk=1 << 30).choices
    except (TypeError, ValueError) as e:
        raise ValueError(f"the tree file {path} holds an invalid tree: {e}") from None
    return tree, data
