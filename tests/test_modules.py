# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""MedusaTransformerDecoder through the builders: init behaviour, zero heads, KV cache, LoRA, QLoRA, FSDP2."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchtune.models.llama3_1 import llama3_1
from torchtune.modules.peft import disable_adapter, get_adapter_params, set_trainable_params

from tests.common import TINY, tiny_medusa
from torchtune_medusa.models import lora_medusa_llama3_1, lora_medusa_smollm2, medusa_llama3_1, medusa_smollm2
from torchtune_medusa.modules import MedusaTransformerDecoder
from torchtune_medusa.training import MedusaHFCheckpointer

ARCH = dict(TINY, intermediate_dim=64)


def _init_heads_like_checkpointer(model, *, zero_bias=False):
    """Initialise heads as MedusaHFCheckpointer does (zero W, default bias, own projection = base output)."""
    ckpt = MedusaHFCheckpointer.__new__(MedusaHFCheckpointer)
    ckpt.medusa_num_heads = model.num_medusa_heads
    ckpt.medusa_num_layers = model.medusa_heads[0].num_layers
    ckpt.medusa_projection = "own" if model.medusa_heads[0].projection is not None else "shared"
    ckpt.medusa_head_type = model.medusa_head_type
    out = model.output
    base_w = out.weight if hasattr(out, "weight") else out.tied_module.weight
    heads = ckpt.init_heads(base_w.detach())
    if zero_bias:
        heads = {k: torch.zeros_like(v) if k.endswith("bias") else v for k, v in heads.items()}
    model.load_state_dict(heads, strict=False)


@pytest.mark.parametrize("builder", ["llama3_1", "smollm2"])
@pytest.mark.parametrize("projection", ["own", "shared"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("head_type", ["medusa", "hydra"])
def test_heads_at_init_reproduce_base(builder, projection, num_layers, head_type):
    torch.manual_seed(0)
    build = medusa_llama3_1 if builder == "llama3_1" else medusa_smollm2
    kwargs = dict(ARCH) if builder == "llama3_1" else dict(ARCH, rope_base=10_000)
    model = build(
        **kwargs,
        medusa_num_heads=3,
        medusa_num_layers=num_layers,
        medusa_projection=projection,
        medusa_head_type=head_type,
    ).eval()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 10))
    _init_heads_like_checkpointer(model, zero_bias=True)
    with torch.no_grad():
        out = model(tokens)
    for k in range(3):  # with the bias zeroed every head is the identity: exactly the base logits
        assert torch.equal(out.medusa_logits[k], out.logits)
    _init_heads_like_checkpointer(model)
    with torch.no_grad():
        out = model(tokens)
    # with the default bias the head is the base prediction shifted by exactly the bias term:
    # every block adds SiLU(0 @ x + b_j) = SiLU(b_j), so head_k(h) = h + sum_j SiLU(b_j)
    out_w = model.output.weight if hasattr(model.output, "weight") else model.output.tied_module.weight
    for k in range(3):
        shift = sum(nn.functional.silu(blk.linear.bias) for blk in list(model.medusa_heads[k])[:num_layers])
        expected = out.logits + (out_w @ shift.detach())
        torch.testing.assert_close(out.medusa_logits[k], expected, atol=1e-4, rtol=1e-4)
        assert shift.abs().max() <= num_layers * 32**-0.5


@pytest.mark.parametrize("tied", [False, True])
def test_zero_heads_is_base_bit_for_bit(tied):
    torch.manual_seed(0)
    if tied:
        from torchtune_medusa.models import smollm2

        base = smollm2(**dict(ARCH, rope_base=10_000))
    else:
        base = llama3_1(**ARCH)
    base.eval()
    model = MedusaTransformerDecoder.from_decoder(base, nn.ModuleList()).eval()
    assert model.state_dict().keys() == base.state_dict().keys()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        ref = base(tokens)
        out = model(tokens)
    assert torch.equal(out.logits, ref)
    assert out.medusa_logits.shape[0] == 0


@pytest.mark.parametrize("projection", ["own", "shared"])
def test_cached_equals_uncached(projection):
    model = tiny_medusa(own_projection=projection == "own", num_layers=2)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        ref = model(tokens)
    cache_len = 32
    model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=cache_len)
    causal = torch.tril(torch.ones(cache_len, cache_len, dtype=torch.bool))
    P = 7
    with torch.no_grad():
        pre = model(
            tokens[:, :P], mask=causal[None, :P].expand(2, -1, -1), input_pos=torch.arange(P)[None].expand(2, -1)
        )
        logits, heads = [pre.logits], [pre.medusa_logits]
        for t in range(P, 12):
            step = model(
                tokens[:, t : t + 1], mask=causal[None, t : t + 1].expand(2, -1, -1), input_pos=torch.tensor([[t], [t]])
            )
            logits.append(step.logits)
            heads.append(step.medusa_logits)
    torch.testing.assert_close(torch.cat(logits, 1), ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(heads, 2), ref.medusa_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("builder", ["llama3_1", "smollm2"])
def test_lora_model_disable_adapter_and_trainable_params(builder):
    torch.manual_seed(0)
    if builder == "llama3_1":
        plain = medusa_llama3_1(**ARCH, medusa_num_heads=2)
        lora = lora_medusa_llama3_1(
            ["q_proj", "v_proj"], apply_lora_to_mlp=True, **ARCH, lora_rank=4, lora_alpha=8, medusa_num_heads=2
        )
    else:
        kw = dict(ARCH, rope_base=10_000)
        plain = medusa_smollm2(**kw, medusa_num_heads=2)
        lora = lora_medusa_smollm2(
            ["q_proj", "v_proj"], apply_lora_to_mlp=True, **kw, lora_rank=4, lora_alpha=8, medusa_num_heads=2
        )
    missing, unexpected = lora.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)  # make the adapters matter
    plain.eval(), lora.eval()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 8))
    with torch.no_grad():
        ref = plain(tokens)
        with_lora = lora(tokens)
        with disable_adapter(lora):
            without = lora(tokens)
    assert not torch.allclose(with_lora.logits, ref.logits)
    assert torch.equal(without.logits, ref.logits)
    assert without.medusa_logits.shape == (2, 2, 8, TINY["vocab_size"])  # heads still computed
    assert torch.equal(without.medusa_logits, ref.medusa_logits)

    adapter = get_adapter_params(lora)
    assert adapter and all("lora" in k for k in adapter)
    heads = {f"medusa_heads.{k}": p for k, p in lora.medusa_heads.named_parameters()}
    set_trainable_params(lora, {**adapter, **heads})
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == set(adapter) | set(heads)


@pytest.mark.parametrize("builder", ["llama3_1", "smollm2"])
def test_qlora_forward_backward_cpu(builder):
    torch.manual_seed(0)
    # NF4 blocks of 64 values: the widths only need to be multiples of 64 (SmolLM2-135M's 576 included)
    arch = dict(
        vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64, intermediate_dim=128
    )
    build = lora_medusa_llama3_1 if builder == "llama3_1" else lora_medusa_smollm2
    model = build(
        ["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        **arch,
        lora_rank=4,
        lora_alpha=8,
        quantize_base=True,
        medusa_num_heads=2,
        medusa_projection="shared",
    )
    assert "NF4" in type(model.layers[0].attn.q_proj.weight).__name__
    adapter = get_adapter_params(model)
    set_trainable_params(
        model, {**adapter, **{f"medusa_heads.{k}": p for k, p in model.medusa_heads.named_parameters()}}
    )
    tokens = torch.randint(0, 128, (2, 8))
    out = model(tokens)
    loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()) + out.medusa_logits.square().mean()
    loss.backward()
    assert model.layers[0].attn.q_proj.lora_a.weight.grad is not None
    assert model.medusa_heads[1][0].linear.weight.grad is not None
    assert torch.isfinite(loss)
    sd = model.state_dict()  # NF4 weights come back dequantised (bf16) for checkpointing
    assert sd["layers.0.attn.q_proj.weight"].dtype == torch.bfloat16
    assert sd["medusa_heads.0.0.linear.weight"].dtype == torch.float32


def test_fsdp2_shards_each_head():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model = tiny_medusa(own_projection=True, num_layers=1).train()
    ref = tiny_medusa(own_projection=True, num_layers=1).train()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 8))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for head in model.medusa_heads:
            fully_shard(head, mesh=mesh)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(h, FSDPModule) for h in model.medusa_heads)
        outs = []
        for m in (model, ref):
            out = m(tokens)
            (out.logits.mean() + out.medusa_logits.mean()).backward()
            outs.append(out)
        torch.testing.assert_close(outs[0].medusa_logits, outs[1].medusa_logits)
        torch.testing.assert_close(outs[0].logits, outs[1].logits)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        for n, p in ref.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, msg=n)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("own_projection", [True, False])
def test_medusa_logits_of_the_first_heads_match_project(own_projection):
    """Shared-projection heads are projected in one matmul; the result is each head's own projection."""
    model = tiny_medusa(num_heads=3, own_projection=own_projection).eval()
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.normal_(0, 0.1)
        hidden = torch.randn(5, model.tok_embeddings.embedding_dim)
        for n in (0, 2, 3):
            got = model.medusa_logits(hidden, n)
            assert got.shape == ((n, 5, TINY["vocab_size"]) if n else (0, 5, 0)) and got.dtype == torch.float32
            for k in range(1, n + 1):
                torch.testing.assert_close(got[k - 1], model.project(hidden, k).float(), atol=1e-5, rtol=1e-5)
        assert torch.equal(model.medusa_logits(hidden), model.medusa_logits(hidden, 3))
    with pytest.raises(IndexError, match="num_heads must be in 0..3"):
        model.medusa_logits(hidden, 4)
