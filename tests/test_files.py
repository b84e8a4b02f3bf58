# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The one writer of trained-output files: a write that fails midway leaves the old file as it was."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from torchtune_medusa import _files as F


class Unpicklable:
    """Pickling fails after ``torch.save`` has already written part of the file."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(F.TEMP_PREFIX))


def test_failed_torch_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    F.save_torch(path, {"step": 1})
    with pytest.raises(RuntimeError, match="cannot pickle"):
        F.save_torch(path, {"weights": torch.ones(1000), "bad": Unpicklable()})
    assert torch.load(path) == {"step": 1}
    assert _leftovers(tmp_path) == []


def test_failure_after_the_content_is_written_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "medusa_config.json"
    F.write_json(path, {"medusa_num_heads": 3})

    def fsync_fails(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(F.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="No space"):
        F.write_json(path, {"medusa_num_heads": 5})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"medusa_num_heads": 3}
    assert _leftovers(tmp_path) == []


def test_failed_safetensors_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / F.MEDUSA_HEADS_FILE
    F.save_safetensors(path, {"0.0.linear.weight": torch.zeros(2, 2)})

    def replace_fails(src, dst):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(F.os, "replace", replace_fails)
    with pytest.raises(OSError, match="I/O error"):
        F.save_safetensors(path, {"0.0.linear.weight": torch.ones(2, 2)})
    monkeypatch.undo()
    assert torch.equal(load_file(path)["0.0.linear.weight"], torch.zeros(2, 2))
    assert _leftovers(tmp_path) == []


def test_formats_and_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    json_path = F.write_json(tmp_path / "sub" / "m.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json_path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    tree = F.write_json(tmp_path / F.MEDUSA_CHOICES_FILE, {"medusa_choices": [[0]]}, indent=1)
    assert tree.read_text() == '{\n "medusa_choices": [\n  [\n   0\n  ]\n ]\n}\n'
    assert F.write_text(tmp_path / "latest", "step_1\n").read_text() == "step_1\n"
    assert F.write_bytes(tmp_path / "raw", b"\x00\x01").read_bytes() == b"\x00\x01"
    for path in (json_path, tree, tmp_path / "latest"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not tempfile's private 0600


def test_atomic_directory_keeps_the_old_folder_on_failure(tmp_path):
    final = tmp_path / F.epoch_dir_name(0)
    with F.atomic_directory(final) as tmp:
        F.write_text(tmp / "a.txt", "old")
    with pytest.raises(ValueError):
        with F.atomic_directory(final) as tmp:
            F.write_text(tmp / "a.txt", "new")
            raise ValueError("interrupted")
    assert (final / "a.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []
    with F.atomic_directory(final) as tmp:
        F.write_text(tmp / "b.txt", "replaced")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
