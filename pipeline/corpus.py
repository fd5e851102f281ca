"""Text sources for stage one and their cutting into fixed-length token windows."""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import GsaeError
from stores.messages import first_line
from pipeline.hub import hub_reachable

EMBEDDED_CORPUS = "pydoc"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_TXT_BLOCK_CHARS = 1 << 20  # long .txt files are tokenized in blocks of whole lines (a longer line: in parts)
# one tokenizer call takes at most this many pieces, and stops taking more once they hold this many characters: a
# fast tokenizer held about 50 bytes a character (64 blocks of 1 MiB took 3.4 GB)
_TOKENIZE_BATCH = 64
_TOKENIZE_CHARS = 4 << 20

# A document is a stream of text pieces; consecutive pieces of one document are joined without a
# separator (long files are split at line ends to bound memory).
Document = Iterator[str]


@dataclass
class Corpus:
    """A named source of documents; ``documents()`` starts it again from the beginning."""

    spec: str
    kind: str  # "pydoc" | "local" | "hub"
    description: str
    fingerprint: str
    documents: Callable[[], Iterator[Document]]
    path: str | None = None  # a local corpus's absolute path (``spec`` is as typed, maybe relative)


# ------------------------------------------------------------------------------- sources
def _pydoc_corpus() -> Corpus:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    digest = hashlib.sha256("".join(topics[k] for k in keys).encode()).hexdigest()[:16]
    return Corpus(EMBEDDED_CORPUS, "pydoc", f"Python reference topics (pydoc_data.topics, {len(keys)} documents)",
                  digest, lambda: (iter([topics[k]]) for k in keys))


def _line_parts(line: str, limit: int | None = None) -> Iterator[str]:
    """``line`` (a line of a .txt file, a record's text) in parts of at most ``limit`` characters (default
    _TXT_BLOCK_CHARS), each cut before a space that starts a word where there is one (where byte-level BPE and
    Metaspace tokenizers start a token, so the parts' tokens are the whole line's; one whose normalizer puts
    "▁" in front of every text, as Llama 2's, gives one more token at each cut, as at the 1 MiB blocks of a
    .txt file): a file that is one long
    line, or one huge record, is tokenized in bounded parts too (whole, one 1.4 MB line took 0.77 GB in the
    tokenizer, a 42 MB one 7.5 GB)."""
    limit = limit or _TXT_BLOCK_CHARS
    start = 0
    while len(line) - start > limit:
        cut = line.rfind(" ", start + 1, start + limit + 1)
        while cut > start and line[cut + 1 : cut + 2].isspace():  # inside a run of spaces: before the run's last
            cut = line.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + limit
        yield line[start:cut]
        start = cut
    yield line[start:] if start else line


def _txt_documents(path: Path) -> Iterator[Document]:
    def pieces() -> Iterator[str]:
        block: list[str] = []
        size = 0
        # utf-8-sig: a byte-order mark is not text
        with path.open(encoding="utf-8-sig", errors="replace") as handle:
            for line in handle:
                for part in _line_parts(line):
                    block.append(part)
                    size += len(part)
                    if size >= _TXT_BLOCK_CHARS:
                        yield "".join(block)
                        block, size = [], 0
        if block:
            yield "".join(block)

    yield pieces()


def _text(value: Any, where: str, text_field: str) -> str:
    """A record's text: a string, or "" for a null (a row without text); anything else is refused, not
    cached as its Python spelling ("42", "['a', 'list']")."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise GsaeError(f"{where}: its {text_field!r} is {type(value).__name__} {repr(value)[:40]}, not text "
                        "(set --text-field)")
    return value


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:  # utf-8-sig on the first line: a byte-order mark is not JSON
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise GsaeError(f"{path}:{number} is not valid UTF-8 (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise GsaeError(f"{path}:{number} is not valid JSON") from None
            if not isinstance(record, dict):
                kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(record), "a number")
                raise GsaeError(f"{path}:{number} is {kind}, not a JSON object (a .jsonl file holds one object per line)")
            if text_field not in record:
                raise GsaeError(f"{path}:{number} has no {text_field!r} field (set --text-field)")
            yield _line_parts(_text(record[text_field], f"{path}:{number}", text_field))


def _parquet_documents(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise GsaeError(f"cannot read {path} as parquet: {first_line(exc)}") from None
    if text_field not in parquet.schema_arrow.names:
        raise GsaeError(f"{path} has no {text_field!r} column (set --text-field)")
    kind = parquet.schema_arrow.field(text_field).type
    if not _is_text(pa, kind.value_type if pa.types.is_dictionary(kind) else kind):  # dictionary: a categorical
        raise GsaeError(f"{path}'s {text_field!r} column holds {kind}, not text (set --text-field)")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:  # a null is a row without text
                yield _line_parts(text)


def _is_text(pa: Any, kind: Any) -> bool:
    """Whether an Arrow type holds strings (string_view: pyarrow 16 on)."""
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind))


class _Utf8Check:
    """Refuse a text file that is not UTF-8, read block by block in the pass that fingerprints it (before the
    model loads, and before a cache holds any of it): a Latin-1 or UTF-16 .txt was cached as replacement
    characters and NULs without a word, and a bad line deep in a .jsonl stopped a cache half-way.  It costs
    ~2 s per GB of text at open (0.45 s for 200 MB of pydoc text here, beside sha256's 0.17 s), against the
    hours of caching that much text."""

    def __init__(self, file: Path):
        self.file, self.offset, self.lines, self.line_start = file, 0, 0, 0  # (line_start: its byte in the file)
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def _where(self, position: int, block: bytes) -> tuple[str, int]:
        """``file:line`` of byte ``position`` of ``block`` (negative: in the bytes of a character the last
        block cut, which hold no newline), and that byte's place in its line."""
        line = self.lines + block.count(b"\n", 0, max(0, position)) + 1
        newline = block.rfind(b"\n", 0, max(0, position))
        start = self.offset + newline + 1 if newline >= 0 else self.line_start
        return f"{self.file}:{line}", self.offset + position - start + 1

    def feed(self, block: bytes) -> None:
        if self.offset == 0 and block[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise GsaeError(f"{self.file} is UTF-16 text (its byte-order mark says so); gsae reads UTF-8: re-encode "
                            "it (iconv -f UTF-16 -t UTF-8)")
        pending = len(self.decoder.getstate()[0])  # the bytes of a character the last block cut
        bad = None
        try:
            self.decoder.decode(block)
        except UnicodeDecodeError as exc:
            bad = exc.start - pending
        nul = block.find(b"\x00", 0, len(block) if bad is None else max(0, bad))  # whichever comes first
        if nul >= 0:
            where, byte = self._where(nul, block)
            raise GsaeError(f"{where} holds a NUL byte (byte {byte:,} of the line): not UTF-8 text (UTF-16, or not "
                            "text at all?)")
        if bad is not None:
            where, byte = self._where(bad, block)
            raise GsaeError(f"{where} is not valid UTF-8 (byte {byte:,} of the line); re-encode the file as UTF-8 "
                            "(iconv -f <its encoding> -t UTF-8)")
        newline = block.rfind(b"\n")
        if newline >= 0:
            self.line_start = self.offset + newline + 1
        self.offset += len(block)
        self.lines += block.count(b"\n")

    def finish(self) -> None:
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise GsaeError(f"{self.file} ends inside a UTF-8 character (cut short?)") from None


def _file_documents(path: Path, text_field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_documents(path)
    if suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    return _parquet_documents(path, text_field)


def _local_corpus(spec: str, path: Path, text_field: str) -> Corpus:
    skipped: list[Path] = []
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in found if p.suffix.lower() in LOCAL_SUFFIXES]
        skipped = [p for p in found if p.suffix.lower() not in LOCAL_SUFFIXES and not p.name.startswith(".")]
        if not files:
            raise GsaeError(f"folder {spec} holds no .txt, .jsonl or .parquet file")
    elif path.suffix.lower() in LOCAL_SUFFIXES:
        if not path.is_file():  # a named pipe (or a device) blocked until Ctrl-C, then was read twice at best
            raise GsaeError(f"cannot read {spec}: not a regular file (gsae reads a corpus twice, for its "
                            "fingerprint and to cache it: save the text to a file)")
        files = [path]
    else:
        raise GsaeError(f"cannot read {spec}: a dataset file must end in .txt, .jsonl or .parquet")
    digest = hashlib.sha256(text_field.encode())
    try:
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            check = _Utf8Check(file) if file.suffix.lower() in (".txt", ".jsonl") else None
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
                    if check is not None:
                        check.feed(block)
            if check is not None:
                check.finish()
    except OSError as exc:
        raise GsaeError(f"cannot read {spec}: {exc.strerror or exc}") from None
    size = sum(f.stat().st_size for f in files)

    def documents() -> Iterator[Document]:
        for file in files:
            yield from _file_documents(file, text_field)

    # a folder's files of other kinds are left out, and said so (a readme.md was left out without a word)
    left_out = (f"; left out, not .txt, .jsonl or .parquet: {', '.join(str(p.relative_to(path)) for p in skipped[:3])}"
                + (f" and {len(skipped) - 3:,} more" if len(skipped) > 3 else "")) if skipped else ""
    return Corpus(spec, "local", f"{path.resolve()} ({len(files)} file(s), {size:,} bytes{left_out})",
                  digest.hexdigest()[:16], documents, str(path.resolve()))


def _hub_corpus(spec: str, config: str | None, split: str, text_field: str) -> Corpus:
    import datasets

    if not hub_reachable():
        raise GsaeError(
            f"could not fetch dataset {spec!r} from the Hugging Face Hub (no connection), and no local file or "
            f"folder is named so here; pass a local "
            ".txt/.jsonl/.parquet file or folder to --dataset, or leave it out to use the embedded pydoc corpus"
        )

    def documents() -> Iterator[Document]:
        try:
            stream = datasets.load_dataset(spec, name=config, split=split, streaming=True)
        except Exception as exc:
            raise GsaeError(f"could not open dataset {spec!r}: {first_line(exc)}") from None
        for number, record in enumerate(stream):
            if text_field not in record:
                raise GsaeError(f"dataset {spec!r} has no {text_field!r} field (set --text-field)")
            text = _text(record[text_field], f"dataset {spec!r} row {number}", text_field)
            if text:
                yield _line_parts(text)

    label = f"{spec}" + (f" ({config})" if config else "") + f" split {split}"
    fingerprint = hashlib.sha256(f"{spec}|{config}|{split}|{text_field}".encode()).hexdigest()[:16]
    return Corpus(spec, "hub", f"Hugging Face dataset {label}, streamed", fingerprint, documents)


def check_corpus_options(spec: str | None, *, text_field: str = "text", split: str = "train",
                         config: str | None = None) -> None:
    """Refuse, before anything runs, a corpus option that ``spec`` would ignore: ``--split`` and
    ``--dataset-config`` choose a hub dataset's part; ``--text-field`` names a field of .jsonl, .parquet
    and hub records, which pydoc and .txt files do not have."""
    spec = spec or EMBEDDED_CORPUS
    path = Path(spec).expanduser()
    hub = spec != EMBEDDED_CORPUS and not path.exists()
    kind = "folder" if path.is_dir() else "file"
    what = "the embedded pydoc corpus" if spec == EMBEDDED_CORPUS else f"the local {kind} {spec}"
    if not hub and (split != "train" or config is not None):
        option = "--split" if split != "train" else "--dataset-config"
        raise GsaeError(f"{option} chooses a part of a hub dataset; {what} has none (leave {option} out)")
    plain_text = spec == EMBEDDED_CORPUS or (path.is_file() and path.suffix.lower() == ".txt")
    if plain_text and text_field != "text":
        raise GsaeError(f"--text-field names a field of .jsonl, .parquet or hub records; {what} is plain text "
                        "(leave --text-field out)")


def open_corpus(spec: str | None, *, text_field: str = "text", split: str = "train",
                config: str | None = None) -> Corpus:
    """Resolve ``--dataset``: ``pydoc`` (default), a local file or folder, or a hub dataset id."""
    spec = spec or EMBEDDED_CORPUS
    if spec == EMBEDDED_CORPUS:
        return _pydoc_corpus()
    path = Path(spec).expanduser()
    if path.exists():
        return _local_corpus(spec, path, text_field)
    if path.suffix.lower() in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
        raise GsaeError(f"dataset {spec} does not exist")
    return _hub_corpus(spec, config, split, text_field)


def check_has_text(corpus: Corpus) -> None:
    """Read the corpus up to its first text: a record without the text field, invalid JSON or a corpus
    with no text at all is refused before the model loads (tens of seconds) rather than after.  A hub
    dataset is streamed: this opens it once more than the cache's own read (one more round trip)."""
    for document in corpus.documents():
        for piece in document:
            if piece.strip():
                return
    raise GsaeError(f"corpus {corpus.spec} holds no text (white space at most)")


# ------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class WindowPlan:
    """How documents become model inputs: windows of ``context_length`` tokens."""

    context_length: int
    bos_token_id: int | None  # prepended to every window when not None
    separator_token_id: int | None  # placed between documents when not None

    @property
    def body_length(self) -> int:
        return self.context_length - (self.bos_token_id is not None)


def window_plan(tokenizer: Any, context_length: int, prepend_bos: bool | None) -> WindowPlan:
    """BOS when the tokenizer has one (unless ``prepend_bos`` is False); EOS (else BOS) separates documents."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if prepend_bos and bos is None:
        raise GsaeError("--prepend-bos was asked for, but the tokenizer has no BOS token")
    use_bos = bos if (prepend_bos is None or prepend_bos) else None
    if context_length < 2 + (use_bos is not None):
        raise GsaeError(f"--context-length must be at least {2 + (use_bos is not None)} with "
                        f"{'the BOS in front' if use_bos is not None else 'no BOS'} (got {context_length})")
    return WindowPlan(context_length, use_bos, eos if eos is not None else bos)


def iter_windows(corpus: Corpus, tokenizer: Any, plan: WindowPlan) -> Iterator[list[int]]:
    """Token windows in corpus order: documents tokenized, joined by the separator, cut into
    windows of ``plan.context_length`` tokens (BOS first when the plan has one). A trailing part
    shorter than a window is dropped."""
    body = plan.body_length
    prefix = [plan.bos_token_id] if plan.bos_token_id is not None else []
    buffer: list[int] = []
    first_document = [True]
    pending: list[tuple[str, bool]] = []  # (text piece, starts a new document)

    def flush() -> Iterator[list[int]]:
        nonlocal buffer
        encoded = tokenizer([text for text, _ in pending], add_special_tokens=False)["input_ids"]
        for (_, new_document), ids in zip(pending, encoded):
            if new_document and not first_document[0] and plan.separator_token_id is not None:
                buffer.append(plan.separator_token_id)
            first_document[0] = False
            buffer.extend(ids)
        pending.clear()
        start = 0
        while len(buffer) - start >= body:
            yield prefix + buffer[start : start + body]
            start += body
        buffer = buffer[start:]

    characters = 0
    for document in corpus.documents():
        new_document = True
        for piece in document:
            if piece:
                pending.append((piece, new_document))
                new_document = False
                characters += len(piece)
            if len(pending) >= _TOKENIZE_BATCH or characters >= _TOKENIZE_CHARS:
                yield from flush()
                characters = 0
    if pending:
        yield from flush()
