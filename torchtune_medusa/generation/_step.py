# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""One decoding step over torchtune's KV cache, shared by everything that decodes or times decoding.

:func:`tree_step` is the whole Medusa verification step: the heads propose candidates at the last committed
position, one forward runs the tree tokens, the base model's picks decide the longest accepted path, and the
rejected branches are evicted from the cache. :func:`~torchtune_medusa.generation.medusa_generate` runs it in a
loop, :func:`~torchtune_medusa.generation.measure_step_cost` times it, and the recipe's validation decodes with it,
so what is calibrated is what runs. Plain decoding is the same step with the root-only tree; the batched baseline
:func:`~torchtune_medusa.generation.generate` shares its forward (:class:`StepFunctions`).

The forward and the heads' proposal can be compiled (``torch.compile``, static shapes: one graph per tree size and
cache size), gpt-fast style; the data-dependent parts (acceptance, eviction) stay eager and cheap.
"""

import contextlib
import types
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import MultiHeadAttention

from torchtune_medusa.generation._kv import evict_to_path, scoped_kv_cache
from torchtune_medusa.generation._packing import pack_weight, packed_linear, packed_linears, packing_enabled
from torchtune_medusa.generation._sampling import greedy_node_mask, sample_next, select_path, typical_node_mask
from torchtune_medusa.generation._tree import TreeBuffers
from torchtune_medusa.modules.transformer import MedusaTransformerDecoder

# Compiled graphs depend on the cache size; sizes are rounded up to a multiple of this when compiling, so that
# prompts of different lengths reuse one graph (the extra slots stay masked out).
COMPILED_CACHE_ALIGN = 256


def is_medusa(model: nn.Module) -> bool:
    return hasattr(model, "set_return_hidden") and hasattr(model, "project")


class StepFunctions:
    """The model's decoding forward and the heads' proposal, eager or compiled.

    A plain torchtune decoder is viewed through a zero-head :class:`MedusaTransformerDecoder` sharing its modules
    (and KV caches), so that only the positions a caller asks for are projected to the vocabulary.

    Use :func:`step_functions` to get one: it keeps compiled graphs alive across calls for the same model.

    On CPU, compiling also *freezes* the weights (inductor's ``freezing``): they become constants of the graph,
    prepacked once for oneDNN instead of reordered at every matmul, which made a bf16 step 1.2-1.7x faster on an
    AVX512-BF16 CPU. The graphs are then only valid for those weights; :func:`step_functions` recompiles when the
    weights change.

    The heads' proposal can be restricted to a *proposal vocabulary* (e.g. the most frequent tokens of the data,
    :func:`frequent_tokens`): the heads' hidden states are then projected onto those rows of the vocabulary
    projection only, which costs ``N / V`` of the full projection (a 49k-token projection is the largest single
    cost of a SmolLM2 tree step on CPU). Only which candidates are verified changes: acceptance is still decided
    by the base model over the whole vocabulary, so greedy output stays exact.

    Args:
        model (nn.Module): a :class:`MedusaTransformerDecoder` or a torchtune ``TransformerDecoder``.
        compile (bool): compile :meth:`forward` and :meth:`propose` with ``torch.compile`` (static shapes).
        proposal_vocab (Optional[torch.Tensor]): ``[N]`` token ids the heads may propose; None: all.
    """

    def __init__(self, model: nn.Module, *, compile: bool = False, proposal_vocab: Optional[torch.Tensor] = None):
        if not is_medusa(model):
            model = MedusaTransformerDecoder.from_decoder(model, nn.ModuleList())
            model.set_return_hidden(True)
        self.model = model
        self.compiled = compile
        self._plain_attention = _all_attention_plain(model)  # checked once, not at every step
        token_map = getattr(model, "medusa_token_map", None)
        if proposal_vocab is not None and token_map is not None:
            raise ValueError(
                "these heads were trained on a token map (truncated vocabulary): they propose only its "
                f"{token_map.numel()} tokens already; drop the proposal vocabulary"
            )
        if token_map is not None and all(head.projection is None for head in model.medusa_heads):
            proposal_vocab = token_map  # the shared output's rows of the map, gathered here once, not at every step
        self.proposal_vocab = proposal_vocab
        self._proposal_weights = _proposal_weights(model, proposal_vocab) if proposal_vocab is not None else None
        # Eager bf16 on CPU: the proposal rows prepacked once, like the model's layers (see _packing).
        self._packed_proposal = None
        if not compile and self._proposal_weights is not None and packing_enabled(self._proposal_weights):
            weights = self._proposal_weights
            self._packed_proposal = [pack_weight(w) for w in (weights[None] if weights.dim() == 2 else weights)]
        self.hydra = getattr(model, "medusa_head_type", "medusa") == "hydra"
        self._forward, self._propose = self._eager_forward, self._eager_propose
        self._propose_tree = self._eager_propose_tree
        if compile:
            # one graph per (tree size, cache size, batch size): more than dynamo's default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            options = {"freezing": True} if next(model.parameters()).device.type == "cpu" else None
            self._forward = torch.compile(self._eager_forward, dynamic=False, options=options)
            self._propose = torch.compile(self._eager_propose, dynamic=False, options=options)
            self._propose_tree = torch.compile(self._eager_propose_tree, dynamic=False, options=options)

    def _eager_forward(self, tokens, mask, input_pos) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(tokens, mask=mask, input_pos=input_pos)
        return hidden, self.model.project(hidden, 0)

    def _eager_propose(self, hidden: torch.Tensor, depth: int, topk: int) -> torch.Tensor:
        # [1, d] rather than [d]: inductor's weight-prepacking (freezing) passes expect a batch dimension.
        if self._proposal_weights is None:
            ranks = torch.topk(self.model.medusa_logits(hidden[None], depth), topk, dim=-1).indices.flatten()
            token_map = getattr(self.model, "medusa_token_map", None)
            return ranks if token_map is None else token_map[ranks]
        heads = self.model.medusa_heads[:depth]
        logits = torch.stack([self._proposal_logits(head.trunk(hidden[None]), d) for d, head in enumerate(heads, 1)])
        return self.proposal_vocab[torch.topk(logits, topk, dim=-1).indices.flatten()]

    def _proposal_logits(self, z: torch.Tensor, head: int) -> torch.Tensor:
        """Head ``head``'s (1-based) logits over the proposal vocabulary from its states ``z [..., d]``."""
        weights = self._proposal_weights
        shared = weights.dim() == 2
        if self._packed_proposal is not None:
            return packed_linear(z, self._packed_proposal[0 if shared else head - 1])
        return z @ (weights if shared else weights[head - 1]).transpose(-1, -2)

    def _head_top_tokens(self, head: int, z: torch.Tensor, topk: int) -> torch.Tensor:
        """Top-``topk`` token ids ``[n, topk]`` of head ``head`` (1-based) from its states ``z [n, d]``."""
        if self._proposal_weights is not None:
            return self.proposal_vocab[torch.topk(self._proposal_logits(z, head), topk, dim=-1).indices]
        medusa_head = self.model.medusa_heads[head - 1]
        projection = medusa_head.projection
        logits = projection(z) if projection is not None else self.model._shared_head_output(z)
        ranks = torch.topk(logits, topk, dim=-1).indices
        token_map = getattr(self.model, "medusa_token_map", None)
        return ranks if token_map is None else token_map[ranks]

    def _eager_propose_tree(self, hidden, root, ancestors, level_parents, parent_slot, rank, level_starts, topk):
        tokens = root.view(1)
        for d, parents in enumerate(level_parents, start=1):
            prev = tokens[ancestors[parents, :d]]  # [P, d]: the path's tokens, the root first
            z = self.model.medusa_heads[d - 1].trunk(
                hidden[None].expand(parents.numel(), -1), self.model.prev_token_embeddings(prev)
            )
            top = self._head_top_tokens(d, z, topk)  # [P, topk]
            nodes = slice(level_starts[d], level_starts[d + 1])
            tokens = torch.cat([tokens, top[parent_slot[nodes], rank[nodes]]])
        return tokens

    def mask_width(self, filled: int, cache_len: int) -> int:
        """Cache slots a step's mask must cover when ``filled`` slots hold tokens (the new ones included): eager
        steps under the decoding attention attend over those only (:func:`_gqa_attention_forward` cuts the cache to
        the mask's width); compiled steps keep the static ``cache_len``, and so does torchtune's own attention."""
        if self.compiled or not (USE_FAST_ATTENTION and self._plain_attention):
            return cache_len
        return min(filled, cache_len)

    def forward(self, tokens, mask, input_pos) -> Tuple[torch.Tensor, torch.Tensor]:
        """The new tokens of one step through the KV cache: ``(hidden [b, s, d], base logits [b, s, v])``."""
        return self._forward(tokens, mask, input_pos)

    def prefill(self, tokens, mask, input_pos, select: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A prompt through the KV cache (eager: prompt lengths vary), projected only at ``select``."""
        hidden = self.model(tokens, mask=mask, input_pos=input_pos)[:, select]
        return hidden, self.model.project(hidden, 0)

    def propose(self, hidden: torch.Tensor, depth: int, topk: int) -> torch.Tensor:
        """Top-``topk`` token ids of heads ``1..depth`` at one position, ``[depth * topk]``. hidden: ``[d]``.
        Medusa heads only: a Hydra head's candidates depend on the path (:meth:`tree_tokens`)."""
        if depth == 0:
            return hidden.new_empty(0, dtype=torch.long)
        if self.hydra:
            raise ValueError("Hydra heads propose per tree path: use StepFunctions.tree_tokens")
        return self._propose(hidden, depth, topk)

    def tree_tokens(self, hidden: torch.Tensor, root: torch.Tensor, tree: TreeBuffers, topk: int) -> torch.Tensor:
        """The ``[T]`` tokens of ``tree`` below ``root`` (0-dim) at the position whose normed hidden state is
        ``hidden [d]``: node i carries the rank-``rank[i]`` candidate of head ``depth[i]``. Medusa heads propose
        once per depth; Hydra head d proposes once per node at depth d - 1 that has children, reading that node's
        path (the root first)."""
        if tree.max_depth == 0:
            return root.view(1)
        if not self.hydra:
            cand = torch.cat([root.view(1), self._propose(hidden, tree.max_depth, topk)])
            return cand[tree.tree_indices]
        return self._propose_tree(
            hidden,
            root,
            tree.ancestors,
            tree.level_parents,
            tree.parent_slot,
            tree.rank,
            tree.level_starts,
            topk,
        )


def _proposal_weights(model: nn.Module, vocab: torch.Tensor) -> torch.Tensor:
    """The vocabulary-projection rows of ``vocab``: ``[N, d]`` when every head shares the base output layer, else
    ``[K, N, d]`` (each head's own projection, or the shared one)."""
    output = model.output
    shared = output.weight if isinstance(output, nn.Linear) else output.tied_module.weight
    if getattr(output, "bias", None) is not None or any(
        head.projection is not None and head.projection.bias is not None for head in model.medusa_heads
    ):
        raise ValueError("a proposal vocabulary needs bias-free vocabulary projections")
    if all(head.projection is None for head in model.medusa_heads):
        return shared[vocab].detach().clone()
    rows = [(shared if head.projection is None else head.projection.weight)[vocab] for head in model.medusa_heads]
    return torch.stack(rows).detach().clone()


def token_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` occurrences of every token id in ``sequences``."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        counts += torch.bincount(torch.as_tensor(list(seq), dtype=torch.long), minlength=vocab_size)[:vocab_size]
    return counts


def most_frequent(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of :func:`token_counts` (ties and never-seen ids by id), sorted.

    Raises:
        ValueError: when ``size`` is not in ``1..len(counts)``.
    """
    if not 1 <= size <= counts.numel():
        raise ValueError(f"{size} most frequent tokens: pick a size in 1..{counts.numel()} (the vocabulary)")
    order = torch.sort(-counts, stable=True).indices  # most frequent first, ties by id
    return order[:size].sort().values


def frequent_tokens(sequences: Iterable[Sequence[int]], size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``sequences`` (ties and never-seen ids by id), for
    ``proposal_vocab`` or a token map: tokens the heads of a model trained on such data can usefully propose.

    Raises:
        ValueError: when ``size`` is not in ``1..vocab_size``.
    """
    return most_frequent(token_counts(sequences, vocab_size), size)


# Per model: the weights the graphs were compiled for, and the compiled StepFunctions by proposal vocabulary.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def _weights_key(model: nn.Module):
    """Changes whenever a weight is updated in place (an optimizer step), replaced, moved or cast."""
    key = []
    for p in model.parameters():
        try:
            version = p._version
        except RuntimeError:  # an inference tensor: it cannot be updated in place outside inference mode anyway
            version = -1
        key.append((p.data_ptr(), p.dtype, p.device, version))
    return tuple(key)


def step_functions(
    model: nn.Module, *, compile: bool = False, proposal_vocab: Optional[torch.Tensor] = None
) -> StepFunctions:
    """The :class:`StepFunctions` of ``model``. Compiled ones are kept per model (and proposal vocabulary) so that
    graphs compile once, and rebuilt (recompiled) when the weights have changed since, because compiled graphs
    hold frozen weights."""
    if proposal_vocab is not None:
        proposal_vocab = proposal_vocab.to(device=next(model.parameters()).device, dtype=torch.long)
    if not compile:
        return StepFunctions(model, proposal_vocab=proposal_vocab)
    weights = _weights_key(model)
    cached = _CACHE.get(model)
    if cached is None or cached[0] != weights:
        if cached is not None:
            torch._dynamo.reset()  # drop the graphs of the old weights
        cached = _CACHE[model] = (weights, {})
    vocab_key = None if proposal_vocab is None else tuple(proposal_vocab.tolist())
    fns = cached[1].get(vocab_key)
    if fns is None:
        fns = cached[1][vocab_key] = StepFunctions(model, compile=True, proposal_vocab=proposal_vocab)
    return fns


def cache_len_for(needed: int, limit: int, compiled: bool) -> int:
    """KV-cache slots for a call that needs ``needed``: exact when eager, aligned when compiled, at most ``limit``."""
    if compiled:
        needed = -(-needed // COMPILED_CACHE_ALIGN) * COMPILED_CACHE_ALIGN
    return min(needed, limit)


# ------------------------------------------------------------------------------------------------ attention


def _gqa_attention_forward(self: MultiHeadAttention, x, y=None, *, mask=None, input_pos=None) -> torch.Tensor:
    """torchtune's self-attention over its KV cache, with two CPU fixes: grouped-query K/V are not expanded
    (copied) over the whole cache at every step (SDPA's ``enable_gqa``), and attention runs in fp32 (the CPU's
    bf16 SDPA kernel costs several times the fp32 one at decoding sizes; for fp32 models this is a no-op).

    Within :func:`decoding_scope` the cache itself is fp32 (see :func:`_attention_cache_dtype`): new keys and
    values are cast once when written, instead of the whole cache at every step. The values are the same.
    A batched bf16 scope on CPU keeps a bf16 cache instead, attended by :func:`_grouped_matmul_attention`.
    """
    y = x if y is None else y  # self-attention: torchtune passes the same tensor twice
    b, s, _ = x.shape
    q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
    k = self.k_proj(y).view(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(y).view(b, s, self.num_kv_heads, self.head_dim)
    if self.pos_embeddings is not None:
        q = self.pos_embeddings(q, input_pos=input_pos)
        k = self.pos_embeddings(k, input_pos=input_pos)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if self.q_norm is not None:
        q = self.q_norm(q)
    if self.k_norm is not None:
        k = self.k_norm(k)
    cache_dtype = self.kv_cache.k_cache.dtype
    k, v = self.kv_cache.update(k.to(cache_dtype), v.to(cache_dtype))
    if cache_dtype == torch.bfloat16 and k.device.type == "cpu":
        out = _grouped_matmul_attention(q, k, v, mask)
    else:
        if mask is not None and mask.size(-1) < k.size(2):  # the caller masks only the slots filled so far
            k, v = k[:, :, : mask.size(-1)], v[:, :, : mask.size(-1)]
        out = F.scaled_dot_product_attention(
            q.float(),
            k.float(),
            v.float(),
            attn_mask=mask[:, None] if mask is not None else None,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
    return self.output_proj(out.to(x.dtype).transpose(1, 2).reshape(b, s, -1))


def _grouped_matmul_attention(q, k, v, mask) -> torch.Tensor:
    """Attention of bf16 ``q [b, h, s, d]`` over a bf16 grouped-query cache ``k, v [b, h_kv, L, d]`` with two batched
    bf16 matmuls and an fp32 softmax: the queries of the ``h / h_kv`` heads that share a K/V head are stacked
    into one matrix, so the cache is read once per K/V head and never expanded or cast.

    At batch 32 on an AVX512-BF16 CPU this was 2.5-4x faster than fp32 SDPA over an fp32 cache (300-380 cached
    tokens); at batch 1 SDPA is faster, so only batched scopes use it. The scores are rounded to bf16 once, an
    error of the size of bf16's own rounding of every linear layer's output (bf16 models only)."""
    b, h, s, d = q.shape
    kv_heads = k.size(1)
    group = h // kv_heads
    # Both products run over the whole cache: slices of it narrower than the cache would be copied at every layer
    # (the matmuls want operands contiguous per batch); the slots past the mask's width get no weight instead.
    scores = (q.reshape(b, kv_heads, group * s, d) @ k.transpose(-1, -2)).float().mul_(d**-0.5)
    if mask is not None:  # [b, s, width]: the same mask for every head
        width = mask.size(-1)
        grouped = scores.view(b, kv_heads, group, s, -1)
        grouped[..., :width].masked_fill_(~mask[:, None, None], float("-inf"))
        grouped[..., width:] = float("-inf")
    probs = scores.softmax(-1).to(v.dtype)
    return (probs @ v).view(b, h, s, d)


def _plain_self_attention(m: nn.Module) -> bool:
    return type(m) is MultiHeadAttention and m.is_causal and m.kv_cache is not None and m.cache_enabled


# Benchmarks switch this off to time torchtune's own attention (the path before the fast one).
USE_FAST_ATTENTION = True


@contextlib.contextmanager
def fast_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's cached self-attention layers use :func:`_gqa_attention_forward`.

    Only plain causal self-attention with an enabled KV cache is switched (encoder/cross-attention and
    subclasses keep torchtune's forward); the original forwards are restored on exit.
    """
    switched = [m for m in model.modules() if _plain_self_attention(m)] if USE_FAST_ATTENTION else []
    for m in switched:
        m.forward = types.MethodType(_gqa_attention_forward, m)
    try:
        yield
    finally:
        for m in switched:
            del m.forward


# ------------------------------------------------------------------------------------------------ the scope


def sync(device: torch.device) -> None:
    """Wait for the device (timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class _ReturnHidden:
    def __init__(self, model):
        self.model = model
        self.prev = getattr(model, "return_hidden", None)

    def __enter__(self):
        if is_medusa(self.model):
            self.model.set_return_hidden(True)

    def __exit__(self, *exc):
        if is_medusa(self.model):
            self.model.set_return_hidden(bool(self.prev))


def _all_attention_plain(model: nn.Module) -> bool:
    """Whether every attention layer is plain causal self-attention (what :func:`fast_attention` switches)."""
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    return bool(attentions) and all(type(m) is MultiHeadAttention and m.is_causal for m in attentions)


# Benchmarks switch this off to time batched bf16 scopes on the fp32 cache and SDPA (the path before it).
USE_BATCHED_BF16_ATTENTION = True


def _attention_cache_dtype(model: nn.Module, batch_size: int) -> torch.dtype:
    """fp32 when every cached attention layer runs :func:`_gqa_attention_forward` (which attends in fp32): casting
    each new key/value once beats casting the whole cache at every step (at batch 32 that cast cost more than the
    model's matmuls). Batched bf16 scopes on CPU keep a bf16 cache, attended in bf16
    (:func:`_grouped_matmul_attention`). Otherwise the model's dtype, which torchtune's own attention expects."""
    if not (USE_FAST_ATTENTION and _all_attention_plain(model)):
        return _cache_dtype(model)
    param = next(model.parameters())
    if USE_BATCHED_BF16_ATTENTION and batch_size > 1 and param.dtype == torch.bfloat16 and param.device.type == "cpu":
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def decoding_scope(model: nn.Module, *, batch_size: int, cache_len: int, pack_weights: bool = True) -> Iterator[None]:
    """Fresh KV caches, ``return_hidden`` and the decoding attention (:func:`fast_attention`) for the block, and
    with ``pack_weights`` bf16 CPU linear layers on prepacked weights (:func:`packed_linears`; for eager steps:
    compiled ones freeze the weights themselves, and their graphs cannot trace the packed layers)."""
    with (
        _ReturnHidden(model),
        scoped_kv_cache(
            model, batch_size=batch_size, cache_len=cache_len, dtype=_attention_cache_dtype(model, batch_size)
        ),
        fast_attention(model),
        packed_linears(model) if pack_weights else contextlib.nullcontext(),
    ):
        yield


# ------------------------------------------------------------------------------------------------ the step


@dataclass
class Acceptance:
    """How a tree step picks and accepts tokens (see ``medusa_generate``'s docstring).

    Attributes:
        temperature (float): 0 = greedy.
        typical (bool): typical acceptance (only used when sampling).
        posterior_threshold (float): typical acceptance epsilon.
        posterior_alpha (float): typical acceptance delta.
        generator (Optional[torch.Generator]): random generator when sampling.
        topk (int): candidates per head.
    """

    temperature: float = 0.0
    typical: bool = False
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    generator: Optional[torch.Generator] = None
    topk: int = 10


@dataclass
class DecodeState:
    """Batch-1 decoding state between tree steps.

    Attributes:
        length (int): committed tokens in the KV cache (slots ``0..length-1``).
        root (torch.Tensor): 0-dim, the token the base model picked after the last committed one (not yet cached).
        hidden (torch.Tensor): ``[d]`` normed hidden state of the last committed token (the heads project it).
        cache_len (int): slots of the KV cache.
        draft_accepted (int): tokens the last step accepted from the tree's draft chain (0 when it took a path of
            the heads' candidates, which win ties).
        heads_accepted (int): the longest run of the heads' candidates the last step accepted, whichever path it
            took (what the heads alone would have given).
    """

    length: int
    root: torch.Tensor
    hidden: torch.Tensor
    cache_len: int
    draft_accepted: int = 0
    heads_accepted: int = 0


@torch.inference_mode()
def start_decoding(fns: StepFunctions, prompt: torch.Tensor, cache_len: int, acceptance: Acceptance) -> DecodeState:
    """Prefill ``prompt`` (``[n]`` token ids) into the empty batch-1 cache and pick the first root token: the
    state :func:`tree_step` starts from."""
    n = prompt.numel()
    slots = torch.arange(n, device=prompt.device)
    causal = slots[None, :, None] >= torch.arange(cache_len, device=prompt.device)[None, None, :]
    hidden, logits = fns.prefill(prompt[None], causal, slots[None], select=n - 1)
    root = sample_next(logits[0], temperature=acceptance.temperature, generator=acceptance.generator)  # 0-dim
    return DecodeState(length=n, root=root, hidden=hidden[0], cache_len=cache_len)


def tree_mask(tree: TreeBuffers, length: int, cache_len: int) -> torch.Tensor:
    """``[1, T, cache_len]``: every tree node sees the committed prefix and its own ancestors (``cache_len``: the
    slots the mask covers, at least ``length + T``)."""
    t = tree.num_nodes
    device = tree.attn_mask.device
    mask = torch.zeros(1, t, cache_len, dtype=torch.bool, device=device)
    mask[:, :, :length] = True
    mask[0, :, length : length + t] = tree.attn_mask
    return mask


@torch.inference_mode()
def warm_up_step(fns: StepFunctions, caches: Sequence[nn.Module], tree: TreeBuffers, cache_len: int) -> None:
    """One throwaway forward of ``tree``'s size at the start of the empty cache, which is then rewound: a compiled
    step gets that size's graph now, before decoding is timed, even when the size first runs mid-decoding (a
    step with a lookup draft)."""
    t = tree.num_nodes
    tokens = torch.zeros(1, t, dtype=torch.long, device=tree.depth.device)
    fns.forward(tokens, tree_mask(tree, 0, fns.mask_width(t, cache_len)), tree.depth[None])
    for cache in caches:
        cache.cache_pos.sub_(t)


@torch.inference_mode()
def tree_step(
    fns: StepFunctions,
    caches: Sequence[nn.Module],
    state: DecodeState,
    tree: TreeBuffers,
    acceptance: Acceptance,
    draft: Optional[torch.Tensor] = None,
) -> Tuple[int, List[int]]:
    """Verify one tree of candidates and commit the accepted path; ``state`` moves on in place.

    The heads' top-k at the last committed position fill the tree below ``state.root`` (Hydra heads: per path,
    :meth:`StepFunctions.tree_tokens`); the ``T`` tree tokens run
    in one forward at positions ``length + depth`` with a ``[1, T, cache_len]`` mask; the base model's picks decide
    the longest accepted path (greedy exact match, or typical acceptance); that path's K/V rows move to contiguous
    slots (:func:`~torchtune_medusa.generation._kv.evict_to_path`); the pick after its last node is the next root.
    The root-only tree makes this a plain decoding step.

    Args:
        fns (StepFunctions): the model's step functions.
        caches (Sequence[nn.Module]): every layer's KV cache, holding ``state.length`` committed tokens.
        state (DecodeState): the state before the step; updated to the state after it.
        tree (TreeBuffers): the tree, on the model's device; its ``T`` tokens must fit the cache.
        acceptance (Acceptance): token selection and acceptance rule.
        draft (Optional[torch.Tensor]): ``[tree.draft_nodes]`` token ids for the tree's draft chain (a lookup
            draft, see :func:`~torchtune_medusa.generation._tree.with_draft_chain`); needed exactly when the tree
            has one.

    Returns:
        Tuple[int, List[int]]: ``(accepted, tokens)``: how many speculated tokens were accepted, and the tokens
        the step commits (those plus the bonus token), in order. This is the step's only device-to-host sync.

    Raises:
        ValueError: a draft that does not fit the tree's chain.
    """
    length = state.length
    tree_tokens = fns.tree_tokens(state.hidden, state.root, tree, acceptance.topk)  # [T]
    if tree.draft_nodes or draft is not None:
        if draft is None or draft.numel() != tree.draft_nodes:
            got = None if draft is None else draft.numel()
            raise ValueError(f"this tree has a draft chain of {tree.draft_nodes} nodes; got a draft of {got} tokens")
        tree_tokens = torch.cat([tree_tokens, draft.to(tree_tokens.device)])
    mask = tree_mask(tree, length, fns.mask_width(length + tree.num_nodes, state.cache_len))
    hidden, logits = fns.forward(tree_tokens[None], mask, (tree.depth + length)[None])
    hidden, logits = hidden[0], logits[0]  # [T, d], [T, v]
    temperature, gen = acceptance.temperature, acceptance.generator
    if acceptance.typical and temperature > 0.0:
        ok, logp = typical_node_mask(
            tree_tokens,
            logits,
            tree.parent,
            temperature=temperature,
            posterior_threshold=acceptance.posterior_threshold,
            posterior_alpha=acceptance.posterior_alpha,
        )
        best, accepted = select_path(ok, tree.retrieve_indices, tree.retrieve_valid, logp)
        path = tree.retrieve_indices[best]  # [D+1]
        last = path[accepted]
        nxt = sample_next(logits[last], temperature=temperature, generator=gen)
    else:
        choice = sample_next(logits, temperature=temperature, generator=gen)  # [T]
        ok = greedy_node_mask(tree_tokens, choice, tree.parent)
        best, accepted = select_path(ok, tree.retrieve_indices, tree.retrieve_valid)
        path = tree.retrieve_indices[best]
        last = path[accepted]
        nxt = choice[last]
    heads_accepted = accepted
    if tree.draft_nodes:  # the draft chain is the last path: the heads' best run over the others
        heads_rows = slice(0, tree.num_leaves - 1)
        heads_accepted = select_path(ok, tree.retrieve_indices[heads_rows], tree.retrieve_valid[heads_rows])[1]
    host = torch.cat([accepted.view(1), nxt.view(1), heads_accepted.view(1), tree_tokens[path], path]).tolist()
    a, bonus, depth = host[0], host[1], path.numel()
    tokens, nodes = host[3 : 3 + depth], host[3 + depth :]
    state.heads_accepted = host[2]
    state.draft_accepted = a if a > host[2] else 0
    evict_to_path(caches, length=length, tree_size=tree.num_nodes, accepted=nodes[: a + 1])
    state.length = length + a + 1
    state.hidden = hidden[last]
    state.root = nxt
    return a, tokens[1 : 1 + a] + [bonus]
