# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Building an asset into the cache: atomic files (fsync + ``os.replace``), a manifest of sizes, mtimes and hashes
per folder, the up-to-date check, and a lock that serialises concurrent ``prepare`` calls."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from torchtune_medusa.assets._installer import _locate, Carrier
from torchtune_medusa.assets._paths import _TMP_MARK, FORMAT_VERSION, MANIFEST


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
