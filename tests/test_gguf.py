"""A GGUF model (as the embedded SmolLM2-135M is shipped) loads with its file parsed once, and to the same
model and tokenizer that transformers' own loading, which parses it three times, gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from pipeline import models  # noqa: E402
from pipeline.models import load_model, resolve_model_spec  # noqa: E402

_GGUF_NAMES = {  # transformers' Llama names → GGUF's (llama.cpp's convert_hf_to_gguf)
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)  # model.layers.N.<module>.weight
    module, _, suffix = rest.rpartition(".")
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama written as a float32 GGUF file with its byte-level BPE tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = json.loads((tiny_llama / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    specials = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(specials["<s>"])
    writer.add_eos_token_id(specials["</s>"])
    writer.add_unk_token_id(specials["<|endoftext|>"])
    for name, tensor in model.state_dict().items():
        writer.add_tensor(_gguf_name(name), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _loaded(path: Path):
    lm = load_model(resolve_model_spec(str(path)), torch.device("cpu"))
    ids = lm.tokenizer("def f(x):\n    return x  # the quick brown fox", add_special_tokens=True)["input_ids"]
    return lm, ids


def test_a_gguf_file_is_parsed_once_and_loads_as_transformers_loads_it(tiny_gguf, monkeypatch):
    made: list[str] = []
    real_reader = gguf.GGUFReader

    def counting_reader(path, *args, **kwargs):
        made.append(str(path))
        return real_reader(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    fast, fast_ids = _loaded(tiny_gguf)
    once = len(made)
    assert gguf.GGUFReader is counting_reader  # put back after loading

    made.clear()
    monkeypatch.setattr(models, "gguf_parsed_once", lambda: __import__("contextlib").nullcontext())
    plain, plain_ids = _loaded(tiny_gguf)
    assert once == 1 and len(made) > 1  # transformers itself parses it for the config, the tokenizer, the weights

    assert fast_ids == plain_ids and len(fast_ids) > 5
    assert fast.model.config.to_dict() == plain.model.config.to_dict()
    fast_weights, plain_weights = fast.model.state_dict(), plain.model.state_dict()
    assert fast_weights.keys() == plain_weights.keys()
    for name in fast_weights:
        assert torch.equal(fast_weights[name], plain_weights[name]), name
    window = torch.tensor([fast_ids])
    with torch.inference_mode():
        assert torch.equal(fast.model(window).logits, plain.model(window).logits)


def test_the_gguf_names_are_restored_when_loading_fails(tmp_path):
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + np.zeros(16, np.uint8).tobytes())
    with pytest.raises(Exception):
        with models.gguf_parsed_once():
            assert gguf.GGUFReader is not reader
            gguf.GGUFReader(str(broken))
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map


@pytest.mark.parametrize("damage", ["cut in half", "random bytes after the header"])
def test_a_damaged_gguf_file_is_named_so_not_blamed_on_the_tokenizer(damage, tiny_gguf, tmp_path):
    """transformers reads the tokenizer first, so a damaged file failed as "could not load the tokenizer of ...:
    cannot reshape array of size 66784 into shape (576,360)" (found by helper-68 on the embedded model)."""
    from pipeline.errors import GsaeError

    data = tiny_gguf.read_bytes()
    broken = tmp_path / "broken.gguf"
    if damage == "cut in half":
        broken.write_bytes(data[: len(data) // 2])
    else:
        broken.write_bytes(data[:24] + np.random.default_rng(0).integers(0, 256, len(data) - 24, np.uint8).tobytes())
    with pytest.raises(GsaeError) as error:
        load_model(resolve_model_spec(str(broken)), torch.device("cpu"))
    message = str(error.value)
    # cut short: gguf's reader refuses a float32 file (its tensors are shaped as they are read); a quantized one
    # (the embedded model) it reads, and gsae compares the file's size with what its tensors need
    assert message.startswith(f"could not load the GGUF file {broken} (unreadable, damaged or cut short: ") or (
        message.startswith(f"could not load the GGUF file {broken} (cut short: {broken.stat().st_size:,} bytes, "
                           f"its tensors need {len(data):,})")), message
    assert "\n" not in message and "tokenizer" not in message.split(":")[0]


def test_a_gguf_file_cut_short_is_told_from_its_tensors_sizes(tiny_gguf, tmp_path, monkeypatch):
    """A quantized file cut short reads (gguf maps its tensors lazily) and fails in transformers; the message
    says how much is missing."""
    from pipeline.models import ModelSpec, gguf_error

    short = tmp_path / "short.gguf"
    data = tiny_gguf.read_bytes()
    short.write_bytes(data)
    real = gguf.GGUFReader
    whole = real(str(tiny_gguf))  # the tensors of the whole file, as a reader of a quantized cut file sees them
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, mode="r": whole)
    short.write_bytes(data[: len(data) - 1000])
    spec = ModelSpec("gguf", str(tmp_path), "short.gguf", str(short))
    message = str(gguf_error(spec, ValueError("cannot reshape array")))
    assert f"(cut short: {len(data) - 1000:,} bytes, its tensors need {len(data):,})" in message, message
    monkeypatch.setattr(gguf, "GGUFReader", real)
    whole_spec = ModelSpec("gguf", str(tiny_gguf.parent), tiny_gguf.name, str(tiny_gguf))
    message = str(gguf_error(whole_spec, ValueError("GGUF model with architecture x is not supported yet.")))
    assert message == f"could not load the GGUF file {tiny_gguf}: ValueError: GGUF model with architecture x is " \
                      "not supported yet.", message  # a whole file: transformers' error alone


def test_a_folder_whose_config_json_is_not_json_is_named_so(tiny_llama, tmp_path):
    import shutil

    from pipeline.errors import GsaeError

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(GsaeError, match=r"its config.json is not valid JSON") as error:
        load_model(resolve_model_spec(str(model)), torch.device("cpu"))
    assert "tokenizer" not in str(error.value)
