"""Bad input to `gsae cache` gets one clear line, a non-zero exit and nothing that looks complete."""

from __future__ import annotations

import errno
import json
import re

import pytest

from conftest import run_cli
from stores import ActivationStore


def _one_line_error(code: int, err: str) -> str:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # a progress bar may come before it
    assert "Traceback" not in err
    return errors[0]


def _args(model, cache, **extra):
    args = ["cache", "--model", model, "--cache", cache, "--tokens", 200, "--context-length", 32,
            "--batch-size", 4, "--chunk-tokens", 64]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def test_unknown_hub_model_offline(tmp_path, capsys):
    line = _one_line_error(*run_cli(["cache", "--model", "no-such-org/no-such-model", "--cache", tmp_path / "c"],
                                    capsys)[::2])
    assert "no-such-org/no-such-model" in line and ("could not" in line or "not found" in line)
    assert not (tmp_path / "c").exists()


def test_missing_model_file(tmp_path, capsys):
    line = _one_line_error(*run_cli(["cache", "--model", tmp_path / "nope.gguf", "--cache", tmp_path / "c"],
                                    capsys)[::2])
    assert "does not exist" in line


def test_folder_without_config_is_not_a_model(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    line = _one_line_error(*run_cli(["cache", "--model", tmp_path / "m", "--cache", tmp_path / "c"], capsys)[::2])
    assert "config.json" in line


@pytest.mark.parametrize("name,content,message", [
    ("missing.txt", None, "does not exist"),
    ("data.csv", "a,b\n", "must end in .txt, .jsonl or .parquet"),
    ("empty.txt", "", "holds no text"),
    ("tiny.txt", "just a few words", "fewer than one window"),
    ("bad.jsonl", '{"text": "fine"}\n{not json\n', "bad.jsonl:2 is not valid JSON"),
    ("nofield.jsonl", '{"body": "text"}\n', "no 'text' field"),
    ("number.jsonl", '{"text": "fine"}\n{"text": 42}\n', "number.jsonl:2: its 'text' is int 42, not text"),
    ("list.jsonl", '{"text": ["a", "list"]}\n', "list.jsonl:1: its 'text' is list ['a', 'list'], not text"),
    ("ints.parquet", None, "'text' column holds int64, not text"),
])
def test_bad_datasets(name, content, message, tiny_neox, tmp_path, capsys):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    elif name.endswith(".parquet"):  # a text column of numbers
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "c", dataset=path), capsys)[::2])
    assert message in line
    assert not (tmp_path / "c" / "zarr.json").exists() or not ActivationStore.open(
        str(tmp_path / "c"), allow_partial=True).complete


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "\n\n", "holds no text"),
    ("nofield.jsonl", '{"body": "text"}\n', "no 'text' field"),
    ("bad.jsonl", '{not json\n', "bad.jsonl:1 is not valid JSON"),
])
def test_a_corpus_without_text_is_refused_before_the_model_loads(name, content, message, tiny_neox, tmp_path, capsys,
                                                                 monkeypatch):
    import pipeline.cache

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.cache, "load_model", no_load)
    (tmp_path / name).write_text(content)
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "c", dataset=tmp_path / name), capsys)[::2])
    assert message in line and "model was loaded" not in line


def test_a_complete_cache_asked_again_is_found_without_loading_the_model(tiny_neox, tmp_path, capsys, monkeypatch):
    """The same command on a complete cache says so without the model's load; other arguments are refused
    without it too, with the line the long way (the model loaded) gives."""
    import pipeline.cache

    assert run_cli(_args(tiny_neox, tmp_path / "c"), capsys)[0] == 0
    before = (tmp_path / "c" / "zarr.json").read_bytes()
    load = pipeline.cache.load_model

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.cache, "load_model", no_load)
    for extra in ({}, {"prepend_bos": "--prepend-bos"}):  # BOS is what the tokenizer gave anyway
        args = _args(tiny_neox, tmp_path / "c") + list(extra.values())
        code, out, err = run_cli(args, capsys)
        assert code == 0 and "already complete" in out + err, err
    assert (tmp_path / "c" / "zarr.json").read_bytes() == before
    for other, named in (({"batch_size": 8}, "--batch-size: 4 there, 8 now"),
                         ({"keep_bos": None}, "BOS stored (--keep-bos): False there, True now"),
                         ({"dtype": "bfloat16"}, "--dtype: 'float16' there, 'bfloat16' now")):
        args = _args(tiny_neox, tmp_path / "c", **{k: v for k, v in other.items() if v is not None})
        if "keep_bos" in other:
            args.append("--keep-bos")
        line = _one_line_error(*run_cli(args, capsys)[::2])
        assert named in line and "model was loaded" not in line, (other, line)
        with monkeypatch.context() as long_way:  # the model loaded, then its recipe checked
            long_way.setattr(pipeline.cache, "load_model", load)
            long_way.setattr(pipeline.cache, "_complete_as_asked", lambda *args: None)
            assert _one_line_error(*run_cli(args, capsys)[::2]) == line
    assert (tmp_path / "c" / "zarr.json").read_bytes() == before


def test_a_cache_made_without_bos_is_refused_when_asked_with_the_tokenizers_bos(tiny_neox, tmp_path, capsys,
                                                                                monkeypatch):
    """A complete --no-prepend-bos cache asked without that flag (so with the tokenizer's BOS) is refused, as it
    would be made otherwise, whatever else is asked, with the line the long way gives; asked with the flag, it is
    found complete.  None of it loads the model: the stored tokenizer's BOS tells its default."""
    import pipeline.cache

    cache = tmp_path / "c"
    assert run_cli(_args(tiny_neox, cache) + ["--no-prepend-bos"], capsys)[0] == 0
    before = (cache / "zarr.json").read_bytes()
    loads = []
    real_load = pipeline.cache.load_model
    monkeypatch.setattr(pipeline.cache, "load_model", lambda *args, **kw: loads.append(1) or real_load(*args, **kw))
    for extra in ([], ["--batch-size", 8]):
        line = _one_line_error(*run_cli(_args(tiny_neox, cache) + extra, capsys)[::2])
        assert "BOS prepended (the tokenizer): False there, True now" in line and "--no-prepend-bos" in line, line
        with monkeypatch.context() as long_way:  # the model loaded, then its recipe checked
            long_way.setattr(pipeline.cache, "_complete_as_asked", lambda *args: None)
            assert _one_line_error(*run_cli(_args(tiny_neox, cache) + extra, capsys)[::2]) == line
    assert len(loads) == 2  # the long ways only
    code, out, err = run_cli(_args(tiny_neox, cache) + ["--no-prepend-bos"], capsys)
    assert code == 0 and "already complete" in out + err, err
    assert len(loads) == 2
    assert (cache / "zarr.json").read_bytes() == before


def test_a_chunk_larger_than_the_cache_takes_memory_for_the_cache_only(tiny_neox, tmp_path, capsys):
    """--chunk-tokens 10^9 (60 GiB per layer's chunk at d 32) for 200 tokens: one chunk of the 200, and the
    same command again finds the cache complete."""
    code, _, err = run_cli(_args(tiny_neox, tmp_path / "c", chunk_tokens=10**9), capsys)
    assert code == 0, err
    store = ActivationStore.open(str(tmp_path / "c"))
    assert store.chunk_tokens == 200 and store.n_tokens == 200 and store.n_chunks == 1
    assert store.read_rows(0, 0, 200).shape == (200, store.d_model)
    code, out, err = run_cli(_args(tiny_neox, tmp_path / "c", chunk_tokens=10**9), capsys)
    assert code == 0 and "already complete" in out + err


def test_a_corpus_failing_before_anything_is_committed_leaves_no_store(tiny_neox, tmp_path, capsys):
    """The error comes after a few batches and before the first chunk (about 65k rows at this width) is
    written: the store made for it goes, so other arguments are not refused against an empty cache."""
    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 20})
    (tmp_path / "late.jsonl").write_text("\n".join([line] * 150 + ["{not json"]) + "\n")
    args = _args(tiny_neox, tmp_path / "c", dataset=tmp_path / "late.jsonl", tokens=100_000, chunk_tokens=100_000,
                 batch_size=64)
    assert "late.jsonl:151 is not valid JSON" in _one_line_error(*run_cli(args, capsys)[::2])
    assert not (tmp_path / "c").exists()
    assert run_cli(_args(tiny_neox, tmp_path / "c", tokens=300), capsys)[0] == 0  # pydoc, other --tokens
    # with chunks committed before the error, the store stays: the same command continues it
    args = _args(tiny_neox, tmp_path / "d", dataset=tmp_path / "late.jsonl", tokens=100_000, chunk_tokens=2048,
                 batch_size=64)
    assert "late.jsonl:151 is not valid JSON" in _one_line_error(*run_cli(args, capsys)[::2])
    assert ActivationStore.open(str(tmp_path / "d"), allow_partial=True).tokens_written > 0


def test_null_texts_are_rows_without_text_not_the_word_none(tiny_neox, tmp_path, capsys):
    from transformers import AutoTokenizer

    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 20})
    (tmp_path / "n.jsonl").write_text("\n".join([line, '{"text": null}', line]) + "\n")
    assert run_cli(_args(tiny_neox, tmp_path / "c", dataset=tmp_path / "n.jsonl", tokens=100), capsys)[0] == 0
    store = ActivationStore.open(str(tmp_path / "c"))
    text = AutoTokenizer.from_pretrained(tiny_neox).decode(store.tokens(0, store.n_tokens).tolist())
    assert "None" not in text and "fox" in text


@pytest.mark.parametrize("flag,value,message", [
    ("tokens", 0, "--tokens must be positive"),
    ("tokens", -5, "--tokens must be positive"),
    ("batch_size", 0, "--batch-size must be positive"),
    ("context_length", 1, "--context-length"),
    ("context_length", 2, "--context-length must be at least 3 with the BOS in front (got 2)"),
    ("write_threads", 0, "--write-threads must be positive"),
])
def test_bad_numbers(flag, value, message, tiny_neox, tmp_path, capsys):
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "c", **{flag: value}), capsys)[::2])
    assert message in line
    assert not (tmp_path / "c").exists()


def test_unwritable_path(tiny_neox, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "file" / "cache"), capsys)[::2])
    assert "cannot write" in line


@pytest.mark.parametrize("setup", ["folder", "file", "zarr"])
def test_path_holding_something_else(setup, tiny_neox, tmp_path, capsys):
    target = tmp_path / "c"
    if setup == "folder":
        target.mkdir()
        (target / "notes.md").write_text("mine")
    elif setup == "file":
        target.write_text("mine")
    else:
        import zarr

        zarr.open_group(str(target), mode="w", attributes={"other": "tool"})
    line = _one_line_error(*run_cli(_args(tiny_neox, target), capsys)[::2])
    assert "not a gsae cache" in line
    if setup == "folder":
        assert (target / "notes.md").read_text() == "mine"


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_a_cache_whose_root_zarr_json_is_damaged_is_called_damaged(damage, tiny_neox, tmp_path, capsys):
    cache = tmp_path / "c"
    assert run_cli(_args(tiny_neox, cache), capsys)[0] == 0
    if damage == "garbage":
        (cache / "zarr.json").write_text("{not json")
    else:
        (cache / "zarr.json").unlink()
    for command in (["info", "--cache", cache], ["verify", "--cache", cache]):
        line = _one_line_error(*run_cli(command, capsys)[::2])
        assert "zarr.json is missing or damaged" in line and "restore the cache" in line
    # still a cache, damaged or not: not read as a run (nor, in train, written into as one)
    assert "is a gsae cache, not a run" in _one_line_error(*run_cli(["export", "--run", cache], capsys)[::2])


def test_different_command_against_existing_cache(tiny_neox, tmp_path, capsys, monkeypatch):
    assert run_cli(_args(tiny_neox, tmp_path / "c"), capsys)[0] == 0

    def no_model(*args, **kwargs):  # a local model's settings are told apart from its files: nothing loads
        raise AssertionError("the model was loaded to refuse other settings")

    monkeypatch.setattr("pipeline.cache.load_model", no_model)
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "c", context_length=48), capsys)[::2])
    assert "other settings" in line and "--context-length: 32 there, 48 now" in line
    made_with = (f"gsae cache --model {tiny_neox.resolve()} --cache {tmp_path / 'c'} --tokens 200 --context-length 32 "
                 "--batch-size 4 --chunk-tokens 64")
    assert "holds a complete cache made with other settings" in line and f"`{made_with}` made it: use it as it is" in line
    assert "resume" not in line, line  # there is nothing to resume in a complete cache
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "c", tokens=300), capsys)[::2])
    assert "--tokens: 200 there, 300 now" in line
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "c", dataset=tmp_path / "a.txt"), capsys)[::2])
    assert "the corpus (--dataset): 'pydoc' '" in line and f"'{tmp_path / 'a.txt'}' '" in line  # not hashes alone


def test_disk_full_leaves_a_resumable_incomplete_cache(tiny_neox, tmp_path, capsys, monkeypatch):
    from zarr.storage import LocalStore

    real_set = LocalStore.set
    state = {"full": False}

    async def set_on_a_full_disk(self, key, value):
        if state["full"] and "/c/" in key:  # chunk data, once the disk has filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)
        if key == "zarr.json" and '"chunks_written": 1' in value.to_bytes().decode():
            state["full"] = True

    monkeypatch.setattr(LocalStore, "set", set_on_a_full_disk)
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "c"), capsys)[::2])
    assert "disk full" in line
    attrs = json.loads((tmp_path / "c" / "zarr.json").read_text())["attributes"]
    # chunk 0 committed before the disk filled; a chunk written in parallel before that may be committed
    # too (its data reached the disk), but never the chunks after the disk filled: 4 are planned
    assert attrs["complete"] is False and 1 <= attrs["chunks_written"] < 4

    monkeypatch.setattr(LocalStore, "set", real_set)
    assert run_cli(_args(tiny_neox, tmp_path / "c"), capsys)[0] == 0
    assert ActivationStore.open(str(tmp_path / "c")).complete


def test_info_and_verify_refuse_missing_cache(tmp_path, capsys):
    for command in ("info", "verify"):
        line = _one_line_error(*run_cli([command, "--cache", tmp_path / "none"], capsys)[::2])
        assert "no gsae cache" in line


@pytest.mark.parametrize("args", [["cache", "--dtype", "int8"], ["export", "--run", "r", "--format", "foo"],
                                  ["train", "--precision", "float8"]])
def test_an_option_value_outside_its_choices_exits_2_with_the_usage_line(args, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2 and "Traceback" not in out + err
    assert "Usage: gsae" in err and "Invalid value" in err


def test_debug_shows_the_traceback_that_the_one_line_error_hides(tmp_path, capsys, monkeypatch):
    from stores import StoreError

    args = ["info", "--cache", tmp_path / "none"]
    assert "no gsae cache" in _one_line_error(*run_cli(args, capsys)[::2])
    with pytest.raises(StoreError, match="no gsae cache"):  # the exception itself, with its traceback
        run_cli(["--debug", *args], capsys)
    monkeypatch.setenv("GSAE_DEBUG", "1")
    with pytest.raises(StoreError, match="no gsae cache"):
        run_cli(args, capsys)


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A cache with its grouping and a trained run, to damage copies of."""
    root = tmp_path_factory.mktemp("damage")
    assert run_cli(["cache", "--model", tiny_llama, "--cache", root / "c", "--tokens", 3000, "--context-length", 64,
                    "--batch-size", 8, "--chunk-tokens", 500])[0] == 0
    assert run_cli(["group", "--cache", root / "c"])[0] == 0
    assert run_cli(["train", "--cache", root / "c", "--out", root / "r", "--groups", 1, "--tokens", 512,
                    "--batch-size", 256])[0] == 0
    return root


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
@pytest.mark.parametrize("command", ["train", "group", "eval"])
def test_a_damaged_chunk_stops_with_one_line_naming_cache_layer_and_rows(damage, command, trained, tmp_path, capsys):
    import shutil

    cache = tmp_path / "c"
    shutil.copytree(trained / "c", cache)
    for chunk in (cache / "layers" / "1" / "c").iterdir():  # every chunk of layer 1: any reader meets one
        target = chunk / "0"
        if damage == "missing":
            target.unlink()
        else:
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
    run = tmp_path / "r"
    shutil.copytree(trained / "r", run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "cache": str(cache)}))
    args = {"train": ["train", "--cache", cache, "--out", tmp_path / "new", "--groups", 1, "--tokens", 512,
                      "--batch-size", 256],
            "group": ["group", "--cache", cache, "--force", "--tokens", 1000],
            "eval": ["eval", "--run", run, "--windows", 0]}[command]
    line = _one_line_error(*run_cli(args, capsys)[::2])
    assert f"cache {cache}: layer 1 rows" in line and "gsae verify" in line
    assert ("chunk missing" if damage == "missing" else "checksum mismatch") in line


@pytest.mark.parametrize("edit, says", [
    ({"tokens_written": "abc"}, "tokens_written is 'abc', not a whole number ≥ 0"),
    ({"chunk_tokens": 0}, "chunk_tokens is 0, not a positive whole number"),
    ({"d_model": 64}, "d_model is 64, but its layers hold rows of 32"),
    ({"tokens_planned": -5}, "tokens_planned is -5, not a positive whole number"),
    ({"complete": "yes"}, "complete is 'yes', not true or false"),
    ({"dtype": "int8"}, "dtype is 'int8', not one of"),
    ({"chunks_written": 2, "tokens_written": 1000}, "counts (1,000 tokens in 2 chunks) do not match its complete arrays "
                                                    "(3,000 rows, chunks of 500)"),
    ({"complete": False, "tokens_planned": 2000}, "counts (3,000 of 2,000 tokens planned) do not match its arrays "
                                                  "(layers/0: 3,000 rows)"),
])
@pytest.mark.parametrize("command", ["verify", "train"])
def test_attributes_that_do_not_fit_the_cache_are_called_damaged(edit, says, command, trained, tmp_path, capsys):
    """An edited or damaged zarr.json failed inside a reader in Python's own words ("invalid literal for int()",
    "division by zero", "negative dimension"), or, with counts that agree with each other but not with the arrays,
    verify said ok and train trained on a third of the cache (found by helper-68)."""
    import shutil

    cache = tmp_path / "c"
    shutil.copytree(trained / "c", cache)
    metadata = json.loads((cache / "zarr.json").read_text())
    metadata["attributes"].update(edit)
    (cache / "zarr.json").write_text(json.dumps(metadata))
    args = {"verify": ["verify", "--cache", cache],
            "train": ["train", "--cache", cache, "--out", tmp_path / "r", "--baseline", "--tokens", 512,
                      "--batch-size", 256]}[command]
    line = _one_line_error(*run_cli(args, capsys)[::2])
    assert f"cache {cache}: zarr.json's {says}" in line and "the cache is damaged" in line, line


@pytest.mark.parametrize("damage", ["missing", "a folder"])
def test_a_missing_tokens_chunk_stops_eval_instead_of_running_the_model_on_zeros(damage, trained, tmp_path, capsys):
    """zarr reads a missing chunk as zeros: eval ran the model on windows of token 0 and wrote their metrics
    (found by helper-68); a chunk file replaced by a folder read so too, and `gsae verify` said ok."""
    import shutil

    cache = tmp_path / "c"
    shutil.copytree(trained / "c", cache)
    held_out = sorted((cache / "tokens" / "c").iterdir(), key=lambda p: int(p.name))[-1]  # what eval reads
    held_out.unlink()
    if damage == "a folder":
        held_out.mkdir()
    run = tmp_path / "r"
    shutil.copytree(trained / "r", run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "cache": str(cache)}))
    line = _one_line_error(*run_cli(["eval", "--run", run, "--windows", 1, "--tokens", 100], capsys)[::2])
    assert re.search(rf"cache {re.escape(str(cache))}: tokens rows 2,[5-9]\d\d–2,[5-9]\d\d cannot be read \(chunk missing\)",
                     line), line  # the rows read, in the held-out chunk 2,500–2,999
    assert not (run / "eval.json").exists()
    code, out, _ = run_cli(["verify", "--cache", cache], capsys)
    assert code == 1 and "corrupt tokens rows 2,500–2,999: chunk missing" in out, out
    layer_chunk = cache / "layers" / "2" / "c" / "1" / "0"  # a layer's chunk replaced by a folder: verify names it
    layer_chunk.unlink()
    layer_chunk.mkdir()
    code, out, _ = run_cli(["verify", "--cache", cache], capsys)
    assert code == 1 and "corrupt layer 2 rows 500–999: chunk missing" in out, out


def test_a_cache_killed_while_its_store_is_created_is_made_by_the_same_command(tiny_neox, tmp_path, capsys):
    """kill -9 between the store's group and its arrays: the same command makes it, with the bytes of a
    run never killed."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    program = ("import os, signal, sys, zarr\n"
               "real = zarr.Group.create_group\n"
               "def hit(self, *args, **kwargs):\n"
               "    if args and args[0] == 'stats':\n"
               "        os.kill(os.getpid(), signal.SIGKILL)\n"
               "    return real(self, *args, **kwargs)\n"
               "zarr.Group.create_group = hit\n"
               "import cli\nsys.argv = ['gsae', *sys.argv[1:]]\ncli.main()\n")
    args = _args(tiny_neox, tmp_path / "killed")
    result = subprocess.run([sys.executable, "-c", program, *map(str, args)], cwd=ROOT, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(_args(tiny_neox, tmp_path / "whole"), capsys)[0] == 0

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
                and p.name != "timing.json"}

    assert files(tmp_path / "killed") == files(tmp_path / "whole")


def test_a_run_directory_that_cannot_be_written_is_one_line(tiny_neox, tmp_path, capsys):
    cache = tmp_path / "c"
    assert run_cli(_args(tiny_neox, cache), capsys)[0] == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _one_line_error(*run_cli(["train", "--cache", cache, "--baseline", "--tokens", 256, "--batch-size", 64,
                                     "--out", blocker / "run"], capsys)[::2])
    assert f"{blocker} is a file, not a folder" in line  # said before the run is planned
    assert not list(tmp_path.glob("runs*"))


def test_a_chunk_whose_write_fails_starts_none_of_its_other_writes(tmp_path, monkeypatch):
    """A write error (disk full) stops the chunk it belongs to: its writes not yet started never run, nor do
    the later chunks', however slowly the committing thread learns of it; no buffer is handed back."""
    import threading
    import time

    import numpy as np

    import stores.chunk_io as store_module
    from pipeline.chunk_writer import Chunk, ChunkWriter
    from stores import compute_chunk_stats
    from stores.activation_store import StoreError

    n_layers, d, rows = 6, 8, 10
    store = ActivationStore.create(str(tmp_path / "c"), n_layers=n_layers, d_model=d, n_tokens=4 * rows,
                                   chunk_tokens=rows)
    failed, after, released = threading.Event(), [], []
    real_put = store_module.put

    def put(array, unchecked, key, values):
        if failed.is_set():  # slow from here: the committing thread learns of the error in the meantime
            time.sleep(0.05)
            after.append((array.path, key))
        if array.path == "layers/0" and isinstance(key, slice) and key.start == 0:
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(array, unchecked, key, values)

    monkeypatch.setattr(store_module, "put", put)
    writer = ChunkWriter(store, 1, 0.0)
    with pytest.raises(StoreError, match="disk full"):
        try:
            for c in range(4):
                layers = np.random.default_rng(c).standard_normal((n_layers, rows, d)).astype(np.float16)
                writer.submit(Chunk(c, layers, np.zeros(rows, np.int32), compute_chunk_stats(list(layers), "float16"),
                                     release=lambda c=c: released.append(c)))
            writer.drain()
        finally:
            writer.close()
    # none begun after the error (the writer thread took more before the committing thread cancelled them,
    # one or two of them when the machine was busy)
    assert after == [] and released == [], after


def test_a_failed_write_in_an_encoder_process_stops_the_writes_not_yet_handed_out():
    """--writer processes: a process's failed write is noted when its answer comes; from then on neither the
    threads' writes nor the processes' begin (FirstFailure), as with a thread's failed write."""
    from concurrent.futures import Future

    from stores.activation_store import FirstFailure

    failure, started = FirstFailure(), []

    def start(fails: bool) -> Future:
        started.append(fails)
        future: Future = Future()
        if fails:
            future.set_exception(OSError(errno.ENOSPC, "No space left on device"))
        else:
            future.set_result(None)
        return future

    assert failure.handed(lambda: start(False)).result() is None
    with pytest.raises(OSError):
        failure.handed(lambda: start(True)).result()
    later = failure.handed(lambda: start(False))
    with pytest.raises(OSError) as caught:
        later.result()
    assert caught.value.errno == errno.ENOSPC and started == [False, True]  # the last one never started
    with pytest.raises(OSError):
        failure.run(started.append, "a thread's write")
    assert started == [False, True]


def _copy_of(trained, tmp_path):
    import shutil

    shutil.copytree(trained / "c", tmp_path / "c")
    return tmp_path / "c"


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("array,reader", [("mean", "group"), ("norm", "train"), ("chunk_sum", None),
                                          ("chunk_norm_sum", None)])
def test_damaged_statistics_fail_verify_and_their_readers_name_them(array, reader, trained, tmp_path, capsys):
    """One flipped byte in an array under stats/: verify names it (it used to say ok), and a command that
    reads it stops with one line naming it instead of zarr's checksum traceback."""
    cache = _copy_of(trained, tmp_path)
    _flip_a_byte(sorted(p for p in (cache / "stats" / array / "c").rglob("*") if p.is_file())[-1])
    line = _one_line_error(*run_cli(["verify", "--cache", cache], capsys)[::2])
    assert f"stats/{array}" in line and "checksum mismatch" in line, line
    if array.startswith("chunk_"):
        assert "chunk 5 (rows 2,500–2,999)" in line  # 3000 rows in chunks of 500: the last one
    if reader is not None:
        args = {"group": ["group", "--cache", cache, "--force", "--tokens", 1000],
                "train": ["train", "--cache", cache, "--out", tmp_path / "r", "--groups", 1, "--tokens", 512,
                          "--batch-size", 256]}[reader]
        line = _one_line_error(*run_cli(args, capsys)[::2])
        assert f"cache {cache}: stats/{array} cannot be read (checksum mismatch)" in line and "gsae verify" in line


def test_verify_reports_damaged_statistics_and_chunks_together(trained, tmp_path, capsys):
    cache = _copy_of(trained, tmp_path)
    _flip_a_byte(cache / "stats" / "mean" / "c" / "0" / "0")
    _flip_a_byte(cache / "layers" / "2" / "c" / "1" / "0")
    code, out, err = run_cli(["verify", "--cache", cache], capsys)
    line = _one_line_error(code, err)
    assert "stats/mean: checksum mismatch" in line and "also 1 damaged chunk (first: layer 2 rows 500–999" in line
    assert "corrupt layer 2 rows 500–999: checksum mismatch" in out  # the chunks' list, as without the stats


@pytest.mark.parametrize("content", ['{"zarr_format": 3, "node_type": "arr', '{"zarr_format": 3, "node_type": "array"}',
                                     None])
@pytest.mark.parametrize("command", ["info", "verify"])
def test_damaged_array_metadata_is_one_line_naming_the_file(content, command, trained, tmp_path, capsys):
    cache = _copy_of(trained, tmp_path)
    metadata = cache / "layers" / "2" / "zarr.json"
    if content is None:
        metadata.unlink()
    else:
        metadata.write_text(content)
    line = _one_line_error(*run_cli([command, "--cache", cache], capsys)[::2])
    problem = ("is missing" if content is None else "is not valid JSON" if content.endswith("arr")
               else "lacks the field 'data_type'")
    assert f"cache {cache}: layers/2/zarr.json {problem}" in line and "the cache is damaged" in line, line


@pytest.mark.parametrize("content", ["truncated", '{"format": 2}', "chosen"])
def test_a_damaged_grouping_file_is_one_line_for_train_and_recomputed_by_group(content, trained, tmp_path, capsys):
    cache = _copy_of(trained, tmp_path)
    path = cache / "groups" / "amad.json"
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif content == "chosen":
        path.write_text(json.dumps({**json.loads(path.read_text()), "chosen": 99}))
    else:
        path.write_text(content)
    train = ["train", "--cache", cache, "--out", tmp_path / "r", "--groups", 1, "--tokens", 512, "--batch-size", 256]
    line = _one_line_error(*run_cli(train, capsys)[::2])
    problem = {"truncated": "not valid JSON", "chosen": "'chosen' (99) is not a G of the curve"}.get(content,
                                                                                                "no 'metric' field")
    assert f"{cache}/groups/amad.json is damaged ({problem})" in line and "--force" in line, line
    # a training run uses the grouping (the fixture's): group recomputes it only with --force
    line = _one_line_error(*run_cli(["group", "--cache", cache], capsys)[::2])
    assert "is damaged and training runs use it" in line and "--force" in line
    code, _, err = run_cli(["group", "--cache", cache, "--force"], capsys)
    assert code == 0 and "is damaged" in err and "recomputing it" in err and "Traceback" not in err
    assert json.loads(path.read_text())["format"] == 2
    assert run_cli(train, capsys)[0] == 0


def _cache_stopped_by_a_full_disk(model, cache, capsys, monkeypatch) -> None:
    """`gsae cache` stopped after its first commit (the disk fills up): an incomplete, resumable cache."""
    from zarr.storage import LocalStore

    real_set = LocalStore.set
    state = {"full": False}

    async def set_on_a_full_disk(self, key, value):
        if state["full"] and "/c/" in key:
            raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)
        if key == "zarr.json" and '"chunks_written": 1' in value.to_bytes().decode():
            state["full"] = True

    with monkeypatch.context() as patch:
        patch.setattr(LocalStore, "set", set_on_a_full_disk)
        assert "disk full" in _one_line_error(*run_cli(_args(model, cache), capsys)[::2])


def test_an_incomplete_cache_asked_with_other_settings_names_the_command_that_resumes_it(tiny_neox, tmp_path, capsys,
                                                                                         monkeypatch):
    cache = tmp_path / "c"
    _cache_stopped_by_a_full_disk(tiny_neox, cache, capsys, monkeypatch)
    line = _one_line_error(*run_cli(_args(tiny_neox, cache, context_length=48), capsys)[::2])
    made_with = (f"gsae cache --model {tiny_neox.resolve()} --cache {cache} --tokens 200 --context-length 32 "
                 "--batch-size 4 --chunk-tokens 64")
    assert "holds an incomplete cache made with other settings (--context-length: 32 there, 48 now)" in line, line
    assert f"re-run `{made_with}` to resume it, or choose another --cache" in line, line
    assert run_cli(_args(tiny_neox, cache), capsys)[0] == 0  # which it does


def test_a_garbled_timing_json_is_one_line_and_deleting_it_lets_the_cache_resume(tiny_neox, tmp_path, capsys,
                                                                                  monkeypatch):
    cache = tmp_path / "c"
    _cache_stopped_by_a_full_disk(tiny_neox, cache, capsys, monkeypatch)
    (cache / "timing.json").write_text('{"seconds_wri')
    line = _one_line_error(*run_cli(_args(tiny_neox, cache), capsys)[::2])
    assert f"cache {cache}: timing.json is damaged (not valid JSON); delete it" in line
    (cache / "timing.json").unlink()
    assert run_cli(_args(tiny_neox, cache), capsys)[0] == 0
    assert ActivationStore.open(str(cache)).complete


def test_the_hint_for_an_incomplete_cache_names_only_commands_that_take_allow_partial(tiny_neox, tmp_path, capsys,
                                                                                     monkeypatch):
    cache = tmp_path / "c"
    _cache_stopped_by_a_full_disk(tiny_neox, cache, capsys, monkeypatch)
    line = _one_line_error(*run_cli(["train", "--cache", cache, "--baseline", "--tokens", 64, "--batch-size", 32],
                                    capsys)[::2])
    assert "is incomplete" in line and f"re-run `gsae cache --model {tiny_neox} --cache {cache} " in line
    assert "or pass --allow-partial" not in line and "`gsae group` and `gsae verify`" in line
    code, out, err = run_cli(["verify", "--cache", cache, "--allow-partial"], capsys)
    assert code == 0 and "ok" in out, err


def _pydoc_jsonl(path, field: str) -> str:
    from pydoc_data.topics import topics

    path.write_text("".join(json.dumps({field: text}) + "\n" for _, text in sorted(topics.items())[:40]))
    return str(path)


@pytest.mark.parametrize("options", ["defaults", "lossy, kept BOS, a jsonl's own field", "bfloat16, no BOS",
                                     "a relative --dataset named like markup, finished from another folder"])
def test_an_incomplete_cache_names_the_command_that_finishes_it(options, tiny_neox, tmp_path, capsys, monkeypatch):
    import shlex

    from pydoc_data.topics import topics

    cache = tmp_path / "c"
    (tmp_path / "made-here").mkdir()
    (tmp_path / "made-here" / "c[bold].txt").write_text("\n".join(topics[k] for k in sorted(topics)[:40]))
    extra = {"defaults": [],
             "lossy, kept BOS, a jsonl's own field": [
                 "--compression", "lossy", "--keep-bits", 7, "--keep-bos",
                 "--dataset", _pydoc_jsonl(tmp_path / "corpus.jsonl", "body"), "--text-field", "body"],
             "bfloat16, no BOS": ["--dtype", "bfloat16", "--no-prepend-bos"],
             "a relative --dataset named like markup, finished from another folder": ["--dataset", "c[bold].txt"],
             }[options]
    monkeypatch.chdir(tmp_path / "made-here")  # where the cache is made (--cache is absolute)
    from pipeline.chunk_writer import ChunkWriter

    real_submit, submitted = ChunkWriter.submit, []

    def submit_then_ctrl_c(self, item):  # Ctrl-C as the second chunk goes to the writer, the first committed
        submitted.append(item.index)
        if len(submitted) == 2:
            self.drain()
            raise KeyboardInterrupt
        real_submit(self, item)

    with monkeypatch.context() as patch:
        patch.setattr(ChunkWriter, "submit", submit_then_ctrl_c)
        code, _, err = run_cli(_args(tiny_neox, cache) + extra, capsys)
    assert code == 130 and "interrupted" in err, err
    monkeypatch.chdir(tmp_path)  # finished from elsewhere
    import cli

    monkeypatch.setattr(cli.report, "_width", 1000)  # the table's rows on one line each
    code, out, err = run_cli(["info", "--cache", cache], capsys)
    assert code == 0 and "--chunk-tokens" in out, err
    [row] = [line for line in out.splitlines() if "to finish it" in line]
    if "relative" in options:  # by its absolute path, its name as it is (not read as rich markup)
        assert f"--dataset '{tmp_path / 'made-here' / 'c[bold].txt'}'" in row, row
    line = _one_line_error(*run_cli(["train", "--cache", cache, "--baseline"], capsys)[::2])
    assert "re-run `gsae cache " in line, line
    command = line.split("re-run `", 1)[1].split("` to finish it", 1)[0]
    words = shlex.split(command)
    assert words[:2] == ["gsae", "cache"] and "--storage-option" not in words
    # the recipe check refuses a command that differs in any setting: running this one is the test
    code, out, err = run_cli(words[1:], capsys)
    assert code == 0, err
    assert "resum" in (out + err).lower() and ActivationStore.open(str(cache)).complete


def _not_a_causal_lm(kind: str, tokenizer_dir, path):
    """A tiny saved model that transformers' AutoModelForCausalLM loads (or refuses), but that is not a
    decoder-only causal LM."""
    import torch
    from transformers import (AutoTokenizer, BartConfig, BartForConditionalGeneration, BertConfig, BertForMaskedLM,
                              BertModel, T5Config, T5ForConditionalGeneration)

    from conftest import _save

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    small = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    bert = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **small)
    model = {"BERT without its head": lambda: BertModel(BertConfig(**bert)),
             "BERT with its masked-LM head": lambda: BertForMaskedLM(BertConfig(**bert)),
             "BART": lambda: BartForConditionalGeneration(BartConfig(
                 d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, **small)),
             "T5": lambda: T5ForConditionalGeneration(T5Config(
                 d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0,
                 **{k: v for k, v in small.items() if k != "bos_token_id"}))}[kind]()
    return _save(model, tokenizer_dir, path)


@pytest.mark.parametrize("kind, says", [("BERT without its head", "of its weights (cls.predictions"),
                                        ("BERT with its masked-LM head", "is not causal"),
                                        ("BART", "embed_tokens.weight), which would be random"),
                                        ("T5", "(T5Config) is not a causal LM")])
def test_a_model_that_is_not_a_decoder_only_causal_lm_is_refused(kind, says, tokenizer_dir, tmp_path, capsys):
    # transformers loads the first three as causal LMs: BERT attending both ways and with a random head where it
    # had none, BART's decoder with random embeddings (different on every load), all silently
    model = _not_a_causal_lm(kind, tokenizer_dir, tmp_path / "model")
    line = _one_line_error(*run_cli(_args(model, tmp_path / "c"), capsys)[::2])
    assert says in line and "decoder-only" in line, line
    assert not (tmp_path / "c").exists()


def test_a_cache_of_other_contents_under_the_same_names_is_not_resumed_by_its_own_command(tiny_neox, tmp_path, capsys):
    """Where what differs is no option (the model's files, the corpus's text), the command that made the cache
    is the one just refused: the message says to restore the contents instead."""
    import shutil

    model, corpus = tmp_path / "model", tmp_path / "corpus.txt"
    shutil.copytree(tiny_neox, model)
    corpus.write_text("The residual stream carries features between layers. " * 300)
    args = _args(model, tmp_path / "c", dataset=corpus)
    assert run_cli(args, capsys)[0] == 0
    corpus.write_text("Other text under the same name, carried by the same stream. " * 300)
    line = _one_line_error(*run_cli(args, capsys)[::2])
    assert "the corpus (--dataset)" in line and "restore them to use it" in line and "re-run" not in line, line
    corpus.write_text("The residual stream carries features between layers. " * 300)
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    line = _one_line_error(*run_cli(args, capsys)[::2])
    assert "the model's files" in line and "restore them to use it" in line and "re-run" not in line, line


def test_a_hub_cache_resumes_at_the_commit_it_was_cached_from_after_its_branch_moved():
    """A hub model's recipe holds the commit it resolved to and a fingerprint naming the revision asked for
    (main). Once main moves, the same command is refused and told the commit; `--revision <commit>` then
    resumes (its fingerprint names the commit, the commit is the same)."""
    from pipeline.cache import _check_recipe
    from pipeline.errors import GsaeError

    model = "EleutherAI/pythia-70m"
    stored = {"model_id": model, "model_revision": "a" * 40, "model_fingerprint": f"hub:{model}@main",
              "corpus_fingerprint": "c0ffee", "tokens_planned": 1000, "context_length": 256, "batch_size": 16}
    attrs = {"recipe": stored, "model_source": "hub", "corpus": {"spec": "pydoc", "kind": "pydoc"}}
    with pytest.raises(GsaeError, match=f"pass --revision {'a' * 40} \\(the commit it was cached from\\)"):
        _check_recipe("c", attrs, {**stored, "model_revision": "b" * 40})  # main moved on
    _check_recipe("c", attrs, {**stored, "model_fingerprint": f"hub:{model}@{'a' * 40}"})  # --revision aaa…: resumes
    with pytest.raises(GsaeError, match="the model's revision"):  # another commit asked for
        _check_recipe("c", attrs, {**stored, "model_revision": "c" * 40, "model_fingerprint": f"hub:{model}@{'c' * 40}"})
    with pytest.raises(GsaeError, match=f"--model: '{model}' there.*re-run `gsae cache --model {model} --cache c "):
        _check_recipe("c", attrs, {**stored, "model_id": "EleutherAI/pythia-160m",
                                   "model_fingerprint": "hub:EleutherAI/pythia-160m@main"})


def test_a_cache_whose_zarr_json_may_not_be_read_is_not_called_damaged(tiny_neox, tmp_path, capsys, monkeypatch):
    """An object store that lets a key be listed but not read (s3fs raises PermissionError("Forbidden")): the
    cache was called damaged, to be restored or re-created, where the credentials were at fault."""
    import zarr

    cache = tmp_path / "c"
    assert run_cli(_args(tiny_neox, cache), capsys)[0] == 0

    def forbidden(*args, **kwargs):
        raise PermissionError("Forbidden")

    monkeypatch.setattr(zarr, "open_group", forbidden)
    line = _one_line_error(*run_cli(["info", "--cache", cache], capsys)[::2])
    assert "cannot read" in line and "permission denied (Forbidden)" in line and "damaged" not in line


def test_a_tokenizer_with_ids_beyond_the_models_embeddings_is_one_line(tiny_neox, tokenizer_dir, tmp_path, capsys):
    """A folder whose tokenizer is not the model's (ids past its embedding table): one line naming both
    sizes, and no store left behind, where torch's embedding lookup said "index out of range in self"."""
    from transformers import AutoModelForCausalLM

    from conftest import _save

    model = AutoModelForCausalLM.from_pretrained(tiny_neox)
    model.resize_token_embeddings(100)  # the tokenizer has 512 ids: the corpus uses some above 99
    folder = _save(model, tokenizer_dir, tmp_path / "small-vocab")
    line = _one_line_error(*run_cli(_args(folder, tmp_path / "c"), capsys)[::2])
    assert "beyond the model's 100 input embeddings" in line and "gives token id" in line, line
    assert not (tmp_path / "c").exists()


def test_a_bad_record_deep_in_the_corpus_says_what_the_cache_keeps(tiny_neox, tmp_path, capsys):
    """A record the corpus cannot give, after chunks were committed: its line, then what the cache keeps and
    that only this corpus can finish it (its own command fails at the same record; a corrected corpus is
    another corpus)."""
    corpus = tmp_path / "lines.jsonl"
    records = [{"text": f"record {i}: " + "the quick brown fox jumps over the lazy dog " * 6} for i in range(400)]
    records[90] = {"text": 42}  # in the second tokenizer call of 64 records (~190 tokens each), ~12,000 tokens in
    corpus.write_text("".join(json.dumps(record) + "\n" for record in records))
    cache = tmp_path / "c"
    line = _one_line_error(*run_cli(_args(tiny_neox, cache, tokens=20000, dataset=corpus), capsys)[::2])
    store = ActivationStore.open(str(cache), allow_partial=True)
    kept = sum(stop - start for start, stop in map(store.chunk_rows, store.committed_chunks()))
    assert 0 < kept < 20000 and not store.complete, line
    assert line == (f"error: {corpus}:91: its 'text' is int 42, not text (set --text-field); {cache} keeps the "
                    f"{kept:,} tokens cached before it, which only this corpus, unchanged, can finish: remove that "
                    "folder (or pass another --cache) to cache the corrected corpus"), line


def test_a_hub_dataset_offline_or_a_mistyped_folder_is_one_line(tiny_neox, tmp_path, capsys, monkeypatch):
    """No connection here: a dataset name that is no local file either is one line saying both (a mistyped
    folder reads as a hub id), before the model loads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("pipeline.corpus.hub_reachable", lambda: False)
    line = _one_line_error(*run_cli(_args(tiny_neox, tmp_path / "c", dataset="my_corpus_dir"), capsys)[::2])
    assert line.startswith("error: could not fetch dataset 'my_corpus_dir' from the Hugging Face Hub (no "
                           "connection), and no local file or folder is named so here; pass a local"), line
    assert not (tmp_path / "c").exists()


def test_a_tokenizer_without_bos_finds_its_complete_cache_without_loading_the_model(tiny_neox, tmp_path, capsys,
                                                                                     monkeypatch):
    """No BOS by the tokenizer's default (its own has none): the same command again is told from the stored
    tokenizer's BOS, without the model's load; with --prepend-bos it is refused (long way: it cannot be)."""
    import shutil

    import pipeline.cache
    from transformers import AutoTokenizer

    folder = tmp_path / "no-bos"
    shutil.copytree(tiny_neox, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).bos_token_id is None
    cache = tmp_path / "c"
    assert run_cli(_args(folder, cache), capsys)[0] == 0
    assert ActivationStore.open(str(cache)).attrs["recipe"]["prepend_bos"] is False

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.cache, "load_model", no_load)
    code, out, err = run_cli(_args(folder, cache), capsys)
    assert code == 0 and "already complete" in out + err, err


def test_a_chunk_file_gone_from_a_complete_cache_is_found_before_training_and_by_cache(trained, tiny_llama, tmp_path,
                                                                                          capsys):
    """`gsae cache` said "already complete" of a cache with a chunk file gone, and `gsae train` failed only when
    its stream reached that chunk (hours into a long run); both now list the cache's folders first."""
    cache = _copy_of(trained, tmp_path)
    (cache / "layers" / "2" / "c" / "3" / "0").unlink()  # a training chunk, rows 1,500–1,999
    said = f"cache {cache}: layer 2 rows 1,500–1,999 cannot be read (chunk missing); run `gsae verify"
    line = _one_line_error(*run_cli(["train", "--cache", cache, "--out", tmp_path / "new", "--groups", 1, "--tokens",
                                     512, "--batch-size", 256], capsys)[::2])
    assert said in line, line
    assert not (tmp_path / "new").exists()
    again = ["cache", "--model", tiny_llama, "--cache", cache, "--tokens", 3000, "--context-length", 64,
             "--batch-size", 8, "--chunk-tokens", 500]
    code, out, err = run_cli(again, capsys)
    assert "already complete" not in out + err and said in _one_line_error(code, err)
    (cache / "tokens" / "c" / "0").unlink()  # the tokens matter to the cache (eval reads them), not to train
    line = _one_line_error(*run_cli(again, capsys)[::2])
    assert "layer 2 rows 1,500–1,999 cannot be read (chunk missing; 1 more chunk missing too)" in line, line
    (cache / "layers" / "2" / "c" / "3").rmdir()  # as a copy that never made the folder
    code, out, _ = run_cli(["verify", "--cache", cache], capsys)
    assert code == 1 and "layer 2 rows 1,500–1,999: chunk missing" in out and "tokens rows 0–499: chunk missing" in out


@pytest.mark.parametrize("where", ["local", "memory"])
def test_an_all_zero_chunk_is_absent_by_right_and_not_called_missing(where, tmp_path):
    """zarr stores no chunk equal to its fill value: an all-zero layer chunk has no file and is no damage
    (its statistics say it held nothing); a chunk with values whose file is gone is.  On a local folder and on
    an fsspec store (the listing differs)."""
    import os
    import time

    import numpy as np

    from stores import ActivationStore, compute_chunk_stats

    path = str(tmp_path / "c") if where == "local" else f"memory://gsae-test-{os.getpid()}-{time.time_ns()}/c"
    store = ActivationStore.create(path, n_layers=2, d_model=4, n_tokens=300, chunk_tokens=100)
    rng = np.random.default_rng(0)
    for chunk in range(3):
        layers = [rng.standard_normal((100, 4)).astype(np.float16) for _ in range(2)]
        if chunk == 1:
            layers[0][:] = 0  # layer 0's chunk 1: all zeros, stored as no file
        store.write_chunk(chunk, layers, np.arange(1, 101, dtype=np.int32), compute_chunk_stats(layers, "float16"))
    store.finalize()
    store = ActivationStore.open(path)
    assert "layers/0/c/1/0" not in store._chunk_files(store._layers[0])
    assert store.missing_chunks() == []
    store.check_chunks_present()
    assert [check for check in store.iter_chunk_checks() if check[-1]] == []  # `gsae verify` called it missing
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    fs.rm(f"{root}/layers/1/c/2/0")
    fs.rm(f"{root}/tokens/c/0")
    assert store.missing_chunks() == [(1, 200, 300), (-1, 0, 100)]
    assert store.missing_chunks(tokens=False) == [(1, 200, 300)]
    assert [check for check in store.iter_chunk_checks() if check[-1]] == [
        ("tokens", -1, 0, 100, "chunk missing"), ("layers/1", 1, 200, 300, "chunk missing")]  # chunk by chunk


def test_chunks_behind_a_symlinked_folder_are_there_and_a_nan_chunk_held_values(tmp_path):
    """zarr reads through a symlinked folder (a layer moved to another disk), so its chunks are not missing
    (helper-71: every one was); a chunk whose statistics are NaN held values, so its file gone is damage
    (NaN > 0 is false)."""
    import numpy as np

    from stores import ActivationStore, compute_chunk_stats

    path = tmp_path / "c"
    store = ActivationStore.create(str(path), n_layers=2, d_model=4, n_tokens=200, chunk_tokens=100)
    rng = np.random.default_rng(0)
    for chunk in range(2):
        layers = [rng.standard_normal((100, 4)).astype(np.float16) for _ in range(2)]
        layers[1][5, 2] = np.nan if chunk == 0 else layers[1][5, 2]
        store.write_chunk(chunk, layers, np.arange(1, 101, dtype=np.int32), compute_chunk_stats(layers, "float16"))
    store.finalize()
    (path / "layers" / "0" / "c").rename(tmp_path / "elsewhere")
    (path / "layers" / "0" / "c").symlink_to(tmp_path / "elsewhere")
    store = ActivationStore.open(str(path))
    assert store.missing_chunks() == []
    assert np.isnan(store._read_stats("chunk_norm_sum", (0, 1)))
    (path / "layers" / "1" / "c" / "0" / "0").unlink()
    assert store.missing_chunks() == [(1, 0, 100)]


def test_a_first_cache_refused_for_its_corpus_or_device_leaves_no_folder(tiny_neox, tmp_path, capsys, monkeypatch):
    """A bad --dataset (or --device) on the first `gsae cache` left an empty gsae-cache/, made for the cache's lock
    file; the corpus and the device are now checked before the lock is taken."""
    import torch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    refused = [["--dataset", tmp_path / "missing.txt"], ["--dataset", tmp_path / "empty.txt"]]
    if not torch.cuda.is_available():
        refused.append(["--device", "cuda"])
    for extra in refused:
        args = ["cache", "--model", tiny_neox, "--tokens", 200, "--context-length", 32, *extra]
        _one_line_error(*run_cli(args, capsys)[::2])
        assert not (tmp_path / "gsae-cache").exists(), extra
