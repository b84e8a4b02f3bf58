# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The medusa_generate recipe end to end on a tiny HF checkpoint, through the tune CLI (and in-process)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.common import TINY_CHAT_ARGS, write_tiny_hf_checkpoint, write_tiny_run
from torchtune_medusa.generation._tree import MC_SIM_7B_63

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf"))


def tiny_overrides(hf_dir, out, tree="chain3"):
    """The shipped smollm2/135M_generate config on the tiny checkpoint (3 heads, as shipped), in fp32 (lossless,
    bit for bit) and eager (no compile time in tests)."""
    model_args = [f"model.{k}={v}" for k, v in TINY_CHAT_ARGS.items()]
    return ["model._component_=torchtune_medusa.models.medusa_smollm2", "model.rope_base=10000", *model_args,
            f"checkpointer.checkpoint_dir={hf_dir}", f"output_dir={out}", "max_new_tokens=12",
            "dtype=fp32", "compile=off",
            *([f"medusa_choices={tree}"] if tree else [])]  # fmt: skip


def tune_run_generate(hf_dir, out, *overrides, tree="chain3"):
    cmd = [TUNE, "run", "medusa_generate", "--config", "smollm2/135M_generate", *tiny_overrides(hf_dir, out, tree),
           *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=600)


def test_generate_recipe_matches_baseline_and_writes_json(hf_dir, tmp_path):
    out = tmp_path / "out"
    result = tune_run_generate(hf_dir, out, "prompts=[hello world,the cat]")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "generate_results.json").read_text())
    assert [r["prompt"] for r in report["results"]] == ["hello world", "the cat"]
    for row in report["results"]:
        assert row["same_tokens_as_baseline"] is True
        steps = row["medusa"]["accepted_per_step"]  # the prefill's token, then each step's accepted + bonus
        assert row["medusa"]["mean_accepted"] == pytest.approx(sum(steps) / len(steps))
        assert 1 + sum(steps[:-1]) < row["medusa"]["new_tokens"] <= min(12, 1 + sum(steps))
        assert row["medusa"]["lookup_accepted"] <= row["medusa"]["new_tokens"]
    assert "mean tau" in result.stdout and "tokens from lookup drafts" in result.stdout


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


def _recipe_module():
    spec = importlib.util.spec_from_file_location("medusa_generate_recipe", REPO / "recipes" / "medusa_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe_mod = _recipe_module()


def recipe_cfg(hf_dir, out, *overrides, tree="chain3"):
    cfg = OmegaConf.load(REPO / "configs" / "smollm2" / "135M_generate.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([*tiny_overrides(hf_dir, out, tree), *overrides]))


def run_recipe(cfg):
    """The recipe's main, in-process (without ``config.parse``): its exit status."""
    return recipe_mod.main.__wrapped__(cfg)


def test_shipped_config_runs_as_shipped(hf_dir, tmp_path):
    """Issue 14.2: the shipped config's mc_sim_7b_63 (depth 4) failed with its 3 heads, after the model loaded."""
    out = tmp_path / "out"
    result = tune_run_generate(hf_dir, out, "prompts=[hello world]", tree=None)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "generate_results.json").read_text())
    assert report["config"]["medusa_choices"] is None and report["config"]["run_dir"] is None
    assert report["results"][0]["same_tokens_as_baseline"] is True
    # no run_dir, no tree given: mc_sim_7b_63 cut to the heads' depth, like medusa_generate's own default
    mc = recipe_mod.choose_tree("mc_sim_7b_63", num_heads=3)
    assert max(map(len, mc)) == 3 and set(mc) == {tuple(p) for p in MC_SIM_7B_63 if len(p) <= 3}
    assert report["medusa_choices"] == [list(p) for p in mc]
    assert recipe_mod.choose_tree("chain5", num_heads=3) == [(0,), (0, 0), (0, 0, 0)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run dir with epoch_0 and epoch_2 (trees differ), as medusa_finetune leaves it."""
    root = tmp_path_factory.mktemp("tiny_run")
    write_tiny_run(root, epochs=[0], tree=[(0,)])
    return write_tiny_run(root, epochs=[2], tree=[(0,), (1,), (0, 0)])


def test_run_dir_loads_the_latest_epoch_with_its_tree(tiny_run, tmp_path):
    """Issue 15.1: the command takes the run dir; the latest epoch's heads, tokenizer and tree are used."""
    out = tmp_path / "out"
    cfg = recipe_cfg(tiny_run, out, f"run_dir={tiny_run}", "prompts=[hello world]", "checkpointer.checkpoint_dir=/nope",
                     "tokenizer.path=/nope", tree=None)  # fmt: skip
    assert run_recipe(cfg) == 0
    report = json.loads((out / "generate_results.json").read_text())
    assert report["medusa_choices"] == [[0], [1], [0, 0]]  # epoch_2's saved tree, not epoch_0's
    row = report["results"][0]
    assert row["same_tokens_as_baseline"] is True and row["medusa"]["new_tokens"] == 12
    # an explicit tree wins over the saved one, and is checked against the run's heads
    cfg = recipe_cfg(tiny_run, out, f"run_dir={tiny_run}", "prompts=[hello world]", tree="chain2")
    assert run_recipe(cfg) == 0
    assert json.loads((out / "generate_results.json").read_text())["medusa_choices"] == [[0], [0, 0]]
    cfg = recipe_cfg(tiny_run, out, f"run_dir={tiny_run}", "medusa_choices=[[0],[0,0],[0,0,0],[0,0,0,0]]", tree=None)
    with pytest.raises(ValueError, match="has depth 4 but the model has only 3 Medusa heads"):
        run_recipe(cfg)
    with pytest.raises(FileNotFoundError, match="neither model weights nor epoch_N folders"):
        run_recipe(recipe_cfg(tiny_run, out, f"run_dir={tmp_path}", tree=None))


def _bad_tree_file(tmp_path):
    bad = tmp_path / "tree.json"
    bad.write_text("[[0], [0, 0]")  # cut short
    return bad


@pytest.mark.parametrize(
    "override, error, message",
    [
        # a tree given as paths or a file must fit the heads: named, with the fix (issue 14.2)
        ("medusa_choices=[[0],[0,0],[0,0,0],[0,0,0,0]]", ValueError, r"path \[0, 0, 0, 0\] has depth 4 but the model "
         r"has only 3 Medusa heads \(model.medusa_num_heads\); give a tree calibrated for these heads"),
        ("medusa_choices=[[0],[3,1]]", ValueError, r"path \[3, 1\] needs its prefix \[3\]"),
        ("medusa_choices=chian3", ValueError, r"medusa_choices='chian3': unknown tree name"),
        # a tree file that is not JSON names the file (issue 14.8)
        ("medusa_choices={bad_tree}", ValueError, r"the tree file .*tree.json is not JSON .*; give a tree name"),
        ("medusa_choices=/nonexistent/tree.json", FileNotFoundError, "no such tree file"),
        # temperature=-1 decoded greedily (issue 14.7)
        ("temperature=-1", ValueError, r"temperature=-1: must be a number >= 0 \(0 = greedy"),
        ("lookup_tokens=-1", ValueError, r"lookup_tokens=-1: must be an integer >= 0"),
        ("lookup_ngram=[3,2]", ValueError, r"lookup_ngram must be \[shortest, longest\] suffix lengths"),
        ("prompt_file=/nonexistent/prompts.txt", FileNotFoundError, "prompt_file='/nonexistent/prompts.txt' does not"),
        ("prompt_file={bad_jsonl}", ValueError, r"prompts.jsonl' line 2 is not a ShareGPT record"),
    ],
)  # fmt: skip
def test_inputs_are_checked_before_the_model_loads(hf_dir, tmp_path, override, error, message):
    """Issue 14.9: the tree and the prompt file were checked only after the model had loaded. The checkpoint folder
    does not exist here, so these errors come first or not at all."""
    bad_jsonl = tmp_path / "prompts.jsonl"
    bad_jsonl.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n{"id": 1}\n')
    override = override.format(bad_tree=_bad_tree_file(tmp_path), bad_jsonl=bad_jsonl)
    cfg = recipe_cfg(hf_dir, tmp_path / "out", override, "checkpointer.checkpoint_dir=/nonexistent/model",
                     f"tokenizer.path={hf_dir}")  # fmt: skip
    with pytest.raises(error, match=message):
        run_recipe(cfg)
    # and through the CLI, with a real checkpoint, before any decoding
    if override.startswith("temperature"):
        result = tune_run_generate(hf_dir, tmp_path / "out", override)
        assert result.returncode != 0 and "temperature=-1" in result.stderr and ">>>" not in result.stdout


def test_a_failing_prompt_keeps_the_others(hf_dir, tmp_path):
    """Issue 14.9: a too-long prompt after two decoded ones ended the run without generate_results.json."""
    long_prompt = " ".join(["hello world"] * 200)  # far beyond the tiny model's max_seq_len of 256
    out = tmp_path / "out"
    cfg = recipe_cfg(hf_dir, out, "compare_baseline=false")
    cfg.prompts = ["hello world", long_prompt, "the cat"]
    assert run_recipe(cfg) == 1
    report = json.loads((out / "generate_results.json").read_text())
    rows = report["results"]
    assert [r["prompt"] for r in rows] == cfg.prompts and report["failed"] == 1
    assert "error" not in rows[0] and "error" not in rows[2] and rows[0]["text"] and rows[2]["medusa"]
    assert "tokens but the KV cache can hold only 256" in rows[1]["error"]
    assert report["mean_tau"] == (rows[0]["medusa"]["mean_accepted"] + rows[2]["medusa"]["mean_accepted"]) / 2


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_heads_file_is_named(hf_dir, tmp_path, damage):
    """Issue 14.8: a truncated or garbage medusa_lm_head.safetensors ended in a bare SafetensorError."""
    from tests.common import tiny_medusa
    from torchtune_medusa.models import export_heads

    heads = tmp_path / "heads"
    export_heads(tiny_medusa(own_projection=False), heads, format="torchtune")
    path = heads / "medusa_lm_head.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    cfg = recipe_cfg(hf_dir, tmp_path / "out", f"checkpointer.medusa_checkpoint_dir={heads}")
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file.*truncated or corrupt"):
        run_recipe(cfg)


def test_compiled_decoding_is_compiled_before_it_is_timed(hf_dir, tmp_path, monkeypatch):
    warmed = []
    real = recipe_mod.MedusaGenerateRecipe.warm_up

    def spy(self, tokens, cfg):
        warmed.append(len(tokens))
        return real(self, tokens, cfg)

    monkeypatch.setattr(recipe_mod.MedusaGenerateRecipe, "warm_up", spy)
    cfg = recipe_cfg(hf_dir, tmp_path / "out", "compile=on", "prompts=[hello world,the cat]")
    assert run_recipe(cfg) == 0
    report = json.loads((tmp_path / "out" / "generate_results.json").read_text())
    assert len(warmed) == 1  # once, on the first prompt, before any row is decoded and timed
    assert all(r["same_tokens_as_baseline"] is True for r in report["results"])  # fp32: compiled is exact too
