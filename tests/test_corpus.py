"""Local corpora as stage one reads them: bounded tokenizer calls on huge lines and records, byte-order marks,
bad UTF-8, and Parquet text columns of every string type.  The reference is the tokenizer run on the whole text."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from pipeline import corpus as corpus_module
from pipeline.corpus import iter_windows, open_corpus, window_plan
from pipeline.errors import GsaeError

CONTEXT = 32


def _one_line() -> str:
    """Python's reference text as one line (its newlines and runs of spaces kept as spaces)."""
    from pydoc_data.topics import topics

    return " ".join(topics[k].replace("\n", " ") for k in sorted(topics)[:30])


def _windows(spec, tokenizer, **options) -> list[list[int]]:
    return list(iter_windows(open_corpus(str(spec), **options), tokenizer, window_plan(tokenizer, CONTEXT, None)))


def _reference_windows(texts: list[str], tokenizer) -> list[list[int]]:
    """Each text tokenized whole, joined by EOS, cut into windows of BOS + CONTEXT - 1 tokens."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    body = CONTEXT - 1
    return [[tokenizer.bos_token_id] + ids[i : i + body] for i in range(0, len(ids) - body + 1, body)]


@pytest.mark.parametrize("suffix", ["txt", "jsonl"])
def test_a_huge_line_or_record_is_tokenized_in_bounded_parts_with_the_whole_texts_tokens(suffix, tiny_neox,
                                                                                      tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_neox)
    line = _one_line()
    path = tmp_path / f"one.{suffix}"
    path.write_text(line if suffix == "txt" else json.dumps({"text": line}) + "\n")
    limit, per_call = 3000, 10_000
    assert len(line) > 30 * limit
    monkeypatch.setattr(corpus_module, "_TXT_BLOCK_CHARS", limit)
    monkeypatch.setattr(corpus_module, "_TOKENIZE_CHARS", per_call)
    calls: list[list[int]] = []

    class Recording:  # the tokenizer, with the pieces of each call recorded
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kwargs):
            calls.append([len(text) for text in texts])
            return tokenizer(texts, **kwargs)

    windows = _windows(path, Recording())
    assert windows == _reference_windows([line], tokenizer)
    # a .txt block gathers whole lines (here parts of one) until it holds the limit: under twice it
    piece = limit if suffix == "jsonl" else 2 * limit
    assert max(max(call) for call in calls) <= piece
    assert max(sum(call) for call in calls) < per_call + piece  # stops taking pieces past per_call characters


def test_a_jsonl_with_a_byte_order_mark_reads_as_without(tiny_neox, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_neox)
    texts = [_one_line()[i * 2000 : (i + 1) * 2000] for i in range(3)]
    lines = "".join(json.dumps({"text": text}) + "\n" for text in texts)
    (tmp_path / "plain.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text(lines, encoding="utf-8-sig")
    (tmp_path / "bom.txt").write_text(texts[0], encoding="utf-8-sig")
    assert _windows(tmp_path / "bom.jsonl", tokenizer) == _windows(tmp_path / "plain.jsonl", tokenizer)
    assert _windows(tmp_path / "bom.txt", tokenizer) == _reference_windows(texts[:1], tokenizer)


def test_a_jsonl_line_that_is_not_utf8_is_named(tiny_neox, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_neox)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "fine too"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(GsaeError, match=r"bad\.jsonl:3 is not valid UTF-8 \(byte 14 of the line\)"):
        _windows(path, tokenizer)


@pytest.mark.parametrize("kind", ["dictionary", "string_view", "large_string"])
def test_parquet_text_columns_of_every_string_type_read_alike(kind, tiny_neox, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "string_view" and not hasattr(pa, "string_view"):
        pytest.skip("this pyarrow has no string_view")
    tokenizer = AutoTokenizer.from_pretrained(tiny_neox)
    texts = [_one_line()[i * 1500 : (i + 1) * 1500] for i in range(4)] * 2  # repeats: what a dictionary holds
    column = pa.array(texts, pa.string())
    typed = {"dictionary": column.dictionary_encode(), "string_view": column.cast(getattr(pa, "string_view", pa.string)()),
             "large_string": column.cast(pa.large_string())}[kind]
    pq.write_table(pa.table({"text": column}), tmp_path / "plain.parquet")
    pq.write_table(pa.table({"text": typed}), tmp_path / "typed.parquet")
    assert pq.ParquetFile(tmp_path / "typed.parquet").schema_arrow.field("text").type != pa.string()
    assert _windows(tmp_path / "typed.parquet", tokenizer) == _windows(tmp_path / "plain.parquet", tokenizer)
    assert _windows(tmp_path / "plain.parquet", tokenizer) == _reference_windows(texts, tokenizer)


def test_line_parts_rejoin_to_the_line_and_cut_before_a_word_where_they_can():
    import random

    from pipeline.corpus import _line_parts

    rng = random.Random(0)
    for _ in range(3000):
        line = "".join(rng.choice("ab  \t") for _ in range(rng.randrange(0, 60)))
        limit = rng.randrange(1, 12)
        parts = list(_line_parts(line, limit))
        assert "".join(parts) == line and all(len(part) <= limit for part in parts) and all(parts[1:])
        for part, after in zip(parts, parts[1:]):  # cut before a space, or hard at the limit (a long word)
            assert after.startswith(" ") or len(part) == limit, (line, limit, parts)


def _first_bad_line(data: bytes) -> tuple[int, int] | None:
    """Brute force: (line, byte of the line) of the first byte that is not UTF-8, line by line."""
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return number, exc.start + 1
    return None


@pytest.mark.parametrize("suffix", ["txt", "jsonl"])
def test_a_text_file_that_is_not_utf8_is_refused_when_opened(suffix, tmp_path):
    """Latin-1 and UTF-16 text were cached as replacement characters and NULs; now the file:line is named
    when the corpus is opened (the pass that fingerprints it), before a model loads or a chunk is written.
    A character cut by the 4 MiB blocks of that pass is fine; the line of a bad byte past them is right."""
    def line(text: str) -> bytes:
        return (json.dumps({"text": text}) if suffix == "jsonl" else text).encode() + b"\n"

    good = line("caf\u00e9 na\u00efve \u20ac") * 3
    block = 1 << 22
    filler = line("x" * 1000) * (block // 1000 + 10)
    cut = filler[: block - 2] + b"\n"  # the first block ends one byte into the next line's first character
    cases = {
        "latin1": good + "caf\u00e9".encode("latin-1") + b"\n",
        "deep": cut + "\u00e9\u00e9".encode() + b"\n" + filler + b"ok \xff no\n",
        "utf16": "\ufeffhello world\n".encode("utf-16-le"),
        "utf16be": "\ufeffhello world\n".encode("utf-16-be"),
        "nul": good + b"bin\x00ary\n",
        "truncated": good + "\u20ac".encode()[:2],
        # a character cut by the blocks, then a byte that cannot continue it: the byte named is the cut one's first
        "cut_bad_a": filler[: block - 1] + b"\xc3A\n",
        "cut_bad_b": filler[: block - 2] + b"\xe2\x82(\n",
        "cut_bad_c": filler[: block - 1] + b"\xe2\x82(\n",
        "bad_then_nul": good + b"caf\xe9\nline\nbin\x00\n",  # the first of the two is named
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.{suffix}"
        path.write_bytes(data)
        with pytest.raises(GsaeError) as raised:
            open_corpus(str(path))
        message = str(raised.value)
        assert "\n" not in message
        if name.startswith("utf16"):
            assert message.startswith(f"{path} is UTF-16 text"), message
        elif name == "nul":
            byte = data.split(b"\n")[3].index(0) + 1
            assert f"{path}:4 holds a NUL byte (byte {byte} of the line)" in message, message
        elif name == "truncated":
            assert message == f"{path} ends inside a UTF-8 character (cut short?)"
        else:
            bad_line, byte = _first_bad_line(data)
            assert f"{path}:{bad_line} is not valid UTF-8 (byte {byte:,} of the line)" in message, message
    # valid UTF-8 with a character cut by the blocks, and a UTF-8 byte-order mark: read as before
    path = tmp_path / f"fine.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + cut + "\u00e9\u00e9 fine".encode() + b"\n")
    assert _first_bad_line(path.read_bytes()) is None
    open_corpus(str(path))


@pytest.mark.parametrize("line,kind", [('["a list"]', "a list"), ('"text"', "a string"), ("42", "a number"),
                                       ("null", "null"), ("true", "a boolean")])
def test_a_jsonl_line_that_is_not_an_object_is_named_so(line, kind, tiny_neox, tmp_path):
    """Not "has no 'text' field (set --text-field)": no field name would help."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_neox)
    path = tmp_path / "lines.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(GsaeError) as raised:
        _windows(path, tokenizer)
    assert str(raised.value) == f"{path}:2 is {kind}, not a JSON object (a .jsonl file holds one object per line)"


def test_a_named_pipe_is_refused_rather_than_waited_on(tmp_path):
    """A FIFO named as the corpus blocked until Ctrl-C (found by helper-68)."""
    import os

    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    with pytest.raises(GsaeError, match=r"corpus.txt: not a regular file"):
        open_corpus(str(fifo))


def test_a_folders_files_of_other_kinds_are_named_as_left_out(tmp_path):
    """A readme.md in a corpus folder was left out without a word ("3 file(s)")."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "more text"}) + "\n")
    (tmp_path / "readme.md").write_text("# about\n")
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden files are no one's corpus: not named
    described = open_corpus(str(tmp_path)).description
    assert "(2 file(s), " in described and described.endswith("; left out, not .txt, .jsonl or .parquet: readme.md)")
    for i in range(4):
        (tmp_path / f"note{i}.md").write_text("x")
    assert open_corpus(str(tmp_path)).description.endswith(": note0.md, note1.md, note2.md and 2 more)")
    (tmp_path / "readme.md").unlink()
    for i in range(4):
        (tmp_path / f"note{i}.md").unlink()
    assert "left out" not in open_corpus(str(tmp_path)).description
