# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Head formats: export -> import round trips, cross-format conversion, bad files, the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.common import tiny_medusa
from torchtune_medusa.convert import main as convert_main
from torchtune_medusa.models import export_heads, HEAD_FORMATS, import_heads
from torchtune_medusa.models._convert_weights import base_output_weight_of, detect_format

OWN_ONLY = {"fasterdecoding_v1", "tgi_v1", "tensorrt_llm"}
SHARED_ONLY = {"fasterdecoding_v2", "tgi_v2"}


def _heads(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("medusa_heads.")}


def _assert_exact(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _kwargs(fmt):
    return {"base_model_name_or_path": "meta-llama/Llama-3.2-1B"} if fmt.startswith("tgi") else {}


@pytest.mark.parametrize("fmt", HEAD_FORMATS)
@pytest.mark.parametrize("projection", ["own", "shared"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_round_trip(tmp_path, fmt, projection, num_layers):
    if fmt == "tgi_v2" and num_layers != 1:
        pytest.skip("TGI v2 requires one layer per head (tested below)")
    model = tiny_medusa(own_projection=projection == "own", num_layers=num_layers, tied=projection == "shared")
    heads = _heads(model)
    if fmt in SHARED_ONLY and projection == "own":
        with pytest.raises(ValueError, match="own trained projections"):
            export_heads(model, tmp_path, format=fmt, **_kwargs(fmt))
        return
    cfg = export_heads(model, tmp_path, format=fmt, **_kwargs(fmt))
    loaded, cfg2 = import_heads(tmp_path)  # format detected
    assert cfg2.num_heads == 3 and cfg2.num_layers == num_layers and cfg2.hidden_size == 32
    if projection == "shared" and fmt in OWN_ONLY:
        # written with the base output copied into every head: the same model, now with own projections
        base_w = base_output_weight_of(model)
        assert cfg.projection == cfg2.projection == "own"
        for i in range(3):
            assert torch.equal(loaded.pop(f"medusa_heads.{i}.{num_layers}.weight"), base_w)
        _assert_exact(loaded, heads)
        return
    assert cfg2.projection == projection
    assert cfg2.vocab_size == 128
    _assert_exact(loaded, heads)
    # and the explicit format reads the same
    loaded2, _ = import_heads(tmp_path, format=fmt)
    _assert_exact(loaded2, heads)


@pytest.mark.parametrize("projection", ["own", "shared"])
def test_round_trip_bf16_into_model(tmp_path, projection):
    model = tiny_medusa(own_projection=projection == "own").to(torch.bfloat16)
    export_heads(model, tmp_path / "v", format="vllm")
    loaded, _ = import_heads(tmp_path / "v")
    fresh = tiny_medusa(own_projection=projection == "own", seed=1).to(torch.bfloat16)
    fresh.load_state_dict(loaded, strict=False)
    _assert_exact(_heads(fresh), _heads(model))


@pytest.mark.parametrize("projection", ["own", "shared"])
def test_fasterdecoding_vllm_ours_chain(tmp_path, projection):
    model = tiny_medusa(own_projection=projection == "own")
    heads = _heads(model)
    base_w = base_output_weight_of(model)
    fd = "fasterdecoding_v1" if projection == "own" else "fasterdecoding_v2"
    export_heads(model, tmp_path / "ours", format="torchtune")
    sd, cfg = import_heads(tmp_path / "ours")
    export_heads(sd, tmp_path / "fd", format=fd, vocab_size=cfg.vocab_size)
    sd, cfg = import_heads(tmp_path / "fd")
    export_heads(sd, tmp_path / "vllm", format="vllm", base_output_weight=base_w)
    sd, cfg = import_heads(tmp_path / "vllm")
    export_heads(sd, tmp_path / "fd2", format=fd, vocab_size=cfg.vocab_size)
    sd, cfg = import_heads(tmp_path / "fd2")
    export_heads(sd, tmp_path / "ours2", format="torchtune", vocab_size=cfg.vocab_size)
    sd, cfg = import_heads(tmp_path / "ours2")
    _assert_exact(sd, heads)
    assert detect_format(tmp_path / "fd") == fd
    assert detect_format(tmp_path / "vllm") == "vllm"
    assert detect_format(tmp_path / "ours") == "torchtune"


def test_vllm_layout(tmp_path):
    model = tiny_medusa(own_projection=False, num_layers=2)
    export_heads(model, tmp_path, format="vllm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "medusa" and cfg["architectures"] == ["MedusaModel"]
    assert (cfg["num_heads"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (3, 2, 32, 128)
    assert cfg["original_lm_head"] is True and cfg["medusa_fc_bias"] is True and cfg["truncated_vocab_size"] is None
    sd = load_file(tmp_path / "model.safetensors")
    assert "blocks.2.layers.1.bias" in sd and "lm_heads.0.weight" in sd and "lm_heads.1.weight" not in sd
    assert torch.equal(sd["lm_heads.0.weight"], base_output_weight_of(model))
    assert torch.equal(sd["blocks.1.layers.0.weight"], model.medusa_heads[1][0].linear.weight)


def test_fasterdecoding_layout(tmp_path):
    model = tiny_medusa(num_layers=1)
    export_heads(model, tmp_path, format="fasterdecoding_v1", base_model_name_or_path="base")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["medusa_num_heads"] == 3 and cfg["medusa_num_layers"] == 1 and cfg["base_model_name_or_path"] == "base"
    assert "version" not in cfg and "architectures" not in cfg
    assert sorted(load_file(tmp_path / "medusa_lm_head.safetensors")) == sorted(
        f"{i}.{k}" for i in range(3) for k in ("0.linear.weight", "0.linear.bias", "1.weight")
    )
    shared = tiny_medusa(own_projection=False)
    export_heads(shared, tmp_path / "v2", format="fasterdecoding_v2")
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["version"] == "2"


def test_vllm_without_biases_reads_as_zero_bias(tmp_path):
    model = tiny_medusa()
    export_heads(model, tmp_path, format="vllm")
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if not k.endswith(".bias")}, tmp_path / "model.safetensors")
    loaded, _ = import_heads(tmp_path)
    assert torch.equal(loaded["medusa_heads.0.0.linear.bias"], torch.zeros(32))
    assert torch.equal(loaded["medusa_heads.0.0.linear.weight"], model.medusa_heads[0][0].linear.weight)


def test_errors(tmp_path):
    model = tiny_medusa(own_projection=False)
    with pytest.raises(ValueError, match="pass base_output_weight"):
        export_heads(_heads(model), tmp_path / "a", format="tensorrt_llm", vocab_size=128)
    with pytest.raises(ValueError, match="pass base_output_weight"):
        export_heads(_heads(model), tmp_path / "a", format="vllm", vocab_size=128)
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        export_heads(model, tmp_path / "a", format="tgi_v2")
    with pytest.raises(ValueError, match="medusa_num_layers == 1"):
        export_heads(
            tiny_medusa(own_projection=False, num_layers=2),
            tmp_path / "a",
            format="tgi_v2",
            base_model_name_or_path="x",
        )
    with pytest.raises(ValueError, match="unknown Medusa head format"):
        export_heads(model, tmp_path / "a", format="onnx")
    with pytest.raises(ValueError, match="base_output_weight has shape"):
        export_heads(tiny_medusa(), tmp_path / "a", format="tensorrt_llm", base_output_weight=torch.zeros(5, 32))

    # unknown key
    own = tiny_medusa()
    export_heads(own, tmp_path / "b", format="fasterdecoding_v1")
    sd = load_file(tmp_path / "b" / "medusa_lm_head.safetensors")
    save_file({**sd, "0.0.linear.scale": torch.ones(32)}, tmp_path / "b" / "medusa_lm_head.safetensors")
    with pytest.raises(ValueError, match=r"unexpected key '0\.0\.linear\.scale'"):
        import_heads(tmp_path / "b")
    # shape mismatch
    save_file({**sd, "1.0.linear.weight": torch.ones(16, 32)}, tmp_path / "b" / "medusa_lm_head.safetensors")
    with pytest.raises(ValueError, match=r"'1\.0\.linear\.weight' has shape \(16, 32\)"):
        import_heads(tmp_path / "b")
    # head count in the config disagrees with the weights
    save_file(sd, tmp_path / "b" / "medusa_lm_head.safetensors")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "medusa_num_heads": 5}))
    with pytest.raises(ValueError, match="medusa_num_heads is 5 but the weights have 3"):
        import_heads(tmp_path / "b")
    # a missing head projection
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in sd.items() if k != "2.1.weight"}, tmp_path / "b" / "medusa_lm_head.safetensors")
    with pytest.raises(ValueError, match="heads differ in layout"):
        import_heads(tmp_path / "b")
    # unknown vLLM key
    export_heads(own, tmp_path / "c", format="vllm")
    sd = load_file(tmp_path / "c" / "model.safetensors")
    save_file({**sd, "blocks.0.norm.weight": torch.ones(32)}, tmp_path / "c" / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.0\.norm\.weight'"):
        import_heads(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        import_heads(tmp_path / "nowhere")


def test_cli(tmp_path, capsys):
    model = tiny_medusa()
    export_heads(model, tmp_path / "ours", format="torchtune")
    assert convert_main(["--to", "vllm", str(tmp_path / "ours"), str(tmp_path / "vllm")]) == 0
    assert (
        convert_main(["--from", "vllm", "--to", "fasterdecoding_v1", str(tmp_path / "vllm"), str(tmp_path / "fd")]) == 0
    )
    sd, _ = import_heads(tmp_path / "fd")
    _assert_exact(sd, _heads(model))
    # a clear error, not a traceback
    assert convert_main(["--to", "fasterdecoding_v2", str(tmp_path / "ours"), str(tmp_path / "x")]) == 2
    assert "own trained projections" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    export_heads(tiny_medusa(), tmp_path / "ours", format="torchtune")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchtune_medusa.convert",
            "--to",
            "tensorrt_llm",
            "--dtype",
            "bf16",
            str(tmp_path / "ours"),
            str(tmp_path / "trt"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"medusa_num_heads": 3' in out.stdout
    sd, cfg = import_heads(tmp_path / "trt")
    assert cfg.projection == "own" and sd["medusa_heads.0.0.linear.weight"].dtype == torch.bfloat16


def _hf_model_dir(path, model):
    """A base model folder as torchtune's HF checkpointer writes it (weights + an HF config)."""
    path.mkdir(parents=True)
    w = base_output_weight_of(model).clone()
    save_file({"model.embed_tokens.weight": w, "model.norm.weight": torch.ones(w.shape[1])}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return path


def test_cli_never_overwrites_a_base_model(tmp_path, capsys):
    """Issue 14.1: converting into the base model's own folder exited 0 after replacing its weights."""
    model = tiny_medusa(own_projection=False)
    export_heads(model, tmp_path / "heads", format="torchtune")
    hf = _hf_model_dir(tmp_path / "hf", model)
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    argv = ["--to", "vllm", str(tmp_path / "heads"), str(hf), "--base-checkpoint-dir", str(hf)]
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert f"output folder {hf} is not empty" in err and "--force" in err and "config.json" in err
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    # --force replaces head files only: the base model's model.safetensors and config.json stay
    assert convert_main(argv + ["--force"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors, config.json" in err and "not Medusa head files" in err and "another folder" in err
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    # the library refuses too
    with pytest.raises(FileExistsError, match="model.safetensors"):
        export_heads(model, hf, format="vllm")
    # a file as output
    assert convert_main(["--to", "vllm", str(tmp_path / "heads"), str(hf / "config.json")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_force_replaces_earlier_heads_only(tmp_path):
    model, other = tiny_medusa(), tiny_medusa(seed=1)
    export_heads(model, tmp_path / "ours", format="torchtune")
    export_heads(other, tmp_path / "out", format="vllm")
    (tmp_path / "out" / "README.md").write_text("my notes")
    argv = ["--to", "vllm", str(tmp_path / "ours"), str(tmp_path / "out")]
    assert convert_main(argv) == 2  # not empty
    assert convert_main(argv + ["--force"]) == 0
    sd, _ = import_heads(tmp_path / "out")
    _assert_exact(sd, _heads(model))
    assert (tmp_path / "out" / "README.md").read_text() == "my notes"


def test_cli_shared_heads_name_the_cli_option(tmp_path, capsys):
    """Issue 14.12: the CLI said "pass base_output_weight", a Python argument."""
    model = tiny_medusa(own_projection=False)
    export_heads(model, tmp_path / "heads", format="torchtune")
    for fmt in ("vllm", "tensorrt_llm"):
        assert convert_main(["--to", fmt, str(tmp_path / "heads"), str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err
        assert "--base-checkpoint-dir" in err and "base_output_weight" not in err and str(tmp_path / "heads") in err
        assert not (tmp_path / fmt).exists()
    assert convert_main(["--to", "tgi_v2", str(tmp_path / "heads"), str(tmp_path / "tgi")]) == 2
    assert "--base-model-name-or-path" in capsys.readouterr().err
    hf = _hf_model_dir(tmp_path / "hf", model)
    argv = ["--to", "vllm", str(tmp_path / "heads"), str(tmp_path / "vllm"), "--base-checkpoint-dir", str(hf)]
    assert convert_main(argv) == 0
    assert torch.equal(
        load_file(tmp_path / "vllm" / "model.safetensors")["lm_heads.0.weight"], base_output_weight_of(model)
    )
    # a base model of another size
    small = tmp_path / "small"
    small.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(128, 16)}, small / "model.safetensors")
    argv = ["--to", "vllm", str(tmp_path / "heads"), str(tmp_path / "v2"), "--base-checkpoint-dir", str(small)]
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert f"--base-checkpoint-dir {small}" in err and "(128, 16)" in err and "(128, 32)" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_head_file_is_named(tmp_path, capsys, damage):
    """Issue 14.8: a truncated or garbage medusa_lm_head.safetensors ended in a bare SafetensorError."""
    export_heads(tiny_medusa(), tmp_path / "heads", format="torchtune")
    path = tmp_path / "heads" / "medusa_lm_head.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file.*truncated or corrupt.*again"):
        import_heads(tmp_path / "heads")
    for fmt in (None, "torchtune"):
        argv = (["--from", fmt] if fmt else []) + ["--to", "vllm", str(tmp_path / "heads"), str(tmp_path / "out")]
        assert convert_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and "Traceback" not in err
    # a legacy .pt file
    pt = tmp_path / "legacy" / "medusa_lm_head.pt"
    pt.parent.mkdir()
    pt.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=f"{pt} is not a readable PyTorch file"):
        import_heads(pt, format="fasterdecoding_v1")
    # a corrupt base checkpoint given to --base-checkpoint-dir
    export_heads(tiny_medusa(own_projection=False), tmp_path / "shared", format="torchtune")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00" * 64)
    hf = tmp_path / "hf"
    argv = ["--to", "vllm", str(tmp_path / "shared"), str(tmp_path / "o2"), "--base-checkpoint-dir", str(hf)]
    assert convert_main(argv) == 2
    assert str(tmp_path / "hf" / "model.safetensors") in capsys.readouterr().err


def test_corrupt_config_is_named(tmp_path):
    export_heads(tiny_medusa(), tmp_path / "heads", format="fasterdecoding_v1")
    (tmp_path / "heads" / "config.json").write_text('{"medusa_num_heads": 3,')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        import_heads(tmp_path / "heads")
