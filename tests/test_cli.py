# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The `tune` CLI integration, exercised the way users type it: from a directory outside the repository."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from torchtune_medusa import _recipe_registry, _tune_hook

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")


def run(cmd, cwd, timeout=600, env=None):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_registry_files_exist():
    for _entry, recipe_path, configs in _recipe_registry.resolved_recipes().values():
        assert os.path.isfile(recipe_path), recipe_path
        for name, path in configs:
            assert os.path.isfile(path), (name, path)
    listed = {c for entry in _recipe_registry.RECIPES for c in entry.configs}
    on_disk = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert on_disk == listed, "every shipped config must be registered with tune, and only those"


def test_startup_hook_imports_neither_torch_nor_torchtune(tmp_path):
    code = (
        "import sys; assert 'torchtune_medusa._tune_hook' in sys.modules, 'the .pth hook did not run'; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchtune')))"
    )
    assert run([sys.executable, "-c", code], cwd=tmp_path).strip() == "[]"


def test_hook_never_breaks_tune(capsys):
    class BrokenRegistry:  # no _ALL_RECIPES: registration fails
        pass

    _tune_hook._register(BrokenRegistry())
    assert "could not register recipes" in capsys.readouterr().err


def test_hook_tolerates_missing_torchtune(tmp_path):
    code = (
        "import sys; sys.modules['torchtune'] = None\n"  # makes `import torchtune` raise ImportError
        "import importlib, torchtune_medusa._tune_hook as hook; importlib.reload(hook)\n"
        "try:\n    import torchtune._recipe_registry\nexcept ImportError:\n    print('ok')\n"
    )
    assert run([sys.executable, "-c", code], cwd=tmp_path).strip() == "ok"


def test_tune_ls_cat_cp(tmp_path):
    listing = run([TUNE, "ls"], cwd=tmp_path)
    assert "medusa_finetune" in listing
    for config in ("llama3_3/llama_medusa.yaml", "smollm2/135M_medusa"):
        assert config in listing

    assert "medusa_llama3_3_70b" in run([TUNE, "cat", "llama3_3/llama_medusa.yaml"], cwd=tmp_path)

    run([TUNE, "cp", "llama3_3/llama_medusa.yaml", str(tmp_path / "some/dir/x.yaml"), "--make-parents"], cwd=tmp_path)
    shipped = (REPO / "configs/llama3_3/llama_medusa.yaml").read_text()
    assert (tmp_path / "some/dir/x.yaml").read_text() == shipped

    run([TUNE, "cp", "medusa_finetune", "my_recipe"], cwd=tmp_path)
    assert (tmp_path / "my_recipe.py").read_text() == (REPO / "recipes/medusa_finetune.py").read_text()


def test_python_m_fallback_lists_recipes(tmp_path):
    assert "medusa_finetune" in run(
        [sys.executable, "-S", "-m", "torchtune_medusa", "ls"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )


@pytest.mark.slow
def test_wheel_install_outside_repo(tmp_path):
    """A normal (non-editable) install: build the wheel and install it into a fresh environment whose only
    other packages are this environment's dependencies."""
    wheel_dir = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(REPO)],
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("torchtune_medusa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "torchtune_medusa_tune.pth" in names
    assert "torchtune_medusa/recipes/medusa_finetune.py" in names
    assert "torchtune_medusa/configs/llama3_3/llama_medusa.yaml" in names
    assert not any(n.startswith(("recipes/", "configs/", "tests/")) for n in names), "no top-level recipes package"

    env_dir = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=tmp_path)
    env_python = str(env_dir / "bin" / "python")
    purelib = run([env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    purelib = Path(purelib.strip())
    # Dependencies (torch, torchtune, ...) come from this environment's site-packages, appended after the wheel.
    (purelib / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(purelib), str(wheel)], cwd=tmp_path)

    tune = [env_python, "-m", "torchtune._cli.tune"]
    where = run([env_python, "-c", "import torchtune_medusa; print(torchtune_medusa.__file__)"], cwd=tmp_path)
    assert where.strip().startswith(str(purelib)), where
    assert "llama3_3/llama_medusa.yaml" in run(tune + ["ls"], cwd=tmp_path)
    run(tune + ["cp", "smollm2/135M_medusa", "copied.yaml"], cwd=tmp_path)
    assert (tmp_path / "copied.yaml").read_text() == (REPO / "configs/smollm2/135M_medusa.yaml").read_text()


@pytest.mark.parametrize("launcher", [[], ["--nproc_per_node", "2"]], ids=["single_process", "torchrun_2"])
def test_tune_run_outside_repo(smollm2_assets, tmp_path, launcher):
    """The embedded default config, cut to two steps on 16 conversations (the full run is `make demo`)."""
    quick = ["epochs=1", "max_steps_per_epoch=2", "dataset.split=train[:16]", "validation=null"]
    run(
        [
            TUNE,
            "run",
            *launcher,
            "medusa_finetune",
            "--config",
            "smollm2/135M_medusa",
            f"output_dir={tmp_path / 'out'}",
            *quick,
        ],
        cwd=tmp_path,
    )
    assert (tmp_path / "out" / "epoch_0" / "medusa_lm_head.safetensors").is_file()


def test_torchao_cpp_warning_is_silenced(tmp_path):
    """Issue 14.13: every command printed torchao's warning about its C++ extensions (unused here)."""
    code = (
        "import logging, torchtune_medusa.models\n"
        "logging.getLogger('torchao').warning('another torchao warning')\n"  # other messages are kept
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for flags in ([], ["-S"]):  # through the .pth start-up hook, and through the package import
        cmd = [sys.executable, *flags, "-c", code]
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert "Skipping import of cpp extensions" not in result.stderr
        assert "another torchao warning" in result.stderr
