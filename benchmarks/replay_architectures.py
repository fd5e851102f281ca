"""`gsae eval`'s passes from the replaced block on (pipeline.block_replay.BlockReplay) against the whole model
with a hook (run_with_block_output), on tiny random models of every decoder-only architecture transformers has
that gsae loads (and two it refuses), built from configs here: which layers pass the check, the largest
difference of the logits (0 expected: bit for bit), and the time of both.

    python benchmarks/replay_architectures.py                 # every configuration, 2 at a time (~4 min here)
    python benchmarks/replay_architectures.py llama gemma2    # some of them
    python benchmarks/replay_architectures.py --workdir /tmp/replay   # keep the models and results.jsonl

Configurations the installed transformers lacks are reported as not built.  Each runs in a process of its own.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = Path(os.environ.get("GSAE_REPLAY_WORKDIR", "."))  # set by the driver for its workers
TOK = WORK / "tok"
MODELS = WORK / "models"

H = 32
COMMON_LLAMA = dict(hidden_size=H, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=256)


def configs():
    import transformers as t
    L = COMMON_LLAMA
    c: dict[str, callable] = {}
    c["gpt2"] = lambda: t.GPT2Config(n_embd=H, n_layer=3, n_head=4, n_positions=256)
    c["gpt_neox"] = lambda: t.GPTNeoXConfig(hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=256)
    c["llama"] = lambda: t.LlamaConfig(**L)
    c["mistral"] = lambda: t.MistralConfig(**L, sliding_window=16)
    c["mixtral"] = lambda: t.MixtralConfig(**L, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    c["qwen2"] = lambda: t.Qwen2Config(**L)
    c["qwen2_moe"] = lambda: t.Qwen2MoeConfig(**L, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=32, decoder_sparse_step=1)
    c["qwen3"] = lambda: t.Qwen3Config(**L, head_dim=8)
    c["qwen3_moe"] = lambda: t.Qwen3MoeConfig(**L, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, decoder_sparse_step=1)
    c["gemma"] = lambda: t.GemmaConfig(**L, head_dim=8)
    c["gemma2"] = lambda: t.Gemma2Config(**L, head_dim=8, sliding_window=16, attn_logit_softcapping=50.0,
                                         final_logit_softcapping=30.0)
    c["gemma3_text"] = lambda: t.Gemma3TextConfig(**{**L, "num_hidden_layers": 4}, head_dim=8, sliding_window=16,
                                                  layer_types=["sliding_attention", "full_attention"] * 2)
    c["phi"] = lambda: t.PhiConfig(hidden_size=H, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=256)
    c["phi3"] = lambda: t.Phi3Config(**L, pad_token_id=0)
    c["opt"] = lambda: t.OPTConfig(hidden_size=H, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                                   word_embed_proj_dim=H, max_position_embeddings=256, pad_token_id=0)
    c["gptj"] = lambda: t.GPTJConfig(n_embd=H, n_layer=3, n_head=4, rotary_dim=4, n_positions=256)
    c["falcon"] = lambda: t.FalconConfig(hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
                                         max_position_embeddings=256)
    c["falcon_alibi_newarch"] = lambda: t.FalconConfig(hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
                                                       num_kv_heads=2, new_decoder_architecture=True, alibi=False,
                                                       max_position_embeddings=256)
    c["bloom"] = lambda: t.BloomConfig(hidden_size=H, n_layer=3, n_head=4)
    c["stablelm"] = lambda: t.StableLmConfig(**L)
    c["starcoder2"] = lambda: t.Starcoder2Config(**L, sliding_window=16)
    c["gpt_bigcode"] = lambda: t.GPTBigCodeConfig(n_embd=H, n_layer=3, n_head=4, n_positions=256)
    c["cohere"] = lambda: t.CohereConfig(**L, pad_token_id=0)
    c["olmo"] = lambda: t.OlmoConfig(**L, pad_token_id=0)
    c["olmo2"] = lambda: t.Olmo2Config(**L, pad_token_id=0)
    c["mamba"] = lambda: t.MambaConfig(hidden_size=H, num_hidden_layers=3, state_size=8, expand=2, conv_kernel=4,
                                       use_mambapy=False)
    c["mamba2"] = lambda: t.Mamba2Config(hidden_size=H, num_hidden_layers=3, num_heads=8, head_dim=8, n_groups=1,
                                         state_size=8, expand=2, conv_kernel=4, chunk_size=16)
    c["falcon_mamba"] = lambda: t.FalconMambaConfig(hidden_size=H, num_hidden_layers=3, state_size=8, expand=2,
                                                    conv_kernel=4)
    c["recurrent_gemma"] = lambda: t.RecurrentGemmaConfig(num_hidden_layers=3, hidden_size=H, intermediate_size=64,
                                                          num_attention_heads=4, num_key_value_heads=2, lru_width=H,
                                                          attention_window_size=16, conv1d_width=4,
                                                          block_types=["recurrent", "recurrent", "attention"])
    c["jamba"] = lambda: t.JambaConfig(hidden_size=H, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=64, attn_layer_period=2, attn_layer_offset=1,
                                       expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                                       num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                                       mamba_dt_rank=8, use_mamba_kernels=False, max_position_embeddings=256)
    c["zamba"] = lambda: t.ZambaConfig(hidden_size=H, num_hidden_layers=5, num_attention_heads=4,
                                       num_key_value_heads=4, attention_head_dim=16, intermediate_size=64,
                                       mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                                       n_mamba_heads=2, attn_layer_period=2, attn_layer_offset=1,
                                       use_mamba_kernels=False, max_position_embeddings=256)
    c["zamba2"] = lambda: t.Zamba2Config(hidden_size=H, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=64, mamba_d_state=8,
                                         mamba_d_conv=4, mamba_expand=2, mamba_headdim=8, mamba_ngroups=1,
                                         chunk_size=16, num_mem_blocks=1,
                                         layers_block_type=["linear_attention", "hybrid"] * 2,
                                         use_mem_rope=True, use_shared_attention_adapter=False,
                                         max_position_embeddings=256, use_mamba_kernels=False)
    c["granite"] = lambda: t.GraniteConfig(**L, embedding_multiplier=12.0, residual_multiplier=0.22,
                                           logits_scaling=8.0, attention_multiplier=0.1)
    c["granitemoe"] = lambda: t.GraniteMoeConfig(**L, num_local_experts=4, num_experts_per_tok=2,
                                                 embedding_multiplier=12.0, residual_multiplier=0.22,
                                                 logits_scaling=8.0, attention_multiplier=0.1)
    c["deepseek_v3"] = lambda: t.DeepseekV3Config(hidden_size=H, intermediate_size=64, moe_intermediate_size=32,
                                                  num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=4,
                                                  n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                                                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                                  qk_nope_head_dim=8, v_head_dim=8, num_attention_heads=4,
                                                  num_key_value_heads=4, max_position_embeddings=256)
    c["glm"] = lambda: t.GlmConfig(**L, head_dim=8, pad_token_id=0)
    c["glm4"] = lambda: t.Glm4Config(**L, head_dim=8, pad_token_id=0)
    c["smollm3"] = lambda: t.SmolLM3Config(**L, pad_token_id=0)
    c["exaone4"] = lambda: t.Exaone4Config(**L, sliding_window=16, sliding_window_pattern=2,
                                           layer_types=["sliding_attention", "full_attention"] * 2)
    c["gpt_oss"] = lambda: t.GptOssConfig(**L, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=16,
                                          layer_types=["sliding_attention", "full_attention"] * 2)
    # ---- extras beyond the brief's list (hybrids, KV sharing, and encoders for the refusal path) ----
    LT4 = ["sliding_attention", "full_attention"] * 2
    c["gemma3n"] = lambda: t.Gemma3nTextConfig(hidden_size=H, num_hidden_layers=4, num_attention_heads=4,
                                                 num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                                 max_position_embeddings=256, sliding_window=16, layer_types=LT4,
                                                 vocab_size_per_layer_input=512, hidden_size_per_layer_input=8,
                                                 num_kv_shared_layers=2, laurel_rank=4, altup_num_inputs=2,
                                                 activation_sparsity_pattern=[0.0] * 4)
    c["gemma4"] = lambda: t.Gemma4TextConfig(hidden_size=H, num_hidden_layers=4, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=8, global_head_dim=8,
                                               intermediate_size=64, max_position_embeddings=256, sliding_window=16,
                                               layer_types=LT4, vocab_size_per_layer_input=512,
                                               hidden_size_per_layer_input=8, num_kv_shared_layers=2)
    c["gemma4_noshare"] = lambda: t.Gemma4TextConfig(hidden_size=H, num_hidden_layers=4, num_attention_heads=4,
                                                       num_key_value_heads=2, head_dim=8, global_head_dim=8,
                                                       intermediate_size=64, max_position_embeddings=256,
                                                       sliding_window=16, layer_types=LT4,
                                                       vocab_size_per_layer_input=512,
                                                       hidden_size_per_layer_input=8, num_kv_shared_layers=0)
    c["qwen3_next"] = lambda: t.Qwen3NextConfig(**L, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                                                  linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4,
                                                  num_experts_per_tok=2, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=32,
                                                  layer_types=["linear_attention", "full_attention"] * 2)
    c["falcon_h1"] = lambda: t.FalconH1Config(**L, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8,
                                                mamba_d_state=8, mamba_chunk_size=16)
    c["lfm2"] = lambda: t.Lfm2Config(**L, full_attn_idxs=[1, 3], block_multiple_of=16)
    c["bamba"] = lambda: t.BambaConfig(**L, attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_d_head=8,
                                         mamba_d_state=8, mamba_chunk_size=16)
    c["granitemoehybrid"] = lambda: t.GraniteMoeHybridConfig(**L, num_local_experts=4, shared_intermediate_size=32,
                                                               layer_types=["mamba", "attention"] * 2,
                                                               mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8,
                                                               mamba_chunk_size=16)
    c["nemotron_h"] = lambda: t.NemotronHConfig(hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=8, intermediate_size=64, max_position_embeddings=256,
                                                  layers_block_type=["mamba", "attention", "mlp", "mamba"],
                                                  ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=1,
                                                  chunk_size=16, use_mamba_kernels=False)
    c["cohere2"] = lambda: t.Cohere2Config(**L, sliding_window=16, pad_token_id=0,
                                             layer_types=LT4)
    c["olmo3"] = lambda: t.Olmo3Config(**L, sliding_window=16, pad_token_id=0, layer_types=LT4)
    c["llama4_text"] = lambda: t.Llama4TextConfig(**L, head_dim=8, intermediate_size_mlp=64, num_local_experts=2,
                                                    attention_chunk_size=16, no_rope_layer_interval=2)
    c["rwkv"] = lambda: t.RwkvConfig(hidden_size=H, num_hidden_layers=3, attention_hidden_size=H,
                                       intermediate_size=64, context_length=256)
    c["bert"] = lambda: t.BertConfig(hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=256)
    c["bert_decoder"] = lambda: t.BertConfig(hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
                                               intermediate_size=64, max_position_embeddings=256, is_decoder=True)
    c["t5"] = lambda: t.T5Config(d_model=H, d_kv=8, d_ff=64, num_layers=3, num_heads=4)
    return c


def build_tokenizer() -> None:
    if (TOK / "tokenizer.json").exists():
        return
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [topics[k] for k in sorted(topics)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text[:40], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(TOK)


def tb_tail(exc: BaseException) -> str:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return "".join(lines)[-1500:]


def flip(h):
    import torch
    return torch.cat([h[:, :1], h[:, 1:].flip(-1)], 1)


def zero(h):
    import torch
    return torch.cat([h[:, :1], torch.zeros_like(h[:, 1:])], 1)


def check(arch: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    from pipeline import models as pm
    from pipeline.block_replay import BlockReplay, run_with_block_output

    res: dict = {"arch": arch}
    tok = AutoTokenizer.from_pretrained(TOK)
    cfg = configs()[arch]()
    cfg.vocab_size = len(tok)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    folder = MODELS / arch
    shutil.rmtree(folder, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
        res["class"] = type(model).__name__
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    except Exception as exc:
        res.update(loaded=False, stage="build", error=tb_tail(exc))
        return res
    try:
        lm = pm.load_model(pm.resolve_model_spec(str(folder)), torch.device("cpu"))
    except Exception as exc:
        res.update(loaded=False, stage="load_model", error=f"{type(exc).__name__}: {exc}"[-1500:])
        return res
    res.update(loaded=True, n_layers=lm.n_layers, blocks_path=lm.blocks_path)
    vocab = lm.model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(1)
    batches = []
    for T in (48, 40):
        ids = torch.randint(3, min(vocab, len(tok)), (2, T), generator=gen)
        if tok.bos_token_id is not None:
            ids[:, 0] = tok.bos_token_id
        batches.append(ids)
    layers = list(range(lm.n_layers))
    try:
        rep = BlockReplay(lm, layers)
    except Exception as exc:
        res.update(error=tb_tail(exc))
        return res
    per_batch = []
    for bi, ids in enumerate(batches):
        b: dict = {"T": ids.shape[1]}
        try:
            t0 = time.perf_counter()
            clean_r = rep.clean(ids)
            b["t_clean"] = time.perf_counter() - t0
            b["usable"] = sorted(rep.replayable) if rep.replayable is not None else None
            b["kept"] = sorted(rep._kept)
            clean_w = run_with_block_output(lm, ids, 0, None)
            scale = max(1e-30, float(clean_w.abs().max()))
            b["clean_diff"] = float((clean_r - clean_w).abs().max()) / scale
            t_rep = t_whole = 0.0
            worst = 0.0
            worst_at = None
            changed_min = float("inf")
            bitwise = True
            for layer in layers:
                for name, f in (("flip", flip), ("zero", zero)):
                    t0 = time.perf_counter()
                    r = rep.run(layer, f)
                    t_rep += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    w = run_with_block_output(lm, ids, layer, f)
                    t_whole += time.perf_counter() - t0
                    if r.shape != w.shape:
                        worst, worst_at = float("inf"), (layer, name, "shape", list(r.shape), list(w.shape))
                        continue
                    d = float((r - w).abs().max()) / scale
                    bitwise &= bool(torch.equal(r, w))
                    if d > worst:
                        worst, worst_at = d, (layer, name)
                    changed_min = min(changed_min, float((w - clean_w).abs().max()) / scale)
            b.update(max_rel_diff=worst, worst_at=worst_at, bitwise=bitwise, min_rel_change=changed_min,
                     t_run=t_rep, t_whole=t_whole)
        except Exception as exc:
            b["error"] = tb_tail(exc)
        per_batch.append(b)
    res["batches"] = per_batch
    res["usable_final"] = sorted(rep.replayable) if rep.replayable is not None else None
    return res


def worker(archs: list[str]) -> None:
    build_tokenizer()
    for arch in archs:
        t0 = time.perf_counter()
        try:
            res = check(arch)
        except Exception as exc:
            res = {"arch": arch, "error": tb_tail(exc)}
        res["wall"] = time.perf_counter() - t0
        print("RESULT " + json.dumps(res, default=str), flush=True)


def driver(archs: list[str], out: Path, jobs: int = 2, timeout: float = 300) -> list[dict]:
    import concurrent.futures as cf

    def one(arch: str) -> dict:
        try:
            p = subprocess.run([sys.executable, __file__, arch], capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "GSAE_REPLAY_WORKER": "1"})
        except subprocess.TimeoutExpired:
            return {"arch": arch, "error": f"timeout after {timeout}s"}
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        return {"arch": arch, "error": f"rc={p.returncode}: {p.stderr[-1500:]}"}

    results = []
    with open(out, "w") as fh, cf.ThreadPoolExecutor(jobs) as ex:
        for res in ex.map(one, archs):
            results.append(res)
            fh.write(json.dumps(res) + "\n")
            fh.flush()
            b = res.get("batches") or [{}]
            print(res["arch"], res.get("loaded"), [x.get("usable") for x in b],
                  [x.get("max_rel_diff") for x in b], res.get("error", "")[-200:], flush=True)
    return results


def summary(results: list[dict]) -> None:
    loaded = [r for r in results if r.get("loaded")]
    every = [r for r in loaded if r.get("batches")
             and all(b.get("usable") == list(range(r["n_layers"])) for b in r["batches"])]
    diffs = [b.get("max_rel_diff") for r in loaded for b in r.get("batches", [])]
    errors = [r["arch"] for r in loaded if r.get("error") or any(b.get("error") for b in r.get("batches", []))]
    others = sorted(f"{r['arch']} {(r.get('batches') or [{}])[0].get('usable')}" for r in loaded if r not in every)
    print(f"{len(results)} configurations, {len(loaded)} loaded by gsae, {len(every)} with every layer replayable; "
          f"the others (the layers that are): {', '.join(others) or 'none'}")
    largest = max((d for d in diffs if d is not None), default=float("nan"))
    print(f"largest difference, replayed ÷ whole model's logits, relative to their largest: {largest:.3g}; "
          f"errors: {', '.join(errors) or 'none'}")
    whole = sum(b.get("t_whole", 0) for r in loaded for b in r.get("batches", []))
    replayed = sum(b.get("t_run", 0) for r in loaded for b in r.get("batches", []))
    print(f"time of the replaced passes, summed: replayed ÷ whole model = {replayed / max(whole, 1e-9):.3f}")


if __name__ == "__main__":
    import argparse
    import tempfile

    if os.environ.get("GSAE_REPLAY_WORKER"):
        worker(sys.argv[1:])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archs", nargs="*", help="configurations to run (default: all)")
    parser.add_argument("--workdir", default=None,
                        help="where the models and results.jsonl go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        WORK = Path(args.workdir or scratch).resolve()
        WORK.mkdir(parents=True, exist_ok=True)
        os.environ["GSAE_REPLAY_WORKDIR"] = str(WORK)
        TOK, MODELS = WORK / "tok", WORK / "models"
        build_tokenizer()
        results = driver(args.archs or list(configs()), WORK / "results.jsonl")
        summary(results)
