# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""``torchtune_medusa.load_medusa`` on tiny run folders (no assets), and the README's decoding example run as
written."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.common import TINY_CHAT_ARGS, tiny_chat_medusa, write_tiny_hf_checkpoint, write_tiny_run
from torchtune_medusa import load_medusa, MedusaRun
from torchtune_medusa._load import latest_epoch_dir, load_hf_base
from torchtune_medusa.data import SmolLM2Tokenizer

REPO = Path(__file__).resolve().parents[1]
README_RUN = "output/smollm2_135m_medusa"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_tiny_run(root, epochs=[1], tree=[(0,)])
    return write_tiny_run(root, epochs=[10], tree=[(0,), (1,), (0, 0)])  # 10 > 1: numbers, not names, are compared


def _tokens(n: int = 9) -> torch.Tensor:
    return torch.arange(3, 3 + n).unsqueeze(0)


def test_load_medusa_reads_the_latest_epoch(run_dir):
    run = load_medusa(run_dir)
    assert isinstance(run, MedusaRun) and run.checkpoint_dir == run_dir / "epoch_10"
    assert run.medusa_choices == [(0,), (1,), (0, 0)]
    assert run.medusa_config["medusa_num_heads"] == 3 and run.medusa_config["medusa_projection"] == "own"
    assert isinstance(run.tokenizer, SmolLM2Tokenizer)
    assert not run.model.training
    expected = tiny_chat_medusa(seed=10)  # the weights epoch_10 was written from, bit for bit
    got = run.model.state_dict()
    assert set(got) == set(expected.state_dict())
    for key, value in expected.state_dict().items():
        assert torch.equal(got[key], value), key
    with torch.no_grad():
        a, b = run.model(_tokens()), expected(_tokens())
    assert torch.equal(a.logits, b.logits) and torch.equal(a.medusa_logits, b.medusa_logits)
    # an epoch folder itself, and a folder without a tree
    (run_dir / "epoch_1" / "medusa_choices.json").rename(run_dir / "epoch_1" / "other.json")
    try:
        run1 = load_medusa(run_dir / "epoch_1")
    finally:
        (run_dir / "epoch_1" / "other.json").rename(run_dir / "epoch_1" / "medusa_choices.json")
    assert run1.checkpoint_dir == run_dir / "epoch_1" and run1.medusa_choices is None


@pytest.mark.parametrize(
    "dtype, expected", [(None, torch.float32), ("bf16", torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
)
def test_load_medusa_dtype(run_dir, dtype, expected):
    model = load_medusa(run_dir, device="cpu", dtype=dtype).model
    assert {p.dtype for p in model.parameters()} == {expected}


def test_shared_heads_and_sharded_base(tmp_path):
    """Medusa-2 runs write the merged base as torchtune's HF shards next to the LoRA adapter; shared heads have no
    projection of their own."""
    run = write_tiny_run(tmp_path / "run", epochs=[0], projection="shared", tree=None)
    folder = run / "epoch_0"
    full = load_file(str(folder / "model.safetensors"))
    keys = sorted(full)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        save_file({k: full[k] for k in part}, str(folder / f"model-0000{i}-of-00002.safetensors"))
    (folder / "model.safetensors").unlink()
    save_file({"base_model.model.layers.0.lora_A.weight": torch.ones(2, 2)}, str(folder / "adapter_model.safetensors"))
    loaded = load_medusa(run)
    assert loaded.medusa_config["medusa_projection"] == "shared" and loaded.medusa_choices is None
    expected = tiny_chat_medusa(seed=0, projection="shared")
    with torch.no_grad():
        assert torch.equal(loaded.model(_tokens()).medusa_logits, expected(_tokens()).medusa_logits)


def test_load_hf_base_is_the_plain_model(tmp_path):
    from torchtune_medusa.models import smollm2

    folder = write_tiny_hf_checkpoint(tmp_path / "hf", seed=3)
    model = load_hf_base(folder)
    torch.manual_seed(3)
    expected = smollm2(**TINY_CHAT_ARGS, rope_base=10_000).eval()
    with torch.no_grad():
        assert torch.equal(model(_tokens()), expected(_tokens()))


def test_errors_name_the_path_and_the_fix(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}: no such directory; give the output_dir"):
        load_medusa(tmp_path / "missing")
    (tmp_path / "logs").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither model weights nor epoch_N folders: give the output_dir"):
        load_medusa(tmp_path)
    base_only = write_tiny_hf_checkpoint(tmp_path / "base_only")
    with pytest.raises(FileNotFoundError, match=r"base_only/medusa_config.json is missing; it is written with"):
        load_medusa(base_only)
    with pytest.raises(ValueError, match="dtype='fp8' is not a decoding dtype; choose auto, float32"):
        load_medusa(run_dir, dtype="fp8")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "epoch_10", broken)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"broken/config.json is missing; an HF-format model folder"):
        load_medusa(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'; load_medusa builds Llama-architecture models"):
        load_medusa(broken)
    shutil.copy(run_dir / "epoch_10" / "config.json", broken / "config.json")
    (broken / "medusa_choices.json").write_text('{"medusa_choices": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]}')
    with pytest.raises(ValueError, match="the tree is 4 deep but medusa_config.json has 3 heads"):
        load_medusa(broken)


def test_latest_epoch_dir(tmp_path):
    for n in (0, 2, 10):
        (tmp_path / f"epoch_{n}").mkdir()
        (tmp_path / f"epoch_{n}" / "model.safetensors").write_bytes(b"")
    (tmp_path / "epoch_x").mkdir()
    assert latest_epoch_dir(tmp_path) == tmp_path / "epoch_10"
    assert latest_epoch_dir(tmp_path / "epoch_2") == tmp_path / "epoch_2"


def readme_python_example() -> str:
    """The README's Python decoding example (the python block that calls load_medusa)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    examples = [b for b in blocks if "load_medusa(" in b]
    assert len(examples) == 1, "the README has one Python decoding example with load_medusa"
    return examples[0]


def test_readme_decoding_example_runs_as_written(run_dir, capsys):
    """Issue 15.1: the README's snippet left ``model`` undefined. It runs here with only the run folder swapped for
    a tiny one; its own assert checks that Medusa decoding gave the greedy output."""
    code = readme_python_example()
    assert README_RUN in code
    exec(compile(code.replace(README_RUN, str(run_dir)), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"tau \d+\.\d\d, \d+\.\d tokens/s", printed)
