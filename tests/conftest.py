"""Tiny models built from a config (GPT-NeoX as in Pythia, Llama as in SmolLM2, GPT-2), saved with
save_pretrained and loaded through the same path users take (a local folder given to --model)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
# as the gsae command sets it (cli.py), and before torch loads its OpenMP runtime, which reads it only then:
# spinning OpenMP threads beside the writer's and decode's threads made the tiny models' forwards up to 30×
# slower on 2 cores, and the suite about twice as long
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A shell without job control starts a command run in the background (`.ci/run &`) with SIGINT ignored, and
# the commands the tests start would inherit that: the tests of Ctrl-C need it delivered
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _pydoc_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer trained on the pydoc corpus, with BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_pydoc_text()[:40], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def _save(model: torch.nn.Module, tokenizer_dir: Path, path: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def build_tiny_model(kind: str, tokenizer_dir: Path, path: Path, embedding_scale: float = 1.0) -> Path:
    """Save a tiny randomly initialised causal LM of ``kind`` (neox, llama, gpt2) to ``path``."""
    from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if kind == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=256, **common))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=256, **common))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common))
    else:
        raise ValueError(kind)
    if embedding_scale != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(embedding_scale)
    return _save(model, tokenizer_dir, path)


@pytest.fixture(scope="session")
def tiny_models(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    return {kind: build_tiny_model(kind, tokenizer_dir, tmp_path_factory.mktemp(kind))
            for kind in ("neox", "llama", "gpt2")}


@pytest.fixture(scope="session")
def tiny_neox(tiny_models) -> Path:
    return tiny_models["neox"]


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def run_cli(args: list[str], capsys=None) -> tuple[int, str, str]:
    """Run ``gsae ARGS`` in this process through ``cli.main`` (the program's entry point, ``cli.entry``, adds only
    its process-wide signal handlers, which a test process must not take); return (exit code, out, err).

    Without ``capsys`` the output goes to a buffer of its own."""
    import contextlib
    import io

    import cli

    if capsys is None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _main(cli, args)
        return code, out.getvalue(), err.getvalue()
    code = _main(cli, args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _main(cli, args: list[str]) -> int:
    old = sys.argv
    sys.argv = ["gsae", *[str(a) for a in args]]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    return code


def make_cache(model: Path, path: Path, tokens: int, context_length: int, batch_size: int, chunk_tokens: int) -> Path:
    """A complete cache of ``model`` on the pydoc corpus, made through the CLI."""
    code, _, err = run_cli(["cache", "--model", model, "--cache", path, "--tokens", tokens, "--context-length",
                            context_length, "--batch-size", batch_size, "--chunk-tokens", chunk_tokens])
    assert code == 0, err
    return path


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port for the whole session; every process started from the
    tests (subprocesses, Dask workers) finds it and its dummy credentials through the environment."""
    pytest.importorskip("s3fs")
    from s3_local import start_moto

    server, endpoint = start_moto()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="gsae-test", AWS_SECRET_ACCESS_KEY="gsae-test",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the session's S3 server: ``s3://<name>``."""
    import uuid

    import s3fs

    name = f"gsae-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"
