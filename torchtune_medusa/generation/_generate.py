# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Autoregressive baseline :func:`generate` and tree-attention :func:`medusa_generate` over torchtune's KV cache.

Both functions allocate their own KV caches, sized to what the call needs (prompt + ``max_new_tokens`` + tree
tokens, capped by ``max_cache_len`` and the model's ``max_seq_len``; never the model's 8k/128k default), and delete
them when they return. Caches the caller had already set up on the model are set aside for the call and restored
afterwards, untouched. They also restore the model's ``return_hidden`` flag. Both pick tokens with the same
:func:`~torchtune_medusa.generation._sampling.sample_next`, and both compute the vocabulary projection only
where it is needed (the last position of a prefill, the tree tokens of a step, the heads at one position).
"""

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from torchtune_medusa.generation._kv import drop_finished_rows, kv_caches
from torchtune_medusa.generation._lookup import (
    check_lookup_tokens,
    check_ngram,
    DEFAULT_LOOKUP_NGRAM,
    DEFAULT_LOOKUP_TOKENS,
    PromptLookup,
)
from torchtune_medusa.generation._sampling import sample_next
from torchtune_medusa.generation._step import (
    Acceptance,
    cache_len_for,
    decoding_scope,
    is_medusa,
    start_decoding,
    step_functions,
    tree_step,
    warm_up_step,
)
from torchtune_medusa.generation._step import (
    sync as _sync,
)
from torchtune_medusa.generation._tree import build_tree_buffers, MC_SIM_7B_63, with_draft_chain

log = logging.getLogger(__name__)

DEFAULT_MEDUSA_CHOICES = MC_SIM_7B_63
# Eager batched decoding drops finished rows from the batch (and its KV cache) once 1 / COMPACT_WHEN_DONE of the
# rows still in it have finished: their steps would be wasted, and dropping them costs one copy of the cache.
COMPACT_WHEN_DONE = 8


@dataclass
class GenerationStats:
    """Statistics of one :func:`generate` / :func:`medusa_generate` call (summed over its prompts).

    Attributes:
        steps (int): decoding forwards after the prefill(s) (one per token for the baseline, one per tree step).
        new_tokens (int): tokens returned, all prompts together.
        accepted_per_step (List[int]): tokens each step produced (accepted speculated tokens + the bonus token),
            before truncation at a stop token or ``max_new_tokens``. The prefill's first token is not a step.
        mean_accepted (float): tau, the mean of ``accepted_per_step`` (1.0 for the baseline).
        per_head_acceptance (List[float]): fraction of tree steps in which head k's token was accepted (k = 1..depth
            of the tree); empty for the baseline.
        time_to_first_token_s (float): prefill + first token, averaged over prompts decoded one after another.
        total_time_s (float): wall-clock time of decoding (prefill to last token, cache set-up excluded).
        tokens_per_second (float): ``new_tokens / total_time_s``.
        stop_reasons (List[str]): per prompt: ``"stop_token"``, ``"max_new_tokens"`` or ``"cache_full"``.
        tree_size (int): tree tokens per step of the heads' tree (1 for the baseline); a step that also verifies a
            lookup draft runs that many more.
        lookup_steps (int): tree steps that verified a lookup draft (``medusa_generate(lookup_tokens=...)``).
        lookup_accepted (int): speculated tokens accepted from lookup drafts, in the steps where a draft was
            accepted further than the heads' best path (ties go to the heads). ``per_head_acceptance`` counts the
            heads' best run in every tree step, whichever path won.
    """

    steps: int = 0
    new_tokens: int = 0
    accepted_per_step: List[int] = field(default_factory=list)
    mean_accepted: float = 0.0
    per_head_acceptance: List[float] = field(default_factory=list)
    time_to_first_token_s: float = 0.0
    total_time_s: float = 0.0
    tokens_per_second: float = 0.0
    stop_reasons: List[str] = field(default_factory=list)
    tree_size: int = 1
    lookup_steps: int = 0
    lookup_accepted: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationOutput:
    """Tokens and statistics of a generation call.

    Attributes:
        tokens (List[List[int]]): new tokens per prompt; the prompt is excluded, a stop token is included when hit
            and nothing follows it.
        stats (GenerationStats): see :class:`GenerationStats`.
        hidden (Optional[List[torch.Tensor]]): with ``generate(..., return_hidden=True)``, per prompt the normed
            final hidden state that produced each new token, ``[len(tokens[i]), d]`` on CPU: row 0 is the prompt's
            last position, row j the position of new token j - 1 (inference-mode tensors: clone them outside
            ``torch.inference_mode`` to use them with autograd). None otherwise.
    """

    tokens: List[List[int]]
    stats: GenerationStats
    hidden: Optional[List[torch.Tensor]] = None


def _generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> List[List[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return prompts


def _cache_budget(
    model: nn.Module, needed: int, longest_prompt: int, max_cache_len: Optional[int], compiled: bool = False
) -> int:
    limit = int(model.max_seq_len)
    if max_cache_len is not None:
        limit = min(limit, int(max_cache_len))
    if longest_prompt > limit:
        which = "max_cache_len" if max_cache_len is not None and max_cache_len < model.max_seq_len else "max_seq_len"
        raise ValueError(
            f"the prompt has {longest_prompt} tokens but the KV cache can hold only {limit} "
            f"(the model's {which}); shorten the prompt or raise the limit"
        )
    return cache_len_for(needed, limit, compiled)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: List[List[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    stop_tokens: Sequence[int] = (),
    seed: Optional[int] = None,
    max_cache_len: Optional[int] = None,
    compile: bool = False,
    return_hidden: bool = False,
) -> GenerationOutput:
    """Plain autoregressive decoding with torchtune's KV cache, batched over prompts of different lengths.

    Prompts are left-padded; every row gets its own positions (0 at its first real token) and a mask that hides
    the padding, so each row decodes exactly as it would alone. Medusa models are run with ``return_hidden`` and
    only the base output layer is projected (at the last position); plain torchtune ``TransformerDecoder`` s work
    too.

    Args:
        model (nn.Module): a :class:`~torchtune_medusa.modules.MedusaTransformerDecoder` or a torchtune
            ``TransformerDecoder``, in eval mode.
        prompts (List[List[int]]): token ids, one list per prompt.
        max_new_tokens (int): at most this many new tokens per prompt.
        temperature (float): 0 = greedy; > 0 samples.
        top_k (Optional[int]): top-k filtering when sampling.
        stop_tokens (Sequence[int]): a row ends after emitting one of these (it is included in the output).
        seed (Optional[int]): seed for sampling.
        max_cache_len (Optional[int]): cap on KV-cache slots. When a row would need more, decoding stops early
            with ``stop_reason == "cache_full"`` and a warning.
        compile (bool): run the decoding forward through ``torch.compile`` (the same compiled forward
            :func:`medusa_generate` uses; the first call per batch size compiles). Default False.
        return_hidden (bool): also return the hidden state behind every new token (``GenerationOutput.hidden``):
            what Medusa heads see at those positions, kept as the decoding computed it (self-distillation saves it
            so that head training needs no second pass over the data). Default False.

    Returns:
        GenerationOutput: tokens, :class:`GenerationStats` and, with ``return_hidden``, hidden states.

    Raises:
        ValueError: on empty prompts, a negative ``max_new_tokens``, or a prompt that does not fit the cache.
    """
    prompts = _check_prompts(prompts, max_new_tokens)
    device = next(model.parameters()).device
    b = len(prompts)
    lens = [len(p) for p in prompts]
    p_max = max(lens)
    stop = set(int(t) for t in stop_tokens)
    stats = GenerationStats(tree_size=1)
    if max_new_tokens == 0:
        stats.stop_reasons = ["max_new_tokens"] * b
        return GenerationOutput([[] for _ in prompts], stats)
    cache_len = _cache_budget(model, p_max + max_new_tokens, p_max, max_cache_len, compile)
    gen = _generator(seed, device)
    fns = step_functions(model, compile=compile)

    pads = torch.tensor([p_max - n for n in lens], device=device)
    tokens = torch.zeros(b, p_max, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, p_max - len(p) :] = torch.tensor(p, device=device)
    slots = torch.arange(cache_len, device=device)
    valid = (slots[None, :] >= pads[:, None]) & (slots[None, :] < p_max)  # [b, S] slots holding real tokens
    causal = slots[None, :p_max, None] >= slots[None, None, :]  # [1, p_max, S]
    is_pad_query = slots[None, :p_max] < pads[:, None]  # [b, p_max]
    eye = slots[None, :p_max, None] == slots[None, None, :]
    # Padding queries attend only to themselves (never to nothing: an all-masked row makes NaNs in later layers).
    mask = (causal & valid[:, None, :]) | (is_pad_query[:, :, None] & eye)
    input_pos = (slots[None, :p_max] - pads[:, None]).clamp(min=0)
    next_pos = torch.tensor(lens, device=device)

    out: List[List[int]] = [[] for _ in prompts]
    reasons: List[Optional[str]] = [None] * b
    live = list(range(b))  # the prompts still in the batch, in batch order
    hidden_out = None
    with decoding_scope(model, batch_size=b, cache_len=cache_len, pack_weights=not fns.compiled):
        caches = kv_caches(model)
        _sync(device)
        t0 = time.perf_counter()
        hidden, logits = fns.prefill(tokens, mask, input_pos, select=torch.tensor([p_max - 1], device=device))
        nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, generator=gen)
        if return_hidden:  # row i, column j: the state behind new token j of prompt i
            hidden_out = hidden.new_empty(b, max_new_tokens, hidden.shape[-1])
            hidden_out[:, 0] = hidden[:, -1]
        slot = p_max
        first = True
        while True:
            host = nxt.tolist()
            if first:
                stats.time_to_first_token_s = time.perf_counter() - t0
                first = False
            for i, t in zip(live, host):
                if reasons[i] is None:
                    out[i].append(t)
                    if t in stop:
                        reasons[i] = "stop_token"
                    elif len(out[i]) >= max_new_tokens:
                        reasons[i] = "max_new_tokens"
            if all(r is not None for r in reasons):
                break
            if slot >= cache_len:
                log.warning(
                    "generate: stopping early, the KV cache is full (%d slots: max_cache_len=%s, model max_seq_len=%d)",
                    cache_len,
                    max_cache_len,
                    model.max_seq_len,
                )
                reasons = [r or "cache_full" for r in reasons]
                break
            finished = sum(reasons[i] is not None for i in live)
            if not fns.compiled and finished * COMPACT_WHEN_DONE >= len(live):
                keep = torch.tensor([j for j, i in enumerate(live) if reasons[i] is None], device=device)
                live = [i for i in live if reasons[i] is None]
                valid, next_pos, nxt = valid[keep], next_pos[keep], nxt[keep]
                drop_finished_rows(caches, keep)
            valid[:, slot] = True
            width = fns.mask_width(slot + 1, cache_len)
            hidden, logits = fns.forward(nxt[:, None], valid[:, None, :width].clone(), next_pos[:, None])
            nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, generator=gen)
            if hidden_out is not None:
                hidden_out[live, slot - p_max + 1] = hidden[:, -1]
            next_pos += 1
            slot += 1
            stats.steps += 1
        _sync(device)
        stats.total_time_s = time.perf_counter() - t0
    stats.accepted_per_step = [1] * stats.steps
    stats.mean_accepted = 1.0 if stats.steps else 0.0
    stats.new_tokens = sum(len(o) for o in out)
    stats.tokens_per_second = stats.new_tokens / max(stats.total_time_s, 1e-9)
    stats.stop_reasons = [r or "max_new_tokens" for r in reasons]
    if hidden_out is not None:
        hidden_out = hidden_out.cpu()
        hidden_out = [hidden_out[i, : len(o)].clone() for i, o in enumerate(out)]
    return GenerationOutput(out, stats, hidden_out)


@torch.inference_mode()
def medusa_generate(
    model: nn.Module,
    prompts: List[List[int]],
    *,
    max_new_tokens: int,
    medusa_choices=None,
    temperature: float = 0.0,
    acceptance: str = "greedy",
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    stop_tokens: Sequence[int] = (),
    seed: Optional[int] = None,
    max_cache_len: Optional[int] = None,
    topk: int = 10,
    compile: bool = False,
    proposal_vocab: Optional[torch.Tensor] = None,
    lookup_tokens: int = DEFAULT_LOOKUP_TOKENS,
    lookup_ngram: Sequence[int] = DEFAULT_LOOKUP_NGRAM,
    on_step=None,
) -> GenerationOutput:
    """Medusa decoding: each step verifies a tree of candidates (the base model's next token plus the heads'
    top-k tokens) in one forward through torchtune's KV cache, accepts the longest right path, and evicts the
    rejected branches from the cache.

    One step (:func:`~torchtune_medusa.generation._step.tree_step`): the root is the token the base model picked
    after the last committed token; heads ``1..D`` give
    their top-``topk`` at that position; ``tree_indices`` lay them out as the tree; all ``T`` tree tokens run in one
    forward at positions ``length + depth`` with a ``[1, T, cache_len]`` mask (the committed prefix plus each
    node's ancestors); the base logits of all tree tokens decide acceptance; the accepted path's K/V rows are
    gathered to contiguous slots in every layer and ``cache_pos`` is rolled back
    (:func:`~torchtune_medusa.generation._kv.evict_to_path`); the pick after the last accepted node is the next
    root (the bonus token). Heads are projected at that one position only.

    Lookup drafts (``lookup_tokens > 0``): when the text so far (prompt and output) ends with tokens that occurred
    before, the ``lookup_tokens`` tokens that followed them then join the step as one more chain below the root
    (:class:`~torchtune_medusa.generation._lookup.PromptLookup`, prompt lookup decoding). Replies that quote their
    prompt or repeat themselves then accept several tokens a step at the cost of a few more tree tokens; steps
    without a match run the heads' tree alone. Acceptance decides as for the heads' candidates, so the output does
    not change.

    Acceptance:
        * ``"greedy"``: exact match against the base model's pick. At temperature 0 the output is exactly greedy
          decoding. At temperature > 0 the base model draws one sample per tree node and a node is accepted iff
          its token equals its parent's sample, so the output is distributed exactly as ancestral sampling.
        * ``"typical"`` (lossy, Medusa's default): accept token ``c`` iff ``p(c) > min(posterior_threshold,
          posterior_alpha * exp(-H(p)))`` with ``p = softmax(logits / temperature)``; ties between equally long
          paths go to the largest sum of ``log p``; the bonus token is sampled from ``p``. At temperature 0 it is
          the same as ``"greedy"``.

    Prompts are decoded one after another, each with a batch-1 cache (torchtune's ``KVCache`` keeps one
    ``cache_pos`` for the whole batch, so rows that accept different lengths cannot share one cache); the stats
    sum over prompts.

    When the cache (``max_cache_len``) or the model's ``max_seq_len`` has no room for a full tree, steps fall back
    to the root alone (plain decoding), and when not even one more token fits, decoding stops with
    ``stop_reason == "cache_full"`` and a warning; the cache is never written past its end.

    Example:
        >>> from torchtune.data import Message
        >>> from torchtune_medusa import load_medusa
        >>> from torchtune_medusa.generation import generate, medusa_generate
        >>> run = load_medusa("output/smollm2_135m_medusa")  # a medusa_finetune output_dir: its latest epoch_N
        >>> prompt = run.tokenizer.prompt_tokens([Message("user", "What is the capital of France?")])
        >>> out = medusa_generate(run.model, [prompt], medusa_choices=run.medusa_choices, max_new_tokens=64)
        >>> print(run.tokenizer.decode(out.tokens[0]), out.stats.mean_accepted)
        >>> assert out.tokens == generate(run.model, [prompt], max_new_tokens=64).tokens  # greedy: lossless

    Args:
        model (nn.Module): a :class:`~torchtune_medusa.modules.MedusaTransformerDecoder` in eval mode.
        prompts (List[List[int]]): token ids, one list per prompt.
        max_new_tokens (int): at most this many new tokens per prompt.
        medusa_choices: the tree, as rank paths or a name (``"mc_sim_7b_63"``, ``"chain4"``, ...). Its depth must
            not exceed the number of heads. Default (None): ``mc_sim_7b_63`` without the paths deeper than the
            model's heads.
        temperature (float): 0 = greedy.
        acceptance (str): ``"greedy"`` or ``"typical"``.
        posterior_threshold (float): typical acceptance epsilon. Default 0.09.
        posterior_alpha (float): typical acceptance delta. Default 0.3.
        stop_tokens (Sequence[int]): a prompt ends after emitting one of these (included in the output).
        seed (Optional[int]): seed for sampling.
        max_cache_len (Optional[int]): cap on KV-cache slots.
        topk (int): candidates per head (every rank in the tree must be below it). Default 10.
        compile (bool): run the step's forward and the heads' proposal through ``torch.compile`` (one graph per
            tree size; the first call compiles, later calls on the same model reuse the graphs). Default False.
        proposal_vocab (Optional[torch.Tensor]): token ids the heads may propose (e.g. :func:`frequent_tokens` of
            the training data): the heads' projection then costs ``N / V`` of a full one. Output is unchanged in
            kind (acceptance still checks the whole vocabulary); fewer guesses may be right. Default None: all.
        lookup_tokens (int): tokens of a lookup draft per step; 0 turns lookup off. Default 6.
        lookup_ngram (Sequence[int]): ``(shortest, longest)`` suffix of the text a lookup matches, longest first.
            Default ``(2, 3)``.
        on_step (Optional[Callable]): test hook, called after every step's eviction as
            ``on_step(committed_tokens: List[int], length: int)``.

    Returns:
        GenerationOutput: tokens and :class:`GenerationStats`.

    Raises:
        ValueError: for a model without Medusa heads, an invalid tree, a tree deeper than the heads, an unknown
            ``acceptance``, a ``lookup_tokens`` that is not an integer >= 0, a bad ``lookup_ngram``, or a prompt that
            does not fit the cache.
    """
    if not is_medusa(model) or getattr(model, "num_medusa_heads", 0) == 0:
        raise ValueError("medusa_generate needs a MedusaTransformerDecoder with at least one head; use generate()")
    if acceptance not in ("greedy", "typical"):
        raise ValueError(f"acceptance must be 'greedy' or 'typical', got {acceptance!r}")
    lookup_tokens = check_lookup_tokens(lookup_tokens)
    lookup_ngram = check_ngram(lookup_ngram)
    prompts = _check_prompts(prompts, max_new_tokens)
    device = next(model.parameters()).device
    if medusa_choices is None:
        medusa_choices = [p for p in DEFAULT_MEDUSA_CHOICES if len(p) <= model.num_medusa_heads]
    tree = build_tree_buffers(medusa_choices, topk=topk, num_heads=model.num_medusa_heads, device=device)
    root_only = build_tree_buffers([], topk=topk, device=device)
    drafted = with_draft_chain(tree, lookup_tokens) if lookup_tokens else None
    biggest = drafted if drafted is not None else tree
    stop = set(int(t) for t in stop_tokens)
    rule = Acceptance(
        temperature=temperature,
        typical=acceptance == "typical",
        posterior_threshold=posterior_threshold,
        posterior_alpha=posterior_alpha,
        generator=_generator(seed, device),
        topk=topk,
    )
    stats = GenerationStats(tree_size=tree.num_nodes)
    depth_hits = [0] * tree.max_depth
    tree_steps = 0
    out: List[List[int]] = []
    if max_new_tokens == 0:
        stats.stop_reasons = ["max_new_tokens"] * len(prompts)
        return GenerationOutput([[] for _ in prompts], stats)
    p_max = max(len(p) for p in prompts)
    cache_len = _cache_budget(model, p_max + max_new_tokens + biggest.num_nodes, p_max, max_cache_len, compile)
    # Positions must stay below max_seq_len (RoPE table); slots below cache_len.
    pos_limit = int(model.max_seq_len)
    fns = step_functions(model, compile=compile, proposal_vocab=proposal_vocab)
    proposable = fns.proposal_vocab if fns.proposal_vocab is not None else getattr(model, "medusa_token_map", None)
    if proposable is not None and proposable.numel() < topk:
        source = "proposal_vocab" if proposal_vocab is not None else "the heads' token map"
        raise ValueError(
            f"the heads can propose only the {proposable.numel()} tokens of {source}, fewer than topk={topk}: "
            "lower topk"
        )
    ttfts = []

    with decoding_scope(model, batch_size=1, cache_len=cache_len, pack_weights=not fns.compiled):
        caches = kv_caches(model)
        if fns.compiled and drafted is not None:
            warm_up_step(fns, caches, drafted, cache_len)
        _sync(device)
        t0 = time.perf_counter()
        for prompt in prompts:
            t_prompt = time.perf_counter()
            state = start_decoding(fns, torch.tensor(prompt, device=device), cache_len, rule)
            emitted: List[int] = []
            reason = None
            pending = [int(state.root)]
            lookup = PromptLookup(prompt, ngram=lookup_ngram) if drafted is not None else None
            ttfts.append(time.perf_counter() - t_prompt)
            while True:
                for t in pending:
                    emitted.append(t)
                    if t in stop:
                        reason = "stop_token"
                        break
                    if len(emitted) >= max_new_tokens:
                        reason = "max_new_tokens"
                        break
                if reason is not None:
                    break
                length = state.length
                draft = None
                if lookup is not None:
                    lookup.extend(pending)
                    draft = lookup.draft(lookup_tokens) or None
                if draft and length + drafted.num_nodes <= cache_len and length + drafted.verify_depth < pos_limit:
                    step_tree = drafted
                    stats.lookup_steps += 1
                elif length + tree.num_nodes <= cache_len and length + tree.max_depth < pos_limit:
                    step_tree = tree
                elif length + 1 <= cache_len and length < pos_limit:
                    step_tree = root_only
                else:
                    log.warning(
                        "medusa_generate: stopping early, the KV cache is full (%d slots: max_cache_len=%s, "
                        "model max_seq_len=%d)",
                        cache_len,
                        max_cache_len,
                        model.max_seq_len,
                    )
                    reason = "cache_full"
                    break
                draft_tokens = torch.tensor(draft, device=device) if step_tree is drafted else None
                a, pending = tree_step(fns, caches, state, step_tree, rule, draft_tokens)
                stats.steps += 1
                stats.accepted_per_step.append(a + 1)
                stats.lookup_accepted += state.draft_accepted
                if step_tree is not root_only:
                    tree_steps += 1
                    for k in range(state.heads_accepted):
                        depth_hits[k] += 1
                if on_step is not None:
                    on_step(list(prompt) + emitted + pending[:-1], state.length)
            out.append(emitted)
            stats.stop_reasons.append(reason)
            # Rewind for the next prompt (stale rows stay masked out).
            for c in caches:
                c.cache_pos.sub_(state.length)
        _sync(device)
        stats.total_time_s = time.perf_counter() - t0
    stats.new_tokens = sum(len(o) for o in out)
    stats.mean_accepted = sum(stats.accepted_per_step) / len(stats.accepted_per_step) if stats.steps else 0.0
    stats.per_head_acceptance = [hits / tree_steps if tree_steps else 0.0 for hits in depth_hits]
    stats.time_to_first_token_s = sum(ttfts) / len(ttfts)
    stats.tokens_per_second = stats.new_tokens / max(stats.total_time_s, 1e-9)
    return GenerationOutput(out, stats)
