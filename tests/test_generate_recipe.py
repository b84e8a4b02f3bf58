# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The medusa_generate recipe end to end on a tiny HF checkpoint, through the tune CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import TINY_CHAT_ARGS, write_tiny_hf_checkpoint

TUNE = str(Path(sys.executable).parent / "tune")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf"))


def tune_run_generate(hf_dir, out, *overrides):
    model_args = [f"model.{k}={v}" for k, v in TINY_CHAT_ARGS.items()]
    cmd = [TUNE, "run", "medusa_generate", "--config", "smollm2/135M_generate",
           "model._component_=torchtune_medusa.models.medusa_smollm2", "model.rope_base=10000", *model_args,
           f"checkpointer.checkpoint_dir={hf_dir}", f"output_dir={out}", "max_new_tokens=12",
           "medusa_choices=chain3", *overrides]
    return subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=600)


def test_generate_recipe_matches_baseline_and_writes_json(hf_dir, tmp_path):
    out = tmp_path / "out"
    result = tune_run_generate(hf_dir, out, "prompts=[hello world,the cat]")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "generate_results.json").read_text())
    assert [r["prompt"] for r in report["results"]] == ["hello world", "the cat"]
    for row in report["results"]:
        assert row["same_tokens_as_baseline"] is True
        assert row["medusa"]["mean_accepted"] >= 1.0
        assert 0 < row["medusa"]["new_tokens"] <= 12
    assert "mean tau" in result.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("acceptance=maybe", "acceptance='maybe'"),
        ("medusa_choices=/nonexistent/tree.json", "no such tree file"),
        ("prompts=[]", "no prompts"),
    ],
)
def test_generate_recipe_bad_input(hf_dir, tmp_path, override, message):
    result = tune_run_generate(hf_dir, tmp_path / "out", override)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
