# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Decoding settings with defaults measured on the machines this package targets.

``"auto"`` means (see the README's decoding measurements for the numbers behind each choice):

* dtype: bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), fp32
  elsewhere. On such a CPU a bf16 tree step of 8 tokens costs about what a 1-token step does, and the 1-token step
  itself is faster than fp32's; without native bf16, bf16 matmuls are emulated and slower.
* threads: every usable core but one. Intra-op threads synchronise at every matmul, so when another process
  holds one of them each call waits a scheduler slice; leaving a core free keeps decoding steady on a shared machine.
* compile: on, except for bf16 on a CPU that computes it natively. There the eager step runs its linear layers on
  weights prepacked once for oneDNN (:mod:`~torchtune_medusa.generation._packing`) and attends only over the filled
  cache slots, and it was the fastest step at every tree size we timed: SmolLM2 with 1 thread, context 256, side
  by side, 59.6 ms for 1 token and 94.6 ms for 16, against 63.1 and 106.2 ms compiled (whose static cache is
  attended in full) and 80.6 and 128.1 ms eager without prepacking (``benchmarks/step_cost.py --compile on,off
  --packing on,off``). It also saves the compile: about a minute per tree size on 2 cores.
  On GPUs, and in fp32 on CPU, the compiled step (with inductor's freezing, which prepacks on CPU) stays.
"""

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from torchtune_medusa.generation._packing import packing_supported


def native_bf16(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether ``device`` computes bf16 matmuls natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def decode_dtype(name: str = "auto", device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """``"auto"``, ``"float32"``/``"fp32"`` or ``"bfloat16"``/``"bf16"`` as a dtype.

    Raises:
        ValueError: for any other name.
    """
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not a decoding dtype; choose auto, float32 (fp32) or bfloat16 (bf16)")
    return DTYPES[name]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decode_threads(threads: Union[int, str] = "auto") -> int:
    """``"auto"`` (every usable core but one, at least 1) or a positive thread count.

    Raises:
        ValueError: for a count below 1 or another string.
    """
    if threads == "auto":
        return max(1, usable_cores() - 1)
    if isinstance(threads, str) and threads.isdigit():
        threads = int(threads)
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: pass a positive number of threads or 'auto'")
    return threads


def decode_compile(
    compile: Union[bool, str] = "auto", device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None
) -> bool:
    """``"auto"`` (see the module docstring), or a bool (``"on"``/``"off"``/``"true"``/``"false"`` too).

    Args:
        compile (Union[bool, str]): the setting.
        device (Union[str, torch.device]): where decoding runs.
        dtype (Optional[torch.dtype]): the decoding dtype; None: :func:`decode_dtype`'s ``"auto"`` for ``device``.

    Raises:
        ValueError: for anything else.
    """
    if compile == "auto":
        device = torch.device(device)
        dtype = decode_dtype("auto", device) if dtype is None else dtype
        if device.type == "cpu" and packing_supported(torch.empty(0, dtype=dtype)):
            return False  # the prepacked eager step is faster, and needs no compile
        return device.type in ("cuda", "cpu")
    if isinstance(compile, bool):
        return compile
    words = {"on": True, "true": True, "off": False, "false": False}
    if isinstance(compile, str) and compile.lower() in words:
        return words[compile.lower()]
    raise ValueError(f"compile={compile!r}: pass auto, on or off")


@dataclass(frozen=True)
class DecodeSettings:
    """Resolved decode settings (what :func:`decode_settings` returns).

    Attributes:
        dtype (torch.dtype): the model's dtype for decoding.
        threads (int): torch CPU threads (ignored by the caller on GPUs).
        compile (bool): whether to ``torch.compile`` the decoding step.
    """

    dtype: torch.dtype
    threads: int
    compile: bool


def decode_settings(
    device: Union[str, torch.device] = "cpu",
    *,
    dtype: str = "auto",
    threads: Union[int, str] = "auto",
    compile: Union[bool, str] = "auto",
) -> DecodeSettings:
    """Resolve ``"auto"`` (and explicit) decode settings for ``device``, as the generate recipe does.

    Example:
        >>> settings = decode_settings("cpu", compile="off")
        >>> torch.set_num_threads(settings.threads)
        >>> out = medusa_generate(model.to(settings.dtype), prompts, compile=settings.compile)

    Args:
        device (Union[str, torch.device]): the device decoding runs on. Default ``"cpu"``.
        dtype (str): ``"auto"``, ``"fp32"``/``"float32"`` or ``"bf16"``/``"bfloat16"``. Default ``"auto"``.
        threads (Union[int, str]): ``"auto"`` or a positive count. Default ``"auto"``.
        compile (Union[bool, str]): ``"auto"``, a bool, ``"on"`` or ``"off"``. Default ``"auto"``.

    Returns:
        DecodeSettings: the resolved dtype, thread count and compile flag (see the module docstring for why
        ``"auto"`` picks what it picks).

    Raises:
        ValueError: a value the settings do not accept (the message names it).
    """
    resolved = decode_dtype(dtype, device)
    return DecodeSettings(
        dtype=resolved, threads=decode_threads(threads), compile=decode_compile(compile, device, resolved)
    )
