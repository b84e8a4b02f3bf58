# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.

import json

import pytest
import torch
from data_common import conv, kill_after_first_batch, Killed, tiny_tokenizer, write_jsonl
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message
from torchtune.models.llama3_1 import llama3_1

from torchtune_medusa.data import medusa_chat_dataset, smollm2_tokenizer
from torchtune_medusa.data._self_distill import derive_seed, self_distill
from torchtune_medusa.data.self_distill import main
from torchtune_medusa.generation import generate


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = llama3_1(
        vocab_size=400, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=256
    )
    with torch.no_grad():  # random weights would often pick a special token first, giving empty replies
        m.output.weight[:3] = 0
    return m.eval()


@pytest.fixture
def prompts_file(tmp_path):
    rows = [
        conv("human", q, "gpt", "original answer", id=f"c{i}")
        for i, q in enumerate(
            [
                "What is the capital of France?",
                "hi",
                "Tell me a joke about cats.",
                "Write 3 numbers",
                "Shall I compare thee to a summer's day?",
                "hello world",
                "how are you today?",
            ]
        )
    ]
    rows.append(conv("system", "Be brief.", "human", "hello", "gpt", "a", "human", "and you?", "gpt", "b", id="multi"))
    rows.append(conv("human", "hello"))  # no reply: skipped, counted
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def run(model, tok, prompts_file, out, **kw):
    kw = dict(dict(max_new_tokens=6, batch_size=3, progress=False, temperature=0.8, seed=1), **kw)
    return self_distill(model, tok, str(prompts_file), out, **kw)


def test_round_trip_through_the_chat_builder(model, tok, prompts_file, tmp_path):
    out = tmp_path / "sd.jsonl"
    stats = run(model, tok, prompts_file, out, temperature=0.0, batch_size=1)
    assert stats.conversations_written == 8 and stats.skipped == {"no user/assistant exchange": 1}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    first = by_id["c0"]
    assert [t["from"] for t in first["conversations"]] == ["human", "gpt"]
    assert first["conversations"][0]["value"] == "What is the capital of France?"
    meta = first["self_distill"]
    assert meta["temperature"] == 0.0 and meta["max_new_tokens"] == 6 and meta["global_seed"] == 1
    # the reply is the model's greedy continuation of the ChatML prompt, stop token removed
    prompt = tok.prompt_tokens([Message("user", "What is the capital of France?")])
    new = generate(model, [prompt], max_new_tokens=6, stop_tokens=tok.stop_tokens).tokens[0]
    assert first["conversations"][1]["value"] == tok.decode([t for t in new if t not in tok.stop_tokens])
    assert meta["new_tokens"] == [len(new)]
    # system message kept; only the first user turn by default
    assert [t["from"] for t in by_id["multi"]["conversations"]] == ["system", "human", "gpt"]

    ds = medusa_chat_dataset(tok, data_files=str(out))
    nonempty = [r for r in records if r["conversations"][-1]["value"].strip()]
    assert len(ds) == len(nonempty) and ds.stats.get("skipped: an empty message", 0) == len(records) - len(nonempty)
    for item, r in zip(ds, nonempty):
        trained = [t for t, lab in zip(item["tokens"], item["labels"]) if lab != CROSS_ENTROPY_IGNORE_IDX]
        assert tok.decode(trained, skip_special_tokens=False) == r["conversations"][-1]["value"] + "<|im_end|>"


def test_multi_turn_uses_the_models_own_replies(model, tok, prompts_file, tmp_path):
    out = tmp_path / "sd.jsonl"
    run(model, tok, prompts_file, out, multi_turn=True, temperature=0.0)
    multi = next(json.loads(x) for x in out.read_text().splitlines() if json.loads(x)["id"] == "multi")
    turns = multi["conversations"]
    assert [t["from"] for t in turns] == ["system", "human", "gpt", "human", "gpt"]
    assert turns[2]["value"] != "a"  # regenerated, not the original
    history = [
        Message("system", "Be brief."),
        Message("user", "hello"),
        Message("assistant", turns[2]["value"]),
        Message("user", "and you?"),
    ]
    new = generate(model, [tok.prompt_tokens(history)], max_new_tokens=6, stop_tokens=tok.stop_tokens).tokens[0]
    assert turns[4]["value"] == tok.decode([t for t in new if t not in tok.stop_tokens])
    assert multi["self_distill"]["multi_turn"] is True and len(multi["self_distill"]["stop_reasons"]) == 2


def test_resume_after_interruption_gives_the_same_file(model, tok, prompts_file, tmp_path):
    reference = tmp_path / "ref.jsonl"
    run(model, tok, prompts_file, reference)
    ref_bytes = reference.read_bytes()
    assert len(ref_bytes.splitlines()) == 8

    out = tmp_path / "out.jsonl"
    with pytest.raises(Killed):
        run(model, tok, prompts_file, out, on_batch=kill_after_first_batch)
    assert 0 < len(out.read_bytes().splitlines()) < 8
    stats = run(model, tok, prompts_file, out)
    assert out.read_bytes() == ref_bytes and stats.already_done == 3

    # a kill in the middle of a write: the torn line is dropped, its batch regenerated with the same seed
    torn = tmp_path / "torn.jsonl"
    cut = ref_bytes.index(b"\n", ref_bytes.index(b"\n") + 1) + 30  # inside the third line
    torn.write_bytes(ref_bytes[:cut])
    run(model, tok, prompts_file, torn)
    assert torn.read_bytes() == ref_bytes
    # a finished file: nothing to do
    stats = run(model, tok, prompts_file, torn)
    assert stats.conversations_written == 0 and stats.already_done == 8 and torn.read_bytes() == ref_bytes


def test_seeds_and_sampling(model, tok, prompts_file, tmp_path):
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b") != derive_seed(2, "a")
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    run(model, tok, prompts_file, a, seed=1)
    run(model, tok, prompts_file, b, seed=1)
    run(model, tok, prompts_file, c, seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_bad_input(model, tok, prompts_file, tmp_path):
    out = tmp_path / "sd.jsonl"
    stats = run(model, tok, prompts_file, out, max_prompt_len=18)
    assert stats.skipped["prompt longer than max_prompt_len=18"] == 3  # 21, 23 tokens, and "multi" (system)
    assert stats.conversations_written == 5
    with pytest.raises(ValueError, match="other settings.*temperature"):
        run(model, tok, prompts_file, out, max_prompt_len=18, temperature=0.5)
    lines = out.read_text().splitlines()
    out.write_text("not json\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a self-distillation record"):
        run(model, tok, prompts_file, out, max_prompt_len=18)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run(model, tok, tmp_path / "nope.jsonl", out)
    with pytest.raises(ValueError, match="batch_size must be"):
        run(model, tok, prompts_file, out, batch_size=0)
    with pytest.raises(ValueError, match="temperature must be"):
        run(model, tok, prompts_file, out, temperature=-1.0)
    with pytest.raises(ValueError, match="conversation_column='messages'"):
        run(model, tok, prompts_file, out, conversation_column="messages")


def test_never_truncates_a_file_it_did_not_write(model, tok, prompts_file, tmp_path, capsys):
    """Issue 14.3: a one-line JSON file given as the output was taken for a torn line and truncated."""
    user = json.dumps({"my": "data", "values": list(range(3000))})
    cases = {
        "one_line.json": user,  # no newline: looked like a torn last line
        "one_line_nl.json": user + "\n",
        "notes.txt": "my notes\nmore notes",
        # a torn first write: a file written here never starts so (the first batch is created by a rename)
        "torn_first.jsonl": '{"id": "c1", "conversations": [{"from": "hu',
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path} line 1 is not a self-distillation record.*left untouched"):
            run(model, tok, prompts_file, path)
        assert path.read_text() == text, name
        # the CLI refuses it before loading anything (the model and data folders do not even exist)
        argv = ["--output", str(path), "--model-dir", str(tmp_path / "no_model"), "--data", str(tmp_path / "no.jsonl")]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert str(path) in err and "left untouched" in err and "another output file" in err
        assert path.read_text() == text, name
    # records of ours followed by a foreign complete line: refused too
    ours = tmp_path / "ours.jsonl"
    run(model, tok, prompts_file, ours, limit=2)
    text = ours.read_text() + "not a record\n" + '{"id": "x"}'
    ours.write_text(text)
    with pytest.raises(ValueError, match="line 3 is not a self-distillation record"):
        run(model, tok, prompts_file, ours)
    assert ours.read_text() == text


def test_resume_onto_a_last_record_without_newline(model, tok, prompts_file, tmp_path, capsys):
    """Issue 14.4: the next record was glued onto a last line without newline (`truncate -s -1`)."""
    reference = tmp_path / "ref.jsonl"
    run(model, tok, prompts_file, reference)
    ref_bytes = reference.read_bytes()
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(ref_bytes.splitlines(keepends=True)[:4])[:-1])  # head -n4 | truncate -s -1
    stats = run(model, tok, prompts_file, out)
    assert out.read_bytes() == ref_bytes and stats.already_done == 4
    assert "adding the newline missing after the last record" in capsys.readouterr().out
    stats = run(model, tok, prompts_file, out)  # and the next resume reads it
    assert stats.conversations_written == 0 and stats.already_done == 8


def test_limit_must_be_positive(model, tok, prompts_file, tmp_path, capsys):
    """Issue 14.7: `--limit -1` wrote an empty file."""
    out = tmp_path / "sd.jsonl"
    for limit in (-1, 0):
        with pytest.raises(ValueError, match=f"limit must be an int >= 1.*got {limit}"):
            run(model, tok, prompts_file, out, limit=limit)
        with pytest.raises(SystemExit) as e:
            main(["--output", str(out), "--limit", str(limit), "--model-dir", str(tmp_path / "no_model")])
        assert e.value.code == 2 and f"--limit must be >= 1, got {limit}" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the CLI's --threads sets it process-wide


@pytest.mark.slow
def test_cli_on_smollm2(smollm2_assets, tmp_path, capsys, keep_threads):
    out = tmp_path / "sd.jsonl"
    argv = ["--output", str(out), "--model-dir", str(smollm2_assets.smollm2_dir), "--data",
            str(smollm2_assets.sharegpt_heldout), "--limit", "3", "--batch-size", "2", "--max-new-tokens", "4",
            "--threads", "1", "--dtype", "fp32"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    stats = json.loads(printed[printed.index("{") :])
    assert stats["conversations_written"] == 3 and stats["new_tokens"] > 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["conversations"][-1]["from"] == "gpt" for r in records)
    assert records[0]["self_distill"]["model"] == "SmolLM2-135M-Instruct (fp32)"
    assert main(argv) == 0  # resume: all done
    assert len(out.read_text().splitlines()) == 3
    ds = medusa_chat_dataset(smollm2_tokenizer(str(smollm2_assets.smollm2_dir)), data_files=str(out))
    assert len(ds) == 3


def test_shards_together_write_what_one_process_writes(model, tok, prompts_file, tmp_path):
    whole = tmp_path / "whole.jsonl"
    run(model, tok, prompts_file, whole, batch_size=2)
    shards = [tmp_path / f"shard{i}.jsonl" for i in range(3)]
    for i, out in enumerate(shards):
        run(model, tok, prompts_file, out, batch_size=2, shard=(i, 3))
    by_id = lambda lines: {r["id"]: r["conversations"] for r in map(json.loads, lines)}  # noqa: E731
    sharded = {}
    for out in shards:
        sharded.update(by_id(out.read_text().splitlines()))
    assert sharded == by_id(whole.read_text().splitlines()) and len(sharded) == 8
    assert all(len(out.read_text().splitlines()) < 8 for out in shards)
    # a shard resumes only as the same shard
    with pytest.raises(ValueError, match="shard"):
        run(model, tok, prompts_file, shards[0], batch_size=2, shard=(1, 3))
    with pytest.raises(ValueError, match="shard must be"):
        run(model, tok, prompts_file, tmp_path / "bad.jsonl", shard=(3, 3))
