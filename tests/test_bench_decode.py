# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""benchmarks/bench_decode.py, the benchmark of the README's main job: it runs, checks lossless output, reads
held-out chat prompts the way self-distillation writes them, and finds the trained tree of a training run."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torchtune.data import Message

from torchtune_medusa.data import smollm2_tokenizer
from torchtune_medusa.generation import _packing

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_end_to_end_writes_results(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--model", "tiny", "--num-heads", "3", "--num-prompts", "2", "--max-new-tokens", "12", "--repeats", "1"]
    argv += ["--step-sizes", "1,4", "--context-len", "16", "--cost-repeats", "1", "--threads", "1"]
    argv += [
        "--max-nodes",
        "8",
        "--trees",
        "chain1,calibrated",
        "--lookup-tokens",
        "4,0",
        "--out",
        str(out),
        "--dtype",
        "float32",
        "--compile",
        "off",
    ]
    assert bench.main(argv) == 0
    res = json.loads((out / "bench_decode.json").read_text())
    assert (out / "bench_decode.png").stat().st_size > 0
    # every tree with each lookup setting, side by side: the first setting under the tree's own name
    assert {"chain1", "chain1@lookup0"} <= set(res["trees"])
    assert set(res["trees"]) <= {"chain1", "chain1@lookup0", "calibrated", "calibrated@lookup0"}
    for name, tree in res["trees"].items():
        assert tree["greedy_output_equals_baseline"] is True
        assert tree["tau"] > 1.0 and tree["speedup"] > 0  # the tiny heads are trained: some guesses are accepted
        assert tree["lookup_tokens"] == (0 if name.endswith("@lookup0") else 4)
        assert 0.0 <= tree["lookup_step_fraction"] <= 1.0 and 0.0 <= tree["lookup_token_fraction"] <= 1.0
        if tree["lookup_tokens"] == 0:
            assert tree["lookup_step_fraction"] == tree["lookup_token_fraction"] == 0.0
    assert res["settings"] == {"dtype": "float32", "threads": 1, "compile": False}
    assert res["proposal_vocab_size"] is None
    assert res["quality_vs_fp32"] is None  # fp32 is the reference itself
    assert len(res["head_top1"]) == 3 and all(0.0 <= a <= 1.0 for a in res["head_top1"])
    assert res["prompts"] == {"source": "built-in", "count": 2, "lengths": res["prompts"]["lengths"]}
    printed = capsys.readouterr().out
    assert "head top-1 accuracy" in printed and "chain1" in printed


def test_bf16_quality_report_and_the_legacy_step_side_by_side(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--model", "tiny", "--num-heads", "2", "--num-prompts", "2", "--max-new-tokens", "10", "--repeats", "1"]
    argv += ["--step-sizes", "1,3", "--context-len", "16", "--cost-repeats", "1", "--threads", "1", "--max-nodes", "4"]
    argv += [
        "--trees",
        "chain1",
        "--dtype",
        "bfloat16",
        "--quality-prompts",
        "3",
        "--compare-legacy",
        "--compile",
        "off",
    ]
    assert bench.main([*argv, "--legacy-threads", "1", "--out", str(out)]) == 0  # bf16 output may differ: no error
    res = json.loads((out / "bench_decode.json").read_text())
    # the calibrated tree is not timed here: it and the head accuracies come from the timed baseline outputs
    assert len(res["head_top1"]) == 2 and "medusa_choices" in res["calibrated_tree"]
    assert (out / "calibrated_tree.json").exists()
    q = res["quality_vs_fp32"]
    assert q["prompts"] == 3 and q["tree"] == "chain1"
    for who in ("baseline", "medusa"):
        assert len(q[who]["tokens_before_divergence"]) == 3
        assert all(0 <= n <= 10 for n in q[who]["tokens_before_divergence"])
        assert 0.0 <= q[who]["fp32_greedy_agreement"] <= 1.0 and q[who]["fp32_nll_per_token"] >= 0.0
    legacy = res["step_cost"]["legacy"]
    assert (
        legacy["dtype"] == "float32" and legacy["attention"] == "torchtune" and set(legacy["step_cost_s"]) == {"1", "3"}
    )
    assert res["step_cost"]["T1_speedup_over_legacy"] > 0
    printed = capsys.readouterr().out
    assert "tokens before the first difference" in printed and "legacy path" in printed


def test_fp32_scores_count_the_reference_models_own_greedy_tokens(bench):
    """Teacher-forced scoring agrees with cached greedy decoding of the same fp32 model: every token of its own
    output is its greedy choice; a token changed to another one is a miss and costs likelihood."""
    model, _ = bench._tiny_model(2)
    prompt = [5, 9, 17, 3]
    out = bench.generate(model, [prompt], max_new_tokens=12).tokens[0]
    matches, nll = bench.fp32_scores(model, prompt, out)
    assert matches == len(out) == 12 and nll > 0.0
    changed = out[:-1] + [(out[-1] + 1) % 128]
    matches_changed, nll_changed = bench.fp32_scores(model, prompt, changed)
    assert matches_changed == len(out) - 1 and nll_changed > nll
    assert bench.fp32_scores(model, prompt, []) == (0, 0.0)


def test_quality_report_reuses_the_timed_outputs(bench, monkeypatch):
    """Prompts the timed runs decoded are not decoded again in bf16: the report is the same, with fewer decodes."""
    model, _ = bench._tiny_model(2)
    reference = model
    model = bench.copy.deepcopy(model).to(torch.bfloat16)
    prompts, tree = [[5, 9, 17], [7, 2, 40, 3]], [[0], [0, 0], [1]]
    run = dict(max_new_tokens=12, stop=[], compile=False)
    full = bench.quality_report(reference, model, prompts, tree, **run)
    first = prompts[0]
    timed = {
        tuple(first): (
            bench.generate(model, [first], max_new_tokens=12).tokens[0],
            bench.medusa_generate(model, [first], max_new_tokens=12, medusa_choices=tree).tokens[0],
        )
    }
    bf16_decodes = []
    for name in ("generate", "medusa_generate"):
        real = getattr(bench, name)

        def counted(m, ps, *args, _real=real, **kwargs):
            bf16_decodes.extend([tuple(ps[0])] if m is model else [])
            return _real(m, ps, *args, **kwargs)

        monkeypatch.setattr(bench, name, counted)
    assert bench.quality_report(reference, model, prompts, tree, **run, decoded=timed) == full
    assert bf16_decodes == [tuple(prompts[1])] * 2  # the baseline and Medusa of the prompt that was not timed


def test_proposal_vocab_from_replies(bench, smollm2_assets, tmp_path):
    out = tmp_path / "bench"
    argv = ["--model", "smollm2", "--num-heads", "2", "--num-prompts", "1", "--max-new-tokens", "4"]
    argv += ["--repeats", "1", "--step-sizes", "1,3", "--context-len", "8", "--cost-repeats", "1", "--threads", "1"]
    argv += ["--trees", "chain1", "--dtype", "float32", "--compile", "off", "--proposal-vocab", "512"]
    argv += ["--proposal-vocab-from", str(smollm2_assets.sharegpt_heldout), "--max-nodes", "2", "--out", str(out)]
    assert bench.main(argv) == 0  # lossless in fp32 with the restricted proposal too
    assert json.loads((out / "bench_decode.json").read_text())["proposal_vocab_size"] == 512
    with pytest.raises(SystemExit):
        bench.main(argv[:-6] + ["--proposal-vocab", "512", "--out", str(out)])  # no --proposal-vocab-from
    with pytest.raises(SystemExit, match="--proposal-vocab 99999: the model has only 49152 tokens"):
        bench.main([*argv, "--proposal-vocab", "99999"])


def test_first_divergence(bench):
    assert bench.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert bench.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert bench.first_divergence([1, 2], [1, 2, 3]) == 2
    assert bench.first_divergence([5], [1]) == 0


def test_chat_prompts_match_self_distillation(bench, smollm2_assets):
    prompts, stop = bench.chat_prompts(smollm2_assets.smollm2_dir, smollm2_assets.sharegpt_heldout, 3, skip=2)
    tok = smollm2_tokenizer(str(smollm2_assets.smollm2_dir))
    assert stop == list(tok.stop_tokens)
    rows = [json.loads(line) for line in Path(smollm2_assets.sharegpt_heldout).read_text().splitlines()[:8]]
    users = [next(t["value"] for t in r["conversations"] if t["from"] == "human") for r in rows]
    # The prompts skipped over are the first two; each prompt is the chat template around a first user turn.
    expected = [tok.prompt_tokens([Message("user", u)]) for u in users]
    expected = [e for e in expected if len(e) <= 384][2:5]
    assert prompts == expected
    with pytest.raises(SystemExit, match="only"):
        bench.chat_prompts(smollm2_assets.smollm2_dir, smollm2_assets.sharegpt_heldout, 10**6)


def test_checkpoint_is_a_training_run_loaded_with_load_medusa(bench, tmp_path):
    """``--checkpoint RUN``: the latest epoch_N's model and heads (torchtune_medusa.load_medusa) and its tree, as
    'trained'; a missing run is named."""
    from tests.common import write_tiny_run

    run = write_tiny_run(tmp_path / "run", epochs=[0, 3], tree=[(0,), (1,), (0, 0)])
    argv = ["--model", "checkpoint", "--checkpoint", str(run), "--num-prompts", "1", "--max-new-tokens", "6"]
    argv += ["--repeats", "1", "--step-sizes", "1,2", "--context-len", "8", "--cost-repeats", "1", "--threads", "1"]
    argv += ["--trees", "trained", "--max-nodes", "2", "--dtype", "float32", "--compile", "off"]
    assert bench.main([*argv, "--out", str(tmp_path / "bench")]) == 0
    res = json.loads((tmp_path / "bench" / "bench_decode.json").read_text())
    assert res["trees"]["trained"]["greedy_output_equals_baseline"] is True
    assert res["trees"]["trained"]["tree_tokens"] == 4  # the saved tree: 3 nodes and the root
    with pytest.raises(SystemExit, match="--checkpoint .*missing: no such directory"):
        bench.main([*argv[:3], str(tmp_path / "missing"), *argv[4:], "--out", str(tmp_path / "bench")])


def test_a_lossy_tree_fails_the_benchmark(bench, tmp_path, monkeypatch, capsys):
    real = bench.medusa_generate

    def corrupted(*args, **kwargs):  # a decoder bug: one wrong token
        out = real(*args, **kwargs)
        if out.tokens[0]:
            out.tokens[0][-1] = (out.tokens[0][-1] + 1) % 128
        return out

    monkeypatch.setattr(bench, "medusa_generate", corrupted)
    argv = ["--model", "tiny", "--num-heads", "2", "--num-prompts", "1", "--max-new-tokens", "6", "--repeats", "1"]
    argv += ["--step-sizes", "1,2", "--context-len", "8", "--cost-repeats", "1", "--threads", "1"]
    argv += ["--trees", "chain1", "--out", str(tmp_path), "--dtype", "float32", "--compile", "off"]
    assert bench.main(argv) == 1
    assert "differs from the baseline's with tree(s) chain1" in capsys.readouterr().err


def test_results_name_home_paths_portably(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bench._portable(str(tmp_path / "data" / "heldout.jsonl")) == "~/data/heldout.jsonl"
    assert bench._portable(str(tmp_path) + "x/file") == str(tmp_path) + "x/file"  # a sibling, not under home
    assert bench._portable("rel/path") == "rel/path" and bench._portable(3) == 3 and bench._portable(None) is None


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
        (["--prompt-skip", "-1"], "--prompt-skip must be >= 0"),
        (["--calibration-prompts", "-2"], "--calibration-prompts must be >= 0"),
        (["--cost-repeats", "0"], "--cost-repeats must be >= 1, got 0"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--prompt-file", "/nonexistent/heldout.jsonl"], "--prompt-file /nonexistent/heldout.jsonl: no such file"),
    ],
)
def test_bad_arguments_are_rejected_by_name(bench, argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(argv + ["--out", str(tmp_path)])
    assert match in capsys.readouterr().err


@pytest.fixture
def no_heavy_work(bench, monkeypatch):
    """Fails a test that reaches the model load, the baseline or the step-cost timing."""

    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the arguments were checked")

    monkeypatch.setattr(bench, "load_model", forbidden)
    monkeypatch.setattr(bench, "generate", forbidden)
    monkeypatch.setattr(bench, "step_cost_and_eviction", forbidden)


@pytest.mark.parametrize(
    "argv,match",
    [
        # issue 14.7: a typo ran every tree
        (["--trees", "chian3,typo"], "--trees: unknown tree name(s) chian3, typo; valid names: chain1, "),
        (["--trees", "chain1,mc_sim"], "unknown tree name(s) mc_sim; valid names: "),
        # issue 14.9: checked only after the baseline and the cost timing
        (["--step-sizes", "1,4,x"], "--step-sizes: '1,4,x' has 'x'; give comma-separated integers >= 1"),
        (["--step-sizes", "0,4"], "--step-sizes: '0,4' has '0'; give comma-separated integers >= 1"),
        (["--lookup-tokens", "6,-1"], "--lookup-tokens: '6,-1' has '-1'; give comma-separated integers >= 0"),
        (["--medusa-choices", "/nonexistent/medusa_choices.json"], "--medusa-choices /nonexistent/medusa_choices.json"),
    ],
)
def test_bad_trees_and_step_sizes_fail_before_any_work(bench, no_heavy_work, argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(argv + ["--model", "tiny", "--out", str(tmp_path)])
    assert match in capsys.readouterr().err


def test_a_tree_file_that_is_not_json_is_named(bench, no_heavy_work, capsys, tmp_path):
    tree = tmp_path / "medusa_choices.json"
    tree.write_text('{"medusa_choices": [[0], [0, 0]')
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--medusa-choices", str(tree), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--medusa-choices {tree}: not a readable tree file (ValueError: the tree file {tree} is not JSON" in err
    assert "medusa_finetune" in err


def test_trees_the_model_lacks_fail_before_the_baseline(bench, monkeypatch, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("the baseline ran before the trees were checked")

    real_load, real_generate = bench.load_model, bench.generate

    def load_then_forbid_decoding(args):
        monkeypatch.setattr(bench, "generate", real_generate)  # the tiny model trains its heads on its own output
        loaded = real_load(args)
        monkeypatch.setattr(bench, "generate", forbidden)
        monkeypatch.setattr(bench, "step_cost_and_eviction", forbidden)
        return loaded

    monkeypatch.setattr(bench, "load_model", load_then_forbid_decoding)
    argv = ["--model", "tiny", "--num-heads", "2", "--threads", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"--trees: chain3, trained not available with this model \(2 heads, no "):
        bench.main(argv + ["--trees", "chain1,chain3,trained"])
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps({"medusa_choices": [[0], [0, 0], [0, 0, 0]]}))
    with pytest.raises(SystemExit, match=f"--medusa-choices {deep}: the tree is 3 deep but the model has only 2"):
        bench.main(argv + ["--medusa-choices", str(deep)])


def test_warm_up_runs_allocate_the_timed_runs_kv_cache(bench):
    """Compiled graphs are per cache size: a short warm-up run must allocate what the timed run will, or the timed
    run compiles (the baseline's graphs are compiled by its reference outputs, the trees' would not be)."""
    from torchtune_medusa.generation._step import cache_len_for

    prompts = [[1, 2, 3], [4] * 130, [5, 6] * 65, [7] * 131]
    warm = bench.warm_up_prompts(prompts, max_new_tokens=128)
    assert len(warm) == 3  # one per distinct length
    for p in prompts:
        for extra in (0, 4, 16):  # the baseline, and trees of 4 and 16 tokens
            timed = cache_len_for(len(p) + 128 + extra, 2048, compiled=True)
            assert any(cache_len_for(len(w) + bench.WARM_UP_TOKENS + extra, 2048, compiled=True) == timed for w in warm)


def test_step_cost_times_variants_side_by_side(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("step_cost", ROOT / "benchmarks" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cost.json"
    argv = ["--model", "tiny", "--num-heads", "2", "--dtype", "bfloat16", "--compile", "off", "--packing", "on,off"]
    argv += ["--sizes", "1,3", "--context-len", "8", "--repeats", "1", "--rounds", "2", "--threads", "1"]
    assert module.main(argv + ["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [v["variant"] for v in res["variants"]] == ["eager", "eager, unpacked"]
    packs = _packing.packing_supported(torch.zeros(1, dtype=torch.bfloat16))  # this CPU computes bf16 natively
    assert [v["packed_weights"] for v in res["variants"]] == [packs, False]
    assert all(set(v["step_cost_s"]) == {"1", "3"} and v["relative_to_T1"]["1"] == 1.0 for v in res["variants"])
    assert res["step_cost_s"] == res["variants"][0]["step_cost_s"] and res["rounds"] == 2
    assert "eager, unpacked" in capsys.readouterr().out
    for bad in (argv[:9] + ["sometimes"] + argv[10:], argv[:-4] + ["--rounds", "0"] + argv[-2:]):
        with pytest.raises(SystemExit):
            module.main(bad + ["--out", str(out)])
    assert "--packing 'sometimes'" in capsys.readouterr().err


def test_self_distill_settings_parse_flags_and_name_bad_items():
    spec = importlib.util.spec_from_file_location("bench_self_distill", ROOT / "benchmarks" / "bench_self_distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = module.parse_settings("bf16:32:off,bf16:32:off:sdpa:unpacked,fp32:16:on")
    assert [(s["batch_size"], s["compile"], s["packed"], s["batched_attention"]) for s in settings] == [
        (32, False, True, True),
        (32, False, False, False),
        (16, True, True, True),
    ]
    for bad in ("bf16", "bf16:32", "bf16:x:off", "bf16:32:maybe", "bf16:32:off:fast", "fp8:32:off"):
        with pytest.raises(SystemExit, match=re.escape(f"--settings: '{bad}' is not dtype:batch:on|off")):
            module.parse_settings(bad)
