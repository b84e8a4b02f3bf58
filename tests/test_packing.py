# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""bf16 linear layers on prepacked oneDNN weights (eager CPU decoding): same bits as ``F.linear``, restored after."""

import pytest
import torch
from common import tiny_medusa
from torch import nn

from torchtune_medusa.generation import _packing, generate, medusa_generate
from torchtune_medusa.generation._packing import packed_linears, packing_supported
from torchtune_medusa.generation._settings import decode_compile, decode_settings

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not packing_supported(torch.zeros(1, dtype=torch.bfloat16)), reason="this CPU has no native bf16 oneDNN"
    ),
]


def _bf16(tied: bool):
    return tiny_medusa(num_heads=2, tied=tied, seed=3).to(torch.bfloat16)


def _patched(model):
    tied = getattr(model.output, "linear", None)  # torchtune's TiedLinear is no nn.Module: not in modules()
    return [m for m in [*model.modules(), *([tied] if tied is not None else [])] if "forward" in vars(m)]


@pytest.mark.parametrize("tied", [False, True])
def test_packed_forward_is_bit_identical_and_restored(tied):
    model = _bf16(tied)
    tokens = torch.randint(0, 128, (3, 9))
    with torch.inference_mode():
        reference = model(tokens)
        with packed_linears(model):
            linears = [m for m in model.modules() if type(m) is nn.Linear]
            patched = _patched(model)
            assert set(map(id, linears)) <= set(map(id, patched))
            if tied:  # the tied output layer (torchtune's TiedLinear) is packed too
                assert any(m is model.output.linear for m in patched)
            with packed_linears(model):  # nested: the inner scope leaves the outer's layers alone
                pass
            assert len(_patched(model)) == len(patched)
            packed = model(tokens)
    assert not _patched(model)
    for a, b in zip(reference, packed):
        assert torch.equal(a, b)


def test_nothing_is_packed_in_fp32_without_memory_or_when_switched_off(monkeypatch):
    fp32 = tiny_medusa(num_heads=1)
    with packed_linears(fp32):
        assert not _patched(fp32)  # fp32 runs MKL's GEMM: a oneDNN one would change the bits
    model = _bf16(tied=False)
    monkeypatch.setattr(_packing, "_free_memory_bytes", lambda: 1000)
    with packed_linears(model):
        assert not _patched(model)
    monkeypatch.undo()
    monkeypatch.setattr(_packing, "USE_PACKED_LINEAR", False)
    with packed_linears(model):
        assert not _patched(model)


def test_decoding_with_packed_weights_equals_decoding_without(monkeypatch):
    model = _bf16(tied=True)
    prompts = [[5, 9, 12, 7], [3, 1], [40, 41, 42, 43, 44, 45]]
    seen = []
    real = _packing.packed_linears

    def spy(m):
        seen.append(m)
        return real(m)

    monkeypatch.setattr("torchtune_medusa.generation._step.packed_linears", spy)
    packed = generate(model, prompts, max_new_tokens=12, return_hidden=True)
    tree = medusa_generate(model, prompts[:1], max_new_tokens=12, medusa_choices="chain2")
    assert len(seen) == 2  # both decoders packed
    monkeypatch.setattr(_packing, "USE_PACKED_LINEAR", False)
    plain = generate(model, prompts, max_new_tokens=12, return_hidden=True)
    assert packed.tokens == plain.tokens
    assert all(torch.equal(a, b) for a, b in zip(packed.hidden, plain.hidden))
    assert tree.tokens == medusa_generate(model, prompts[:1], max_new_tokens=12, medusa_choices="chain2").tokens


def test_auto_compile_prefers_the_packed_eager_step_for_bf16_on_cpu():
    assert decode_settings("cpu", dtype="bf16").compile is False  # prepacked eager beat compiled at every size
    assert decode_settings("cpu", dtype="bf16", compile="on").compile is True
    assert decode_settings("cpu", dtype="fp32").compile is True
    assert decode_compile("auto", "cuda", torch.bfloat16) is True


def test_packed_copies_are_kept_between_calls_until_a_weight_changes(monkeypatch):
    model = _bf16(tied=True)
    prompts = [[5, 9, 12, 7], [3, 1]]
    packs = []
    real = _packing.pack_weight
    monkeypatch.setattr(_packing, "pack_weight", lambda w: (packs.append(w), real(w))[1])

    def decode():
        out = generate(model, prompts, max_new_tokens=6, return_hidden=True)
        return out.tokens, out.hidden

    first = decode()
    n = len(packs)
    again = decode()
    assert n > 0 and len(packs) == n  # kept
    assert again[0] == first[0] and all(map(torch.equal, again[1], first[1]))
    with torch.no_grad():  # an in-place update (an optimizer step): the kept copies are stale
        model.layers[0].mlp.w1.weight.mul_(-2)
    changed = decode()
    assert len(packs) == 2 * n
    monkeypatch.setattr(_packing, "USE_PACKED_LINEAR", False)
    unpacked = decode()
    assert changed[0] == unpacked[0] and all(map(torch.equal, changed[1], unpacked[1]))
    assert not all(map(torch.equal, changed[1], first[1]))
    _packing.release_packed_weights(model)
    assert model not in _packing._KEPT
