# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

import copy
import functools
import random

import pytest
import torch
from common import TINY, tiny_medusa
from torchtune.models.llama3_1 import llama3_1

from torchtune_medusa.generation import generate, medusa_generate
from torchtune_medusa.generation._kv import kv_caches, scoped_kv_cache
from torchtune_medusa.generation._sampling import typical_node_mask, typical_threshold
from torchtune_medusa.generation._tree import chain, topk_per_head_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(n, seed=0, lo=1, hi=12):
    rng = random.Random(seed)
    return [[rng.randrange(TINY["vocab_size"]) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _reference_greedy(model, prompt, n):
    """Greedy decoding by full recomputation, no cache (the ground truth)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([seq]))
            logits = out.logits if hasattr(out, "logits") else out
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def model():
    return tiny_medusa(num_heads=4)


@functools.cache
def train_tiny_heads(num_heads: int = 3, steps: int = 300, head_type: str = "medusa"):
    """Tiny model whose heads were trained on the base model's own greedy continuations, so that they are right
    often but not always (acceptance > 1 and rejections both happen). Also returns the training sequences."""
    m = tiny_medusa(num_heads=num_heads, seed=1, randomize_heads=False, head_type=head_type)
    prompts = _prompts(48, seed=123, lo=2, hi=6)
    outs = generate(m, prompts, max_new_tokens=40).tokens  # batched: the data generator's usage
    data = torch.tensor([(p + o)[:42] for p, o in zip(prompts, outs)])
    opt = torch.optim.Adam(m.medusa_heads.parameters(), lr=3e-2)
    m.set_return_hidden(True)
    with torch.no_grad():
        h = m(data)  # [n, s, d]; the backbone is frozen
    m.set_return_hidden(False)
    for _ in range(steps):
        loss = 0.0
        for j in range(1, num_heads + 1):
            prev = torch.stack([data[:, 1 + i : data.size(1) - j + i] for i in range(j)], dim=-1)  # Hydra reads
            logits = m.project(h[:, : -(j + 1)], j, prev)
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, j + 1 :].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), data


@pytest.fixture(scope="module")
def trained_model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny_heads()[0]
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------- baseline


def test_generate_matches_recomputation(model):
    for p in _prompts(4, seed=1):
        assert generate(model, [p], max_new_tokens=10).tokens[0] == _reference_greedy(model, p, 10)


def test_batched_generate_equals_per_prompt(model):
    prompts = _prompts(6, seed=2, lo=1, hi=15)
    batched = generate(model, prompts, max_new_tokens=12)
    for p, toks in zip(prompts, batched.tokens):
        assert toks == generate(model, [p], max_new_tokens=12).tokens[0]
    assert batched.stats.new_tokens == 6 * 12


def test_batched_generate_drops_finished_rows_without_changing_any(model, monkeypatch):
    from torchtune_medusa.generation import _generate

    prompts = _prompts(8, seed=11, lo=1, hi=10)
    full = [generate(model, [p], max_new_tokens=16).tokens[0] for p in prompts]
    stop = {full[0][2], full[3][6]}  # some rows stop early, at different steps
    sizes = []
    real = _generate.drop_finished_rows
    monkeypatch.setattr(
        _generate, "drop_finished_rows", lambda caches, keep: (sizes.append(keep.numel()), real(caches, keep))
    )
    batched = generate(model, prompts, max_new_tokens=16, stop_tokens=stop, return_hidden=True)
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(prompts)
    assert min(map(len, batched.tokens)) < 16 == max(map(len, batched.tokens))
    for p, toks, hidden in zip(prompts, batched.tokens, batched.hidden):
        alone = generate(model, [p], max_new_tokens=16, stop_tokens=stop, return_hidden=True)
        assert toks == alone.tokens[0]
        torch.testing.assert_close(hidden, alone.hidden[0])


def test_generate_plain_decoder():
    torch.manual_seed(0)
    base = llama3_1(intermediate_dim=64, **TINY).eval()
    prompts = _prompts(3, seed=3)
    out = generate(base, prompts, max_new_tokens=8)
    for p, toks in zip(prompts, out.tokens):
        assert toks == _reference_greedy(base, p, 8)


def test_generate_stop_tokens_and_length(model):
    p = _prompts(1, seed=4)[0]
    full = generate(model, [p], max_new_tokens=16).tokens[0]
    assert len(full) == 16
    stop = full[5]
    out = generate(model, [p, p[:-1] or [3]], max_new_tokens=16, stop_tokens=[stop])
    first = full.index(stop)
    assert out.tokens[0] == full[: first + 1]
    assert out.stats.stop_reasons[0] == "stop_token"


def test_generate_sampling_seeded(model):
    prompts = _prompts(2, seed=5)
    a = generate(model, prompts, max_new_tokens=10, temperature=1.0, top_k=20, seed=7).tokens
    b = generate(model, prompts, max_new_tokens=10, temperature=1.0, top_k=20, seed=7).tokens
    assert a == b


def test_generate_cache_limits(model):
    p = _prompts(1, seed=6, lo=10, hi=10)[0]
    with pytest.raises(ValueError, match="KV cache can hold only"):
        generate(model, [p], max_new_tokens=4, max_cache_len=5)
    full = generate(model, [p], max_new_tokens=20).tokens[0]
    short = generate(model, [p], max_new_tokens=20, max_cache_len=14)
    assert short.tokens[0] == full[:5]  # 14 slots: 10 prompt + 4 decoded, the 5th token needs no slot
    assert short.stats.stop_reasons == ["cache_full"]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * (TINY["max_seq_len"] + 1)], max_new_tokens=1)


def test_model_left_usable(model):
    p = _prompts(1, seed=8)[0]
    before = model(torch.tensor([p])).logits
    model.setup_caches(1, torch.float32, decoder_max_seq_len=32)
    own = [c for c in kv_caches(model)]
    generate(model, [p], max_new_tokens=3)
    medusa_generate(model, [p], max_new_tokens=3)
    assert kv_caches(model) == own and model.decoder_max_cache_seq_len == 32  # the caller's caches are back
    from torchtune.modules.common_utils import delete_kv_caches

    delete_kv_caches(model)
    assert not model.caches_are_setup() and model.return_hidden is False
    torch.testing.assert_close(model(torch.tensor([p])).logits, before)


# ----------------------------------------------------------------------------------------------- medusa


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain3", "tiny"])
def test_medusa_greedy_equals_baseline_random_heads(model, tree):
    choices = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)] if tree == "tiny" else tree
    for p in _prompts(8, seed=10):
        base = generate(model, [p], max_new_tokens=24).tokens[0]
        med = medusa_generate(model, [p], max_new_tokens=24, medusa_choices=choices)
        assert med.tokens[0] == base
        assert len(med.tokens[0]) == 24


def test_medusa_greedy_equals_baseline_trained_heads(trained_model):
    taus = []
    for tree in [topk_per_head_tree([4, 2, 2]), chain(3)]:
        for p in _prompts(12, seed=11, lo=2, hi=8):
            base = generate(trained_model, [p], max_new_tokens=30).tokens[0]
            # the heads alone (lookup drafts: test_lookup.py)
            med = medusa_generate(trained_model, [p], max_new_tokens=30, medusa_choices=tree, lookup_tokens=0)
            assert med.tokens[0] == base
            taus.append(med.stats.mean_accepted)
            assert max(med.stats.accepted_per_step) <= 4
    mean_tau = sum(taus) / len(taus)
    assert mean_tau > 1.5, mean_tau  # the heads are right often: acceptance > 1 is exercised
    assert min(taus) < 4.0  # and they are not always right: rejections are exercised


def test_medusa_cache_equals_recomputed_after_every_step(trained_model):
    ref_model = copy.deepcopy(trained_model)
    checked = []

    def on_step(committed, length):
        assert len(committed) == length
        caches = kv_caches(trained_model)
        with scoped_kv_cache(ref_model, batch_size=1, cache_len=length + 1, dtype=torch.float32):
            ref_model.set_return_hidden(True)
            toks = torch.tensor([committed])
            # plain cached decoding of the committed tokens, one token at a time
            for i in range(length):
                mask = torch.zeros(1, 1, length + 1, dtype=torch.bool)
                mask[..., : i + 1] = True
                ref_model(toks[:, i : i + 1], mask=mask, input_pos=torch.tensor([[i]]))
            ref_model.set_return_hidden(False)
            for c, r in zip(caches, kv_caches(ref_model)):
                torch.testing.assert_close(c.k_cache[:, :, :length], r.k_cache[:, :, :length], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(c.v_cache[:, :, :length], r.v_cache[:, :, :length], atol=1e-5, rtol=1e-4)
                assert int(c.cache_pos[0]) == length
        checked.append(length)

    for p in _prompts(3, seed=12, lo=2, hi=6):
        medusa_generate(
            trained_model, [p], max_new_tokens=16, medusa_choices=topk_per_head_tree([3, 2, 1]), on_step=on_step
        )
    assert len(checked) > 5


def test_medusa_stop_tokens_and_multiple_prompts(trained_model):
    prompts = _prompts(4, seed=13, lo=2, hi=8)
    fulls = [generate(trained_model, [p], max_new_tokens=20).tokens[0] for p in prompts]
    stop = fulls[0][7]
    out = medusa_generate(trained_model, prompts, max_new_tokens=20, medusa_choices=chain(3), stop_tokens=[stop])
    for full, toks, reason in zip(fulls, out.tokens, out.stats.stop_reasons):
        expect = full[: full.index(stop) + 1] if stop in full else full
        assert toks == expect
        assert reason == ("stop_token" if stop in full else "max_new_tokens")
    for n in (1, 2, 3, 5):
        assert medusa_generate(trained_model, prompts[:1], max_new_tokens=n).tokens[0] == fulls[0][:n]


def test_medusa_cache_full_falls_back_and_stops(trained_model):
    p = _prompts(1, seed=14, lo=6, hi=6)[0]
    base = generate(trained_model, [p], max_new_tokens=40, max_cache_len=20)
    med = medusa_generate(trained_model, [p], max_new_tokens=40, max_cache_len=20, medusa_choices=chain(3))
    assert med.tokens == base.tokens and len(med.tokens[0]) == 15
    assert med.stats.stop_reasons == ["cache_full"]
    with pytest.raises(ValueError, match="KV cache can hold only"):
        medusa_generate(trained_model, [p], max_new_tokens=4, max_cache_len=4)


def test_medusa_errors(model):
    with pytest.raises(ValueError, match="only 4 Medusa heads"):
        medusa_generate(model, [[1, 2]], max_new_tokens=2, medusa_choices=chain(5))
    with pytest.raises(ValueError, match="acceptance"):
        medusa_generate(model, [[1, 2]], max_new_tokens=2, acceptance="nucleus")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="Medusa heads|at least one head"):
        medusa_generate(llama3_1(intermediate_dim=64, **TINY), [[1, 2]], max_new_tokens=2)


# ----------------------------------------------------------------------------------------------- typical


def test_typical_threshold_formula_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()
    temperature = 0.7
    p = torch.softmax(logits / temperature, dim=-1)
    h = -(p * torch.log(p + 1e-5)).sum(-1)
    eps, delta = 0.09, 0.3
    expect = torch.minimum(torch.tensor(eps), delta * torch.exp(-h))
    torch.testing.assert_close(typical_threshold(logits, temperature, eps, delta), expect)
    # Node 0 = root with distribution row 0; nodes 1..4 are its children with tokens 0..3; node 5 is a child of
    # node 1 with token 1 under distribution row 1.
    tree_logits = torch.stack([logits[0], logits[1], logits[0], logits[0], logits[0], logits[0]])
    tokens = torch.tensor([9, 0, 1, 2, 3, 1]) % 4
    parent = torch.tensor([0, 0, 0, 0, 0, 1])
    ok, logp = typical_node_mask(tokens, tree_logits, parent, temperature=temperature)
    p0, p1 = p[0], p[1]
    assert ok[1:5].tolist() == [bool(p0[t] > expect[0]) for t in range(4)]
    assert ok[5].item() == bool(p1[1] > expect[1])
    torch.testing.assert_close(logp[5], p1[1].log())
    assert ok[1:5].tolist() == [True, True, True, False]  # by hand: p^(1/0.7) renormalised; 0.05 -> ~0.02 < 0.09


def test_typical_acceptance_generation(trained_model):
    p = _prompts(1, seed=15, lo=3, hi=3)[0]
    tree = topk_per_head_tree([3, 2, 2])
    loose = medusa_generate(
        trained_model,
        [p],
        max_new_tokens=30,
        medusa_choices=tree,
        temperature=0.8,
        acceptance="typical",
        posterior_threshold=0.0,
        posterior_alpha=0.0,
        seed=0,
    )
    assert all(a == 4 for a in loose.stats.accepted_per_step[:-1])  # threshold 0: every path fully accepted
    strict = medusa_generate(
        trained_model,
        [p],
        max_new_tokens=30,
        medusa_choices=tree,
        temperature=0.8,
        acceptance="typical",
        posterior_threshold=1.0,
        posterior_alpha=1e9,
        seed=0,
    )
    assert strict.stats.mean_accepted == 1.0  # threshold 1: nothing accepted
    a = medusa_generate(
        trained_model, [p], max_new_tokens=30, temperature=0.8, acceptance="typical", seed=3, medusa_choices=tree
    )
    b = medusa_generate(
        trained_model, [p], max_new_tokens=30, temperature=0.8, acceptance="typical", seed=3, medusa_choices=tree
    )
    assert a.tokens == b.tokens and len(a.tokens[0]) == 30
    # typical at temperature 0 is greedy
    g = medusa_generate(trained_model, [p], max_new_tokens=20, acceptance="typical", medusa_choices=tree)
    assert g.tokens[0] == generate(trained_model, [p], max_new_tokens=20).tokens[0]


def test_exact_match_sampling_is_reproducible(trained_model):
    p = _prompts(1, seed=16)[0]
    a = medusa_generate(trained_model, [p], max_new_tokens=20, temperature=1.0, seed=1, medusa_choices=chain(3))
    b = medusa_generate(trained_model, [p], max_new_tokens=20, temperature=1.0, seed=1, medusa_choices=chain(3))
    assert a.tokens == b.tokens and len(a.tokens[0]) == 20


# ----------------------------------------------------------------------------------------------- SmolLM2 asset


@pytest.mark.slow
def test_medusa_greedy_equals_baseline_smollm2():
    """The real SmolLM2-135M-Instruct (offline asset), with freshly initialised heads and with perturbed heads."""
    from torchtune_medusa import assets
    from torchtune_medusa._load import load_hf_medusa

    try:
        a = assets.prepare(install_missing=False, verbose=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 asset unavailable: {e}")
    model, heads_source = load_hf_medusa(a.smollm2_dir, medusa_num_heads=4)
    assert heads_source is None  # freshly initialised, as the checkpointer initialises them
    prompts = [[1, 9690, 198, 2683, 314, 253], [504, 2821, 282, 4544, 314]]
    for perturb in (False, True):
        if perturb:
            torch.manual_seed(0)
            with torch.no_grad():
                for name, p in model.medusa_heads.named_parameters():
                    if "linear.weight" in name:
                        p.normal_(0, 0.02)
        for p in prompts:
            base = generate(model, [p], max_new_tokens=12).tokens[0]
            for tree in (chain(3), "mc_sim_7b_63"):
                assert medusa_generate(model, [p], max_new_tokens=12, medusa_choices=tree).tokens[0] == base
