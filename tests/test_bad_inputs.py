"""Bad option values and unexpected failures end in one line on stderr, before anything is created; tables
written to a file or a pipe are not cut to 80 columns."""

from __future__ import annotations

import io

import pytest

from conftest import make_cache, run_cli
from pipeline.errors import GsaeError


def _one_line(code: int, err: str, expected_code: int = 1) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def llama_cache(tiny_llama, tmp_path_factory):
    """A complete cache of the 4-layer llama: 3 grouped layers."""
    return make_cache(tiny_llama, tmp_path_factory.mktemp("bad-inputs") / "cache", tokens=512, context_length=32,
                      batch_size=4, chunk_tokens=64)


# ------------------------------------------------------------------------------------------- backstop

@pytest.fixture
def broken_info(monkeypatch):
    """`gsae info` failing inside with whatever the test raises."""
    import cli

    def fail_with(exc: BaseException) -> None:
        def raise_it(*args, **kwargs):
            raise exc

        monkeypatch.setattr(cli, "_resolve_cache", raise_it)

    monkeypatch.delenv("GSAE_DEBUG", raising=False)
    return fail_with


def test_unexpected_exception_is_one_line(broken_info):
    broken_info(RuntimeError("something broke\nsecond line of the message"))
    line = _one_line(*run_cli(["info"])[::2])
    assert "RuntimeError: something broke" in line and "second line" not in line
    assert "--debug" in line


def test_ctrl_c_says_how_to_resume(broken_info):
    """typer turns Ctrl-C into exit code 130 before gsae's handler sees it; the line must still come."""
    broken_info(KeyboardInterrupt())
    code, out, err = run_cli(["info"])
    assert code == 130 and "interrupted" in out + err and "re-run the same command to resume" in out + err


def test_unexpected_exception_without_message(broken_info):
    broken_info(KeyError())
    line = _one_line(*run_cli(["info"])[::2])
    assert line.startswith("error: KeyError (")


def test_memory_error_is_one_line(broken_info):
    broken_info(MemoryError())
    line = _one_line(*run_cli(["info"])[::2])
    assert "ran out of memory" in line


def test_debug_still_raises(broken_info, monkeypatch):
    broken_info(RuntimeError("something broke"))
    with pytest.raises(RuntimeError, match="something broke"):
        run_cli(["--debug", "info"])
    monkeypatch.setenv("GSAE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        run_cli(["info"])


def test_usage_errors_still_exit_2():
    code, _, err = run_cli(["train", "--no-such-option"])
    assert code == 2 and "No such option" in err and "Traceback" not in err


# -------------------------------------------------------------------------------- option values

@pytest.mark.parametrize("keep_bits,dtype,bound", [(99, "float16", 9), (-1, "float16", 9), (10, "float16", 9),
                                                   (23, "float32", 22)])
def test_keep_bits_out_of_range(keep_bits, dtype, bound, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default cache goes to ./gsae-cache/<model>
    line = _one_line(*run_cli(["cache", "--model", tiny_llama, "--tokens", 200, "--compression", "lossy",
                               "--dtype", dtype, "--keep-bits", keep_bits])[::2])
    assert f"--keep-bits must be from 0 to {bound}" in line and str(keep_bits) in line
    assert list(tmp_path.iterdir()) == []  # no empty gsae-cache/ left behind


@pytest.mark.parametrize("command", ["group", "train"])
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_out_of_range(command, seed, llama_cache, tmp_path):
    extra = ["--out", tmp_path / "run", "--baseline"] if command == "train" else []
    line = _one_line(*run_cli([command, "--cache", llama_cache, "--seed", seed, *extra])[::2])
    assert "--seed must be from 0 to 4294967295" in line
    assert not (tmp_path / "run").exists() and not (llama_cache / "groups").exists()


@pytest.mark.parametrize("option", ["--lr", "--expansion"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_train_floats_must_be_positive_and_finite(option, value, llama_cache, tmp_path):
    line = _one_line(*run_cli(["train", "--cache", llama_cache, "--baseline", "--out", tmp_path / "run",
                               option, value])[::2])
    assert f"{option} must be a positive finite number" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["1", "0", "-5"])
def test_train_batch_size_needs_two_rows(value, llama_cache, tmp_path):
    """A step's FVU divides by its batch's variance: with one row it was 0 and the FVU 3.9e11."""
    line = _one_line(*run_cli(["train", "--cache", llama_cache, "--baseline", "--out", tmp_path / "run",
                               "--batch-size", value])[::2])
    assert "--batch-size must be at least 2" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--groups", "2,99"], "G can be at most 3"),
    (["--groups", "4"], "G can be at most 3"),
    (["--groups", "0"], "every G must be 1 or more"),
    (["--groups", "2,-1"], "every G must be 1 or more"),
    (["--expansion", "nan"], "--expansion must be a positive finite number"),
    (["--tokens", "0"], "--tokens must be positive (got 0)"),
    (["--windows", "-1"], "--windows must be 0"),
    (["--expansion", "0.1"], "--expansion 0.1 gives d_sae = 3 latents, no more than the k = 5"),
    ([], "holds 64 rows, fewer than the 100 an FVU needs"),  # the held-out slice: one chunk of 64 rows
])
def test_run_checks_before_anything_runs(args, message, llama_cache, tmp_path):
    line = _one_line(*run_cli(["run", "--cache", llama_cache, "--out", tmp_path / "runs", *args])[::2])
    assert message in line
    assert not (tmp_path / "runs").exists() and not (llama_cache / "groups").exists()


def test_a_cache_is_neither_written_into_as_a_run_nor_read_as_one(llama_cache, tmp_path):
    before = sorted(p.name for p in llama_cache.iterdir())
    line = _one_line(*run_cli(["train", "--cache", llama_cache, "--baseline", "--tokens", 512, "--batch-size", 256,
                               "--out", llama_cache])[::2])
    assert "is a gsae cache; pass --out a folder of its own" in line
    assert sorted(p.name for p in llama_cache.iterdir()) == before
    inside = sorted(str(p) for p in llama_cache.rglob("*"))
    for out in (llama_cache / "layers", llama_cache / "runs" / "r"):  # inside it: wrote beside layers/0
        line = _one_line(*run_cli(["train", "--cache", llama_cache, "--baseline", "--tokens", 512,
                                   "--batch-size", 256, "--out", out])[::2])
        assert f"is inside the gsae cache {llama_cache}" in line
    assert sorted(str(p) for p in llama_cache.rglob("*")) == inside
    for command in (["export", "--run", llama_cache], ["eval", "--run", llama_cache]):
        assert "is a gsae cache, not a run" in _one_line(*run_cli(command)[::2])


def test_a_held_out_slice_without_a_whole_window_is_refused_unless_windows_is_0():
    from types import SimpleNamespace

    from pipeline.evaluate import check_held_out

    store = SimpleNamespace(path="c", n_tokens=1000, attrs={"rows_per_window": 255})
    check_held_out(store, 500, 16)  # 500 rows: one whole window (from row 510)
    check_held_out(store, 850, 0)  # 150 rows, no window asked for
    with pytest.raises(GsaeError, match=r"c \(150 rows\) holds no whole window of 255 rows .* or pass --windows 0"):
        check_held_out(store, 850, 16)
    with pytest.raises(GsaeError, match="holds 60 rows, fewer than the 100"):
        check_held_out(store, 940, 0)


@pytest.mark.parametrize("command", ["export", "report", "run", "train"])
@pytest.mark.parametrize("under", [False, True])
def test_out_that_is_a_file(command, under, llama_cache, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "sub" if under else tmp_path / "a-file"
    (tmp_path / "run").mkdir()
    args = {"export": ["export", "--run", tmp_path / "run"], "report": ["report", "--runs", tmp_path / "run"],
            "run": ["run", "--cache", llama_cache], "train": ["train", "--cache", llama_cache]}[command]
    line = _one_line(*run_cli([*args, "--out", out])[::2])
    assert f"{tmp_path / 'a-file'} is a file, not a folder" in line
    assert (tmp_path / "a-file").read_text() == "not a folder"
    assert not (llama_cache / "groups").exists()


@pytest.mark.parametrize("command", ["eval", "export"])
def test_run_that_is_a_file(command, tmp_path):
    """A run's config.json given as --run: it names the file, not `gsae train --out <the file>`."""
    (tmp_path / "config.json").write_text("{}")
    line = _one_line(*run_cli([command, "--run", tmp_path / "config.json"])[::2])
    assert f"--run {tmp_path / 'config.json'} is a file, not a folder" in line and "gsae train" not in line


@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_report_cache_seconds(value, tmp_path):
    (tmp_path / "run").mkdir()
    line = _one_line(*run_cli(["report", "--runs", tmp_path / "run", "--out", tmp_path / "r",
                               "--cache-seconds", value])[::2])
    assert "--cache-seconds must be positive" in line
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- output to a file

def test_table_to_a_file_is_not_cut(monkeypatch):
    """eval's table, 13 columns, showed `0.…` in every cell when stdout was a file or a pipe."""
    import contextlib

    from rich.table import Table

    import cli

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(cli.report, "_width", None)
    table = Table()
    for n in range(13):
        table.add_column(f"column {n}", justify="right")
    table.add_row(*[f"{n}.123456789" for n in range(12)], "x" * 150)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.report.print(table)
    text = out.getvalue()
    assert "…" not in text and "x" * 150 in text
    assert all(f"{n}.123456789" in text for n in range(12))
    assert len(text.splitlines()[0]) > 80


def test_terminal_width_unchanged():
    from rich.console import Console

    import cli

    for columns in (None, 100):
        terminal = dict(file=io.StringIO(), force_terminal=True, width=columns)
        assert cli._Console(**terminal).size == Console(**terminal).size


def test_cache_summary_to_a_file_holds_the_whole_path(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    import cli

    monkeypatch.setattr(cli.report, "_width", None)
    path = tmp_path / ("a-rather-long-cache-name-" * 6 + "end")
    code, out, err = run_cli(["cache", "--model", tiny_llama, "--cache", path, "--tokens", 128, "--context-length",
                              32, "--batch-size", 4, "--chunk-tokens", 64])
    assert code == 0, err
    assert str(path) in out and "…" not in out


def test_keep_bits_without_lossy_is_refused(tiny_llama, tmp_path, monkeypatch):
    """--keep-bits only means something for a lossy cache: with lossless it was silently ignored."""
    monkeypatch.chdir(tmp_path)
    line = _one_line(*run_cli(["cache", "--model", tiny_llama, "--tokens", 200, "--keep-bits", 5])[::2])
    assert "--keep-bits" in line and "lossy" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("corpus,args,named", [
    (None, ["--text-field", "body"], "--text-field"),  # pydoc is plain text
    ("notes.txt", ["--text-field", "body"], "--text-field"),
    (None, ["--split", "validation"], "--split"),  # a hub dataset's part, not pydoc's
    ("notes.txt", ["--dataset-config", "en"], "--dataset-config"),
    ("texts", ["--split", "test"], "--split"),  # a local folder
])
def test_a_corpus_option_the_corpus_would_ignore_is_refused(corpus, args, named, tiny_llama, tmp_path, monkeypatch):
    """--text-field with pydoc or a .txt file, --split or --dataset-config with anything but a hub dataset
    were ignored without a word; they are refused before anything is made."""
    monkeypatch.chdir(tmp_path)
    if corpus is not None:
        (tmp_path / "texts").mkdir()
        for where in (tmp_path / "notes.txt", tmp_path / "texts" / "a.txt"):
            where.write_text("some text to cache\n" * 50)
    dataset = ["--dataset", corpus] if corpus is not None else []
    before = sorted(tmp_path.rglob("*"))
    line = _one_line(*run_cli(["cache", "--model", tiny_llama, "--tokens", 200, *dataset, *args])[::2])
    assert named in line and "leave" in line
    assert sorted(tmp_path.rglob("*")) == before


def test_text_field_of_a_jsonl_corpus_is_still_used(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"body": "some text to cache, again and again"}\n' * 40)
    code, out, err = run_cli(["cache", "--model", tiny_llama, "--tokens", 64, "--context-length", 16,
                              "--dataset", "c.jsonl", "--text-field", "body", "--cache", "c"])
    assert code == 0, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["group", "train"])
def test_device_cuda_without_cuda_is_one_line(command, llama_cache, tmp_path):
    code, _, err = run_cli([command, "--cache", llama_cache, "--device", "cuda",
                            *(["--out", tmp_path / "r", "--tokens", 512] if command == "train" else [])])
    assert code == 1 and "torch sees no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_model_folder_without_tokenizer_files_is_named(tiny_neox, tmp_path):
    """transformers builds an empty tokenizer, without an error, where the files are missing: every window
    would be empty (the cache used to fail with "the corpus holds no text")."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_neox, model)
    for name in model.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            name.unlink()
    text = tmp_path / "t.txt"
    text.write_text("Some text to cache. " * 50)
    code, _, err = run_cli(["cache", "--model", model, "--dataset", text, "--cache", tmp_path / "c", "--tokens", 256])
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "turns text into no tokens" in err and str(model) in err
    assert not (tmp_path / "c").exists()


def test_model_folder_with_a_tokenizer_config_but_no_tokenizer_file_is_named(tiny_neox, tmp_path):
    """tokenizer_config.json alone: transformers fails with a message about sentencepiece and slow
    tokenizers; gsae names the missing files."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_neox, model)
    (model / "tokenizer.json").unlink()
    assert (model / "tokenizer_config.json").exists()
    text = tmp_path / "t.txt"
    text.write_text("Some text to cache. " * 50)
    code, _, err = run_cli(["cache", "--model", model, "--dataset", text, "--cache", tmp_path / "c", "--tokens", 256])
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "cannot be built" in err and "tokenizer.json" in err and str(model) in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("launch", [["-c", "import sys; sys.argv[0] = 'gsae'; import cli; cli.entry()"], ["cli.py"],
                                    ["-m", "cli"]], ids=["gsae", "python cli.py", "python -m cli"])
@pytest.mark.parametrize("signum,code,said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_while_the_command_starts_is_one_line(signum, code, said, launch):
    """SIGINT during the imports (torch, transformers) printed a 30-line traceback out of torch's import; SIGTERM
    there ended the process without a word.  Also as `python cli.py` and `python -m cli` (torchrun's form in
    docs/scaling.md), where a SIGINT inside numpy's import ended in a 128-line RecursionError (helper-73)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    process = subprocess.Popen([sys.executable, *launch, "group"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # inside the imports (cli's, then torch's as the command starts): they take seconds
    process.send_signal(getattr(signal, signum))
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err and len([line for line in (out + err).splitlines() if line.strip()]) == 1
    assert f"{said} while starting: nothing was done" in out + err


def test_ctrl_c_after_the_command_is_over_ends_the_process_at_once():
    """A Ctrl-C once the command had finished landed in torch's atexit clean-up and printed "Exception ignored
    in atexit callback ... KeyboardInterrupt" with a traceback, after the run was saved.  Here a 30-s atexit
    callback (registered first, so it runs last) stands for that clean-up, or for a hung exit: Ctrl-C ends the
    process at once, with 130 and nothing more printed."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import atexit, sys, time; atexit.register(time.sleep, 30); sys.argv[0] = 'gsae'; import cli; "
              "cli.entry(); print('command over', flush=True)")
    process = subprocess.Popen([sys.executable, "-c", script, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # the help, then the marker: the command is over
        if line.strip() == "command over":
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)  # not the 30 s of the callback
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and not err.strip(), err


def _gsae_in_a_process(args: list, watched: set[str]) -> tuple[list[str], int, str, str]:
    """Run ``gsae ARGS`` in a fresh process: (which of ``watched`` modules it imported, its exit code, its stdout,
    its stderr)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import json, sys; sys.argv[0] = 'gsae'; import cli\n"
              "try:\n    cli.entry()\nexcept SystemExit as exc:\n    code = exc.code or 0\nelse:\n    code = 0\n"
              f"print('loaded:', json.dumps([sorted(set({sorted(watched)!r}) & set(sys.modules)), code]))")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    *_, last = done.stdout.strip().splitlines() or [""]
    assert last.startswith("loaded: "), done.stdout + done.stderr
    loaded, code = json.loads(last.removeprefix("loaded: "))
    return loaded, code, done.stdout, done.stderr


@pytest.mark.parametrize("args,code", [(["--help"], 0), (["train", "--help"], 0), (["cache", "--help"], 0),
                                       (["train", "--groups", "abc"], 2), (["train", "--architecture", "x"], 2)])
def test_help_and_usage_errors_load_no_torch(args, code):
    """`gsae --help`, a command's --help and a bad option's message took 3 s, all of it importing torch (and
    zarr) for the options' defaults; they come from modules that import neither now."""
    loaded, exit_code, out, err = _gsae_in_a_process(args, {"torch", "zarr", "transformers", "numpy"})
    assert (loaded, exit_code) == ([], code), out + err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["info", "verify"])
def test_info_and_verify_load_no_torch(command, llama_cache):
    """They read a store and run no model: they start in a fraction of the 3 s torch's import takes."""
    loaded, exit_code, out, err = _gsae_in_a_process([command, "--cache", llama_cache], {"torch", "transformers"})
    assert (loaded, exit_code) == ([], 0), out + err
    assert ("decode and match" if command == "verify" else "complete") in out


def test_a_command_still_caps_torch_threads_and_sets_its_signals(monkeypatch):
    """What main() did before any command, each command now does as it starts (cli._command)."""
    import signal

    import cli

    calls = []
    monkeypatch.setattr(cli, "_cap_torch_threads", lambda: calls.append("cap"))
    monkeypatch.setattr(cli, "_SIGTERM_STOPS_COMMANDS", True)
    before = signal.getsignal(signal.SIGTERM)
    try:
        code, _, err = run_cli(["group", "--cache", "/nonexistent/gsae-cache"])
        assert calls == ["cap"] and signal.getsignal(signal.SIGTERM) is cli._terminate
        assert code == 1 and "no gsae cache" in err
        signal.signal(signal.SIGTERM, before)
        code, _, err = run_cli(["info", "--cache", "/nonexistent/gsae-cache"])  # runs no torch: no cap
        assert calls == ["cap"] and signal.getsignal(signal.SIGTERM) is cli._terminate
        assert code == 1 and "no gsae cache" in err
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("text,value", [("100000", 100000), ("100_000", 100000), ("1,000", 1000), ("1e5", 100000),
                                        ("100k", 100000), ("2M", 2_000_000), ("1.5B", 1_500_000_000),
                                        ("2.5e3", 2500), (" 7 ", 7), ("-3", -3)])
def test_token_counts_as_researchers_write_them(text, value):
    import cli

    assert cli._count(text) == value


@pytest.mark.parametrize("text", ["1.5", "abc", "", "nan", "inf", "1e-3", "2x", "k"])
def test_token_counts_that_are_not_whole_numbers(text):
    code, _, err = run_cli(["group", "--cache", "/nonexistent", "--tokens", text])
    assert code == 2 and "Invalid value for '--tokens'" in err and "not a whole number" in err and "Traceback" not in err


def test_a_token_count_with_a_suffix_reaches_the_command(tmp_path):
    line = _one_line(*run_cli(["group", "--cache", tmp_path / "none", "--tokens", "2k"])[::2])
    assert "no gsae cache" in line  # past the parsing: --tokens 2k was taken


@pytest.mark.parametrize("command", ["cache", "train", "group"])
def test_a_token_count_past_2_to_the_53_is_refused(command):
    """1e30 overflowed a C size in `gsae cache` and lost its last digits to float division in `gsae train`."""
    import cli

    assert cli._count("9007199254740992") == 2**53 == cli.MAX_COUNT
    for text in ("1e30", "1e9999999", "-1e30", "1.5e30"):  # (the second: past decimal's own exponent)
        code, _, err = run_cli([command, "--tokens", text])
        assert code == 2 and f"'{text}' is more than gsae counts (at most 2^53 = 9,007,199,254,740,992)" in err, err


def test_train_out_holding_other_files_is_refused(llama_cache, tmp_path):
    """A new run's --out that holds other files (no run's config.json): one line, nothing written there; an
    empty folder, or one holding only a run's lock file and a killed write's temporary, is taken."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    line = _one_line(*run_cli(["train", "--cache", llama_cache, "--out", out, "--baseline", "--tokens", 1024,
                               "--batch-size", 64])[::2])
    assert line == f"error: --out {out} already holds notes.md, not a gsae run; pass an empty or new folder"
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]
    (out / "notes.md").unlink()
    (out / ".lock").write_text("")
    (out / f".config.json.{'0' * 32}.partial").write_text("{")  # a run killed while writing its config
    code, _, err = run_cli(["train", "--cache", llama_cache, "--out", out, "--baseline", "--tokens", 1024,
                            "--batch-size", 64])
    assert code == 0, err


@pytest.mark.parametrize("command", ["eval", "export", "report"])
def test_a_run_that_does_not_exist_or_is_a_file(command, tmp_path):
    """Named so, not as "not a gsae run; `gsae train --out <it>` makes one" (which a file cannot be)."""
    option = "--runs" if command == "report" else "--run"
    line = _one_line(*run_cli([command, option, tmp_path / "none"])[::2])
    assert line == f"error: {tmp_path / 'none'} does not exist: give a run's folder (the --out of `gsae train`)"
    (tmp_path / "a-file").write_text("")
    line = _one_line(*run_cli([command, option, tmp_path / "a-file"])[::2])
    assert line == f"error: {option} {tmp_path / 'a-file'} is a file, not a folder; choose another {option}"
    (tmp_path / "empty").mkdir()
    line = _one_line(*run_cli([command, option, tmp_path / "empty"])[::2])
    assert "is not a gsae run (no config.json)" in line


def test_a_ctrl_c_that_lands_in_a_finalizer_is_not_lost():
    """Python reports a KeyboardInterrupt raised in a ``__del__`` as "Exception ignored" and goes on: a Ctrl-C
    landing there was lost, and `gsae train` ran to its end (helper-73).  The program's hook raises it again."""
    import subprocess
    import sys

    from conftest import ROOT

    # inside a function, as a command runs (at a module's top level Python 3.13 let the interrupt past the
    # `except` of a busy loop there, with or without the hook)
    script = (
        "import sys, time; import cli  # (as a library: no start-up handler, the command's SIGINT)\n"
        "sys.unraisablehook = cli._interrupts_from_finalizers(sys.unraisablehook)\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt  # as a SIGINT's handler raises it, where the signal lands\n"
        "def command():\n"
        "    try:\n"
        "        Finalized()\n"
        "        started = time.monotonic()\n"
        "        while time.monotonic() - started < 5:\n"
        "            time.sleep(0.001)\n"
        "        print('lost')\n"
        "    except KeyboardInterrupt:\n"
        "        print('raised again')\n"
        "command()\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "raised again", result.stdout + result.stderr
