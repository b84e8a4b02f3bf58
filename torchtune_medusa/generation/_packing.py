# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""bf16 linear layers with their weights prepacked once for oneDNN, for eager decoding on CPU.

torch's bf16 ``F.linear`` on CPU runs a oneDNN matmul that first reorders the weight into oneDNN's blocked layout,
at every call. At decoding sizes the reorder costs about as much as the product (SmolLM2's 576 -> 1536 layer on
one core: 0.117 ms a call at 1 row, 0.061 ms prepacked; its 49k-token output layer 7.1 ms vs 3.4 ms). Within a
decoding call the weights never change, so :func:`packed_linears` reorders each one once, on entry, and runs the
same oneDNN kernel on the packed copy: the results are bit-identical to ``F.linear``'s. Compiled steps get the
same effect from inductor's freezing and are left alone.

fp32 layers are not packed: fp32 ``F.linear`` runs MKL's GEMM, and a oneDNN one would change the bits (the fp32
lossless guarantee rests on the GEMM giving each row the same result whatever the number of rows).
"""

import contextlib
import os
import types
import weakref
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Benchmarks switch this off to time the unpacked path.
USE_PACKED_LINEAR = True
# The packed copies must leave this fraction of the free memory free (an 8B model's second copy would not fit).
_MAX_FRACTION_OF_FREE_MEMORY = 0.5


def packing_supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be prepacked: a bf16 CPU tensor, with a oneDNN build that computes bf16 natively."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def packing_enabled(weight: torch.Tensor) -> bool:
    """Whether eager decoding prepacks ``weight``: :func:`packing_supported` and :data:`USE_PACKED_LINEAR`."""
    return USE_PACKED_LINEAR and packing_supported(weight)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` reordered once for oneDNN, for :func:`packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # batch-size hint: decoding's one row


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on :func:`pack_weight` ``(weight)``, bit for bit."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _free_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume it fits
        return 1 << 62


def _targets(model: nn.Module) -> List[Tuple[nn.Module, torch.Tensor]]:
    """``(module whose forward to replace, its weight)``: every bf16 ``nn.Linear``, and the linear behind a
    torchtune ``TiedLinear`` output (tied embeddings)."""
    targets = [(m, m.weight) for m in model.modules() if type(m) is nn.Linear and packing_enabled(m.weight)]
    output = getattr(model, "output", None)
    tied = getattr(output, "tied_module", None)
    if tied is not None and isinstance(getattr(output, "linear", None), nn.Module) and packing_enabled(tied.weight):
        targets.append((output.linear, tied.weight))
    return [(m, w) for m, w in targets if "forward" not in vars(m)]  # not twice (a nested scope keeps the outer)


def _linear_forward(packed: torch.Tensor) -> Callable:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, packed, self.bias)

    return forward


def _tied_forward(packed: torch.Tensor, weight: torch.Tensor) -> Callable:
    def forward(self: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, packed) if w is weight else F.linear(x, w)

    return forward


# Packed copies kept with their model between decoding calls (packing SmolLM2 takes ~0.1 s, a few steps' time),
# with the weights' versions they were made from.
_KEPT: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, List[torch.Tensor]]]" = weakref.WeakKeyDictionary()


def _weights_version(weights: List[torch.Tensor]) -> Optional[tuple]:
    """Changes whenever a weight is updated in place, replaced or cast; None for inference tensors, whose in-place
    updates leave no trace (their packed copies are never kept)."""
    try:
        return tuple((w.data_ptr(), w.dtype, w._version) for w in weights)
    except RuntimeError:
        return None


def release_packed_weights(model: nn.Module) -> None:
    """Drop the packed copies kept for ``model`` (they are rebuilt at its next eager bf16 decoding call)."""
    _KEPT.pop(model, None)


@contextlib.contextmanager
def packed_linears(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's bf16 linear layers on CPU run on weights prepacked for oneDNN (see the module
    docstring); their forwards are restored on exit. Nothing is packed when the CPU lacks native bf16, when
    :data:`USE_PACKED_LINEAR` is off, or when the packed copies would take more than half the free memory.

    The packed copies stay with the model (weakly: they go with it) for the next call, until a weight changes (an
    optimizer step, a cast, a reload): a decoding loop packs once. :func:`release_packed_weights` frees them.
    """
    targets = _targets(model)
    weights = [w for _, w in targets]
    version = _weights_version(weights)
    kept = _KEPT.get(model)
    if targets and kept is not None and version is not None and kept[0] == version:
        packed = kept[1]
    elif sum(w.numel() * w.element_size() for w in weights) > _MAX_FRACTION_OF_FREE_MEMORY * _free_memory_bytes():
        targets, packed = [], []
    else:
        _KEPT.pop(model, None)  # the old copies go before the new ones are made
        packed = [pack_weight(w) for w in weights]
        if targets and version is not None:
            _KEPT[model] = (version, packed)
    for (module, weight), p in zip(targets, packed):
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_linear_forward(p), module)
        else:
            module.forward = types.MethodType(_tied_forward(p, weight), module)
    try:
        yield
    finally:
        for module, _ in targets:
            del module.forward
