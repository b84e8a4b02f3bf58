# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The chunked Medusa losses against a naive reference built from the model's full logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from common import TINY, tiny_medusa
from torch.utils._python_dispatch import TorchDispatchMode

from torchtune_medusa.modules.loss import (
    medusa_loss_metrics,
    MedusaCrossEntropyLoss,
    MedusaLossOutput,
    MedusaSelfDistillationLoss,
)

IGNORE = -100
V = TINY["vocab_size"]
TOPK = (1, 3, 10)


def make_batch(b=3, s=24, seed=0):
    """Tokens and base-shifted labels with an ignored prompt and right padding (torchtune's convention)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (b, s), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((b, 1), IGNORE)], dim=1)
    labels[:, :3] = IGNORE  # prompt
    tokens[1, -7:] = 0  # right padding of row 1
    labels[1, -8:] = IGNORE
    labels[-1, 10] = IGNORE  # a stray ignored token inside the sequence
    return tokens, labels


def shifted(labels, k):
    """Labels of head k: ``labels[:, t + k]``, ignore_index past the end."""
    return torch.cat([labels[:, k:], torch.full((labels.size(0), k), IGNORE)], dim=1)


def all_logits(model, tokens):
    """Naive: every head's full fp32 logits ``[K + 1, b, s, v]``, from the model's logits mode."""
    model.set_return_hidden(False)
    out = model(tokens)
    return torch.cat([out.logits.unsqueeze(0), out.medusa_logits])


def naive_stats(logits, targets, valid):
    top = logits.topk(max(TOPK), dim=-1).indices
    correct = [((top[:, :k] == targets[:, None]).any(-1) & valid).sum().item() for k in TOPK]
    return correct, valid.sum().item()


def naive_ce(model, tokens, labels, weights):
    """Naive reference: plain ``F.cross_entropy`` per shifted head on full logits, weights applied by hand."""
    logits = all_logits(model, tokens)
    n = (labels != IGNORE).sum()
    loss, sums, correct, counts = 0.0, [], [], []
    for k in range(logits.size(0)):
        lg, tgt = logits[k].reshape(-1, V), shifted(labels, k).reshape(-1)
        ce = F.cross_entropy(lg, tgt, ignore_index=IGNORE, reduction="sum")
        loss = loss + weights[k] * ce
        sums.append(ce.item())
        c, cnt = naive_stats(lg, tgt, tgt != IGNORE)
        correct.append(c)
        counts.append(cnt)
    return loss / n, sums, correct, counts


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def run_both(model, tokens, labels, loss_fn, naive_fn, *extra):
    """(naive loss, naive extras, naive grads), (ours, our grads)."""
    model.zero_grad(set_to_none=True)
    ref = naive_fn()
    ref[0].backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    model.set_return_hidden(True)
    ours = loss_fn(model(tokens), labels, model, *extra)
    ours.loss.backward()
    return ref, ref_grads, ours, grads(model)


def assert_grads_close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def expected_weights(loss_fn, num_heads, coef=None):
    coef = loss_fn.heads_coefficient if coef is None else coef
    base = loss_fn.base_loss_weight if loss_fn.include_base_loss else 0.0
    return [base] + [coef * loss_fn.decay**k for k in range(1, num_heads + 1)]


LAYOUTS = [dict(own_projection=True), dict(own_projection=False), dict(own_projection=False, tied=True)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["own", "shared", "shared_tied"])
@pytest.mark.parametrize("include_base_loss", [True, False])
@pytest.mark.parametrize("num_output_chunks,recompute", [(1, True), (5, True), (64, True), (5, False)])
def test_ce_matches_naive(layout, include_base_loss, num_output_chunks, recompute):
    model = tiny_medusa(num_heads=3, **layout)
    tokens, labels = make_batch()
    loss_fn = MedusaCrossEntropyLoss(
        num_output_chunks=num_output_chunks, include_base_loss=include_base_loss, topk=TOPK, recompute=recompute
    )
    weights = expected_weights(loss_fn, 3)
    ref, ref_grads, ours, our_grads = run_both(
        model, tokens, labels, loss_fn, lambda: naive_ce(model, tokens, labels, weights)
    )
    torch.testing.assert_close(ours.loss, ref[0].detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(our_grads, ref_grads)
    # metrics: every head, the base included (log_base_metrics defaults to True)
    torch.testing.assert_close(ours.head_loss_sums, torch.tensor(ref[1]), atol=1e-4, rtol=1e-5)
    assert ours.head_topk_correct.tolist() == ref[2]
    assert ours.head_counts.tolist() == ref[3]
    assert not include_base_loss or all(g.abs().sum() > 0 for g in our_grads.values())
    if not include_base_loss and layout["own_projection"]:
        assert our_grads["output.weight"].abs().sum() == 0  # Medusa-1: the base head carries no gradient


@pytest.mark.parametrize("own_projection", [True, False])
def test_ce_weights_and_coefficients(own_projection):
    model = tiny_medusa(num_heads=4, own_projection=own_projection)
    tokens, labels = make_batch(seed=1)
    loss_fn = MedusaCrossEntropyLoss(
        num_output_chunks=3, decay=0.5, heads_coefficient=1.3, base_loss_weight=0.25, topk=TOPK
    )
    weights = [0.25] + [1.3 * 0.5**k for k in range(1, 5)]
    assert loss_fn.head_weights(4) == pytest.approx(weights)
    ref, ref_grads, ours, our_grads = run_both(
        model, tokens, labels, loss_fn, lambda: naive_ce(model, tokens, labels, weights)
    )
    torch.testing.assert_close(ours.loss, ref[0].detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(our_grads, ref_grads)


@pytest.mark.parametrize("schedule", ["linear", "sine"])
def test_schedules(schedule):
    loss_fn = MedusaCrossEntropyLoss(schedule=schedule, heads_coefficient=0.5, topk=TOPK)
    with pytest.raises(RuntimeError, match="set_step"):
        loss_fn.current_heads_coefficient()
    ramp = {"linear": lambda x: x, "sine": lambda x: math.sin(math.pi / 2 * x)}[schedule]
    for step, total in [(0, 10), (3, 10), (10, 10), (25, 10)]:
        loss_fn.set_step(step, total)
        assert loss_fn.current_heads_coefficient() == pytest.approx(0.5 * ramp(min(step / total, 1.0)))
    assert MedusaCrossEntropyLoss(heads_coefficient=0.5).current_heads_coefficient() == 0.5

    # mid-ramp, the loss and grads match the naive loss with the scheduled weights
    model = tiny_medusa(num_heads=2)
    tokens, labels = make_batch(seed=2)
    loss_fn.set_step(3, 10)
    weights = expected_weights(loss_fn, 2, coef=0.5 * ramp(0.3))
    ref, ref_grads, ours, our_grads = run_both(
        model, tokens, labels, loss_fn, lambda: naive_ce(model, tokens, labels, weights)
    )
    torch.testing.assert_close(ours.loss, ref[0].detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(our_grads, ref_grads)

    # at step 0 the heads get no gradient but still report metrics
    loss_fn.set_step(0, 10)
    model.zero_grad(set_to_none=True)
    out = loss_fn(model(tokens), labels, model)
    out.loss.backward()
    assert all(p.grad is None for p in model.medusa_heads.parameters())
    assert (out.head_counts > 0).all()
    # Medusa-1 at step 0 scores nothing trainable: the loss is 0 and backward is a no-op, not an error
    medusa1 = MedusaCrossEntropyLoss(schedule=schedule, include_base_loss=False)
    medusa1.set_step(0, 10)
    model.zero_grad(set_to_none=True)
    out = medusa1(model(tokens), labels, model)
    out.loss.backward()
    assert out.loss.item() == 0 and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("own_projection", [True, False])
def test_gradient_accumulation_is_exact(own_projection):
    """Recipe convention: sum(loss_i * n_i) / sum(n_i) over micro-batches == the loss of the whole batch."""
    model = tiny_medusa(num_heads=3, own_projection=own_projection)
    model.set_return_hidden(True)
    tokens, labels = make_batch(b=4, seed=3)
    loss_fn = MedusaCrossEntropyLoss(num_output_chunks=4, topk=TOPK)

    full = loss_fn(model(tokens), labels, model).loss
    full.backward()
    full_grads = grads(model)
    model.zero_grad(set_to_none=True)

    total_tokens = (labels != IGNORE).sum()
    running = 0.0
    for rows in (slice(0, 1), slice(1, 4)):  # unequal halves with unequal token counts
        n = (labels[rows] != IGNORE).sum()
        micro = loss_fn(model(tokens[rows]), labels[rows], model).loss * n
        micro.backward()
        running = running + micro.detach()
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= total_tokens
    torch.testing.assert_close(running / total_tokens, full.detach(), atol=1e-6, rtol=1e-6)
    assert_grads_close(grads(model), full_grads)


def test_metrics_dict_and_accumulation():
    model = tiny_medusa(num_heads=2)
    model.set_return_hidden(True)
    tokens, labels = make_batch(seed=4)
    out = MedusaCrossEntropyLoss(topk=(1, 5), include_base_loss=False)(model(tokens), labels, model)
    assert isinstance(out, MedusaLossOutput)
    metrics = out.metrics()
    assert sorted(metrics) == sorted(f"{m}/{h}" for m in ("loss", "top1", "top5") for h in ("base", "head_1", "head_2"))
    for h, name in enumerate(["base", "head_1", "head_2"]):
        assert metrics[f"loss/{name}"] == pytest.approx(out.head_losses[h].item())
        assert metrics[f"top5/{name}"] == pytest.approx(out.head_topk_correct[h, 1].item() / out.head_counts[h].item())
        assert 0 <= metrics[f"top1/{name}"] <= metrics[f"top5/{name}"] <= 1
    # sums and counts add up across micro-batches; heads with no scored position are left out
    doubled = medusa_loss_metrics(out.head_loss_sums * 2, out.head_topk_correct * 2, out.head_counts * 2, (1, 5))
    assert doubled == pytest.approx(metrics)
    assert "loss/base" not in medusa_loss_metrics(
        out.head_loss_sums, out.head_topk_correct, out.head_counts * torch.tensor([0, 1, 1]), (1, 5)
    )
    # Medusa-1 without base metrics skips the base head entirely
    out = MedusaCrossEntropyLoss(include_base_loss=False, log_base_metrics=False)(model(tokens), labels, model)
    assert out.head_counts[0] == 0 and "loss/base" not in out.metrics()


def test_no_grad_matches_and_plain_callable():
    model = tiny_medusa(num_heads=2)
    model.set_return_hidden(True)
    tokens, labels = make_batch(seed=5)
    loss_fn = MedusaCrossEntropyLoss(num_output_chunks=3, topk=TOPK)
    with_grad = loss_fn(model(tokens), labels, model)
    with torch.no_grad():
        no_grad = loss_fn(model(tokens), labels, model.project, 2)
    torch.testing.assert_close(no_grad.loss, with_grad.loss.detach())
    assert torch.equal(no_grad.head_topk_correct, with_grad.head_topk_correct)


def test_only_one_chunk_of_logits_at_a_time():
    """No tensor with the vocabulary as last dim ever has more rows than one chunk, forward or backward."""

    class MaxVocabRows(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.size(-1) == V:
                    self.rows = max(self.rows, t.numel() // V)
            return out

    b, s, chunks = 4, 128, 8  # one chunk: 64 rows; the projection weight.t(): d = 32 rows
    model = tiny_medusa(num_heads=3, own_projection=False)
    model.set_return_hidden(True)
    tokens, labels = make_batch(b=b, s=s)
    hidden = model(tokens).detach().requires_grad_()  # the loss alone (the backbone's backward is not ours)
    with MaxVocabRows() as mode:
        MedusaCrossEntropyLoss(num_output_chunks=chunks)(hidden, labels, model).loss.backward()
    assert 0 < mode.rows <= b * s // chunks


def test_ignored_positions_are_never_projected():
    """Prompt and padding rows (label ignored) cost no projection: every vocabulary-sized tensor, forward and
    backward, has at most as many rows as one head has scored positions."""

    class VocabRows(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                weight_t = t.dim() == 2 and t.size(0) == model.tok_embeddings.embedding_dim
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.size(-1) == V and not weight_t:
                    self.rows = max(self.rows, t.numel() // V)
            return out

    model = tiny_medusa(num_heads=2, own_projection=False)
    model.set_return_hidden(True)
    tokens, labels = make_batch(b=2, s=64)
    labels[:, :-5] = -100  # at most 5 scored positions per row
    hidden = model(tokens).detach().requires_grad_()
    with VocabRows() as mode:
        out = MedusaCrossEntropyLoss(num_output_chunks=1, recompute=False)(hidden, labels, model)
        out.loss.backward()
    scored = [int((labels[:, k:] != -100).sum()) for k in range(3)]  # head k: labels k positions later
    assert out.head_counts.tolist() == scored and scored[0] > 0
    assert 0 < mode.rows <= scored[0]


# ---------------------------------------------------------------------------------------------------------
# Self-distillation


def naive_self_distillation(model, teacher, tokens, labels, weights, head_target):
    student = all_logits(model, tokens)
    with torch.no_grad():
        teacher_base = all_logits(teacher, tokens)[0]
    n = (labels != IGNORE).sum()
    loss, sums, correct, counts = 0.0, [], [], []
    for k in range(student.size(0)):
        lg = student[k].reshape(-1, V)
        tgt = shifted(labels, k).reshape(-1)
        valid = tgt != IGNORE
        # teacher's base prediction at t + k (rows past the end are masked out by `valid`)
        t_lg = torch.cat([teacher_base[:, k:], teacher_base[:, :k]], dim=1).reshape(-1, V)
        if k == 0 or head_target == "teacher_distribution":
            kl = F.kl_div(F.log_softmax(lg, -1), F.log_softmax(t_lg, -1), reduction="none", log_target=True)
            term = (kl.sum(-1) * valid).sum()
        elif head_target == "teacher_argmax":
            term = F.cross_entropy(
                lg, torch.where(valid, t_lg.argmax(-1), IGNORE), ignore_index=IGNORE, reduction="sum"
            )
        else:
            term = F.cross_entropy(lg, tgt, ignore_index=IGNORE, reduction="sum")
        loss = loss + weights[k] * term
        sums.append(term.item())
        acc_target = tgt if (k > 0 and head_target == "labels") else t_lg.argmax(-1)
        c, cnt = naive_stats(lg, acc_target, valid)
        correct.append(c)
        counts.append(cnt)
    return loss / n, sums, correct, counts


@pytest.mark.parametrize("head_target", ["labels", "teacher_argmax", "teacher_distribution"])
@pytest.mark.parametrize("own_projection,recompute", [(True, True), (False, True), (False, False)])
def test_self_distillation_matches_naive(head_target, own_projection, recompute):
    model = tiny_medusa(num_heads=3, own_projection=own_projection, seed=0)
    teacher = tiny_medusa(num_heads=3, own_projection=own_projection, seed=1)  # stands in for adapters-off
    for p in teacher.parameters():
        p.requires_grad_(False)
    tokens, labels = make_batch(seed=6)
    loss_fn = MedusaSelfDistillationLoss(head_target=head_target, num_output_chunks=4, topk=TOPK, recompute=recompute)
    weights = expected_weights(loss_fn, 3)
    teacher.set_return_hidden(True)
    with torch.no_grad():
        teacher_hidden = teacher(tokens)
    ref, ref_grads, ours, our_grads = run_both(
        model,
        tokens,
        labels,
        loss_fn,
        lambda: naive_self_distillation(model, teacher, tokens, labels, weights, head_target),
        teacher_hidden,
        teacher.project,
    )
    torch.testing.assert_close(ours.loss, ref[0].detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(our_grads, ref_grads)
    torch.testing.assert_close(ours.head_loss_sums, torch.tensor(ref[1]), atol=1e-4, rtol=1e-5)
    assert ours.head_topk_correct.tolist() == ref[2]
    assert ours.head_counts.tolist() == ref[3]


def test_self_distillation_of_identical_teacher_is_zero_kl():
    model = tiny_medusa(num_heads=2)
    model.set_return_hidden(True)
    tokens, labels = make_batch(seed=7)
    hidden = model(tokens)
    loss_fn = MedusaSelfDistillationLoss(head_target="labels", heads_coefficient=0.0)
    out = loss_fn(hidden, labels, model, hidden.detach(), model.project)
    assert out.loss.abs().item() < 1e-6
    assert out.head_topk_correct[0, 0] == out.head_counts[0]  # the base agrees with itself everywhere


def test_self_distillation_with_lora_teacher_via_disable_adapter():
    """The recipe's set-up: one model, the teacher is the model with its LoRA adapters disabled, and
    `teacher_project` enters `disable_adapter` itself (also when a chunk is recomputed in backward)."""
    from torchtune.modules.peft import disable_adapter, LoRALinear

    model = tiny_medusa(num_heads=2, own_projection=False)
    lora = LoRALinear(in_dim=TINY["embed_dim"], out_dim=V, rank=4, alpha=8.0)
    with torch.no_grad():
        lora.weight.copy_(model.output.weight)
        lora.lora_b.weight.normal_(0, 0.5)  # non-zero, so that student and teacher differ
    model.output = lora
    tokens, labels = make_batch(seed=10)

    def teacher_project(h, head):
        with disable_adapter(model):
            return model.project(h, head)

    loss_fn = MedusaSelfDistillationLoss(head_target="teacher_distribution", num_output_chunks=3, topk=TOPK)
    weights = expected_weights(loss_fn, 2)
    model.set_return_hidden(True)
    with torch.no_grad(), disable_adapter(model):
        teacher_hidden = model(tokens)
    teacher_copy = tiny_medusa(num_heads=2, own_projection=False)  # the model without its adapters
    teacher_copy.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
    ref, ref_grads, ours, our_grads = run_both(
        model,
        tokens,
        labels,
        loss_fn,
        lambda: naive_self_distillation(model, teacher_copy, tokens, labels, weights, "teacher_distribution"),
        teacher_hidden,
        teacher_project,
    )
    assert ours.head_loss_sums[0] > 1e-3  # the adapters make the student differ from its teacher
    torch.testing.assert_close(ours.loss, ref[0].detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(our_grads, ref_grads)
    assert our_grads["output.lora_b.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# torch.compile


def check_compiled_matches_eager(make_compiled, num_heads=2, num_output_chunks=2):
    torch._dynamo.reset()
    model = tiny_medusa(num_heads=num_heads, own_projection=False)
    model.set_return_hidden(True)
    tokens, labels = make_batch(b=2, s=16, seed=8)
    kwargs = dict(num_output_chunks=num_output_chunks, topk=TOPK)
    eager = MedusaCrossEntropyLoss(**kwargs)(model(tokens), labels, model)
    eager.loss.backward()
    eager_grads = grads(model)
    model.zero_grad(set_to_none=True)
    out = make_compiled(MedusaCrossEntropyLoss(**kwargs))(model(tokens), labels, model)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.head_loss_sums, eager.head_loss_sums, atol=1e-4, rtol=1e-5)
    assert torch.equal(out.head_counts, eager.head_counts)
    assert torch.equal(out.head_topk_correct, eager.head_topk_correct)
    assert_grads_close(grads(model), eager_grads)


def test_compiled_chunk_losses_match_eager():
    """The torchtune way: compile only the per-chunk upcast + cross-entropy."""

    def make_compiled(loss_fn):
        loss_fn.compile_chunk_losses()
        return loss_fn

    check_compiled_matches_eager(make_compiled)


@pytest.mark.slow  # about a minute of inductor compilation on 2 CPU cores
def test_torch_compile_whole_loss_matches_eager():
    """``torch.compile(loss)`` (what torchtune's ``training.compile_loss`` does to an unknown loss) traces the
    checkpointed chunk loop without graph breaks and gives the eager values and gradients."""
    check_compiled_matches_eager(torch.compile, num_heads=1, num_output_chunks=1)


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(decay=0.0), "decay"),
        (dict(decay=-0.8), "decay"),
        (dict(schedule="cosine"), "schedule.*cosine"),
        (dict(num_output_chunks=0), "num_output_chunks.*0"),
        (dict(heads_coefficient=-1.0), "heads_coefficient"),
        (dict(base_loss_weight=-1.0), "base_loss_weight"),
        (dict(topk=(1, 0)), "topk"),
        (dict(topk=()), "topk"),
    ],
)
@pytest.mark.parametrize("cls", [MedusaCrossEntropyLoss, MedusaSelfDistillationLoss])
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="head_target.*soft"):
        MedusaSelfDistillationLoss(head_target="soft")
    loss_fn = MedusaCrossEntropyLoss()
    with pytest.raises(ValueError, match="total_steps"):
        loss_fn.set_step(1, 0)
    model = tiny_medusa(num_heads=2)
    model.set_return_hidden(True)
    tokens, labels = make_batch(seed=9)
    hidden = model(tokens)
    with pytest.raises(ValueError, match=r"labels shape \(3, 23\) does not match hidden shape \(3, 24, 32\)"):
        loss_fn(hidden, labels[:, :-1], model)
    with pytest.raises(ValueError, match="hidden must have shape"):
        loss_fn(hidden[0], labels[0], model)
    with pytest.raises(ValueError, match="num_heads is required"):
        loss_fn(hidden, labels, model.project)
    with pytest.raises(ValueError, match="num_heads must be"):
        loss_fn(hidden, labels, model.project, -1)
    with pytest.raises(ValueError, match="teacher_hidden shape"):
        MedusaSelfDistillationLoss()(hidden, labels, model, hidden[:, :-1].detach(), model.project)
