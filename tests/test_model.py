"""The model against an independent implementation (Hugging Face transformers) and against itself."""

import json
import os

import pytest
import torch

from llama.formats.base import load_shard
from llama.config import ModelArgs
from llama.model import rotary_angles
from llama.ops import apply_rotary

transformers = pytest.importorskip("transformers")


def hf_model_from_meta(ckpt_dir: str, vocab_size: int):
    """Build transformers' LlamaForCausalLM from a 1-shard Meta checkpoint, converting the weights here (not with
    the library's converter) so the comparison is independent."""
    with open(os.path.join(ckpt_dir, "params.json")) as f:
        params = json.load(f)
    args = ModelArgs.from_params(params, vocab_size=vocab_size)
    meta = load_shard(os.path.join(ckpt_dir, "consolidated.00.pth"))
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )

    def unpermute(w, n_heads):
        # Meta rotates interleaved pairs (2i, 2i+1); HF rotates halves (i, i + D/2): reorder each head's rows.
        hd = w.shape[0] // n_heads
        return w.view(n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(n_heads * hd, -1)

    hf = {"model.embed_tokens.weight": meta["tok_embeddings.weight"], "model.norm.weight": meta["norm.weight"],
          "lm_head.weight": meta["output.weight"]}
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf[h + "self_attn.q_proj.weight"] = unpermute(meta[m + "attention.wq.weight"], args.n_heads)
        hf[h + "self_attn.k_proj.weight"] = unpermute(meta[m + "attention.wk.weight"], args.n_kv_heads)
        hf[h + "self_attn.v_proj.weight"] = meta[m + "attention.wv.weight"]
        hf[h + "self_attn.o_proj.weight"] = meta[m + "attention.wo.weight"]
        hf[h + "mlp.gate_proj.weight"] = meta[m + "feed_forward.w1.weight"]
        hf[h + "mlp.down_proj.weight"] = meta[m + "feed_forward.w2.weight"]
        hf[h + "mlp.up_proj.weight"] = meta[m + "feed_forward.w3.weight"]
        hf[h + "input_layernorm.weight"] = meta[m + "attention_norm.weight"]
        hf[h + "post_attention_layernorm.weight"] = meta[m + "ffn_norm.weight"]
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    return model


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_logits_match_transformers(build, tiny_dir, config):
    generator = build(config)
    hf = hf_model_from_meta(str(tiny_dir / f"{config}-mp1"), generator.tokenizer.n_words)
    tokens = torch.randint(0, generator.tokenizer.n_words, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = generator.model.forward(tokens.to(device_of(generator.model)), 0).cpu()
        theirs = hf(tokens).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, 40, generator.tokenizer.n_words)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("config", ["mha", "gqa"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_logits_track_transformers_in_fp32(build, tiny_dir, device, config, dtype):
    """Rounding to a p-bit significand (eps = 2^(1-p): bf16 2^-7, fp16 2^-10) errs by a relative amount uniform in
    +-eps/2, RMS eps/(2*sqrt(3)). A logit here comes through ~25 roundings in sequence (the weights; per layer two
    norms, q/k/v, scores, softmax, attention out, wo, w1/w3, SiLU times w3, w2, two residual adds; the final norm and
    output); independent errors add in quadrature: relative RMS ~ 5 * eps / 3.5 ~ 1.4 eps (measured in bf16 on the
    CPU: 1.1 eps). The bound, 4 eps, is ~3x that, and ~100x below what a wrong op (errors of order 1) gives."""
    if dtype == "fp16" and device.type == "cpu":
        pytest.skip("the library refuses fp16 on the CPU (test_build_rejects_fp16_on_cpu)")
    generator = build(config, dtype=dtype)
    hf = hf_model_from_meta(str(tiny_dir / f"{config}-mp1"), generator.tokenizer.n_words)
    tokens = torch.randint(0, generator.tokenizer.n_words, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = generator.model.forward(tokens.to(device), 0).float().cpu()
        theirs = hf(tokens).logits
    eps = torch.finfo(torch.bfloat16 if dtype == "bf16" else torch.float16).eps
    rel_rms = ((ours - theirs).pow(2).mean().sqrt() / theirs.pow(2).mean().sqrt()).item()
    assert rel_rms <= 4 * eps, (rel_rms, eps)


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_cached_decoding_equals_full_forward(build, config):
    model = build(config).model
    tokens = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(2)).to(device_of(model))
    with torch.inference_mode():
        full = model.forward(tokens, 0)
        # prefill 10, then a chunk of 5 (exercises the offset causal mask), then one token at a time
        pieces = [model.forward(tokens[:, :10], 0), model.forward(tokens[:, 10:15], 10)]
        pieces += [model.forward(tokens[:, p : p + 1], p) for p in range(15, 24)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_logits_at_gives_those_tokens_logits_alone(build):
    """A prompt's forward with logits_at computes each row's logits at one token only: those of the full forward."""
    model = build("gqa").model
    tokens = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(2)).to(device_of(model))
    at = torch.tensor([23, 4, 17], device=tokens.device)
    with torch.inference_mode():
        full = model.forward(tokens, 0)
        some = model.forward(tokens, 0, logits_at=at)
    assert some.shape == (3, 1, full.shape[-1])
    assert torch.allclose(some[:, 0], full[torch.arange(3), at], atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_static_decode_step_equals_cached_forward(build, config):
    """Positions as a tensor (the compiled path's step: whole-cache attention under a mask) give the same logits."""
    model = build(config).model
    device = device_of(model)
    tokens = torch.randint(3, 500, (3, 20), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.inference_mode():
        full = model.forward(tokens, 0)
        model.forward(tokens[:, :12], 0)
        steps = [model.forward(tokens[:, p : p + 1], torch.full((3,), p, device=device)) for p in range(12, 20)]
        with pytest.raises(ValueError, match="one value per row"):
            model.forward(tokens[:2, :1], torch.tensor([12, 12, 12], device=device))
        with pytest.raises(ValueError, match="positions 5..5 do not fit the cache .*reading 3 positions"):
            model.forward(tokens[:, :1], 5, cache_len=3)
        with pytest.raises(ValueError, match="positions 60..65 do not fit the cache of max_seq_len=64"):
            model.forward(tokens[:, :6], 60)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 12:], atol=1e-5, rtol=0)


def device_of(model) -> torch.device:
    return model.tok_embeddings.weight.device


def on(model, data) -> torch.Tensor:
    """data as a tensor on the model's device."""
    return torch.tensor(data, device=device_of(model))


def alone(model, tokens: list) -> torch.Tensor:
    """Logits of one sequence fed whole to a fresh row 0: (len, vocab)."""
    return model.forward(on(model, [tokens]), 0)[0]


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_rows_at_their_own_positions_match_each_sequence_alone(build, config):
    """Prompts of different lengths prefilled together (padded to the longest), then decoded with every row at its
    own position: each row's logits are those it gets alone."""
    model = build(config).model
    gen = torch.Generator().manual_seed(7)
    lengths = [9, 3, 14]
    sequences = [torch.randint(3, 500, (n + 5,), generator=gen).tolist() for n in lengths]
    with torch.inference_mode():
        expected = [alone(model, seq) for seq in sequences]
        padded = on(model, [seq[:n] + [0] * (max(lengths) - n) for seq, n in zip(sequences, lengths)])
        prefill = model.forward(padded, 0)
        for i, n in enumerate(lengths):
            torch.testing.assert_close(prefill[i, :n], expected[i][:n], rtol=0, atol=1e-5)
        for step in range(5):
            start = on(model, [n + step for n in lengths])
            tokens = on(model, [[seq[n + step]] for seq, n in zip(sequences, lengths)])
            logits = model.forward(tokens, start, cache_len=int(start.max()) + 1)
            for i, n in enumerate(lengths):
                torch.testing.assert_close(logits[i, 0], expected[i][n + step], rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_a_row_reset_and_refilled_mid_batch_decodes_as_if_alone(build, config):
    """While rows 0 and 2 decode, row 1 takes a new prompt (prefilled into its cache row alone), then all three
    decode together, and a finished row can simply be left out of a step."""
    model = build(config).model
    gen = torch.Generator().manual_seed(8)
    first = [torch.randint(3, 500, (12,), generator=gen).tolist() for _ in range(3)]
    refill = torch.randint(3, 500, (10,), generator=gen).tolist()
    with torch.inference_mode():
        expected = [alone(model, first[0]), alone(model, refill), alone(model, first[2])]
        model.forward(on(model, [seq[:6] for seq in first]), 0)
        model.forward(on(model, [[seq[6]] for seq in first]), 6)
        refilled = model.forward(on(model, [refill[:4]]), 0, rows=on(model, [1]))
        torch.testing.assert_close(refilled[0], expected[1][:4], rtol=0, atol=1e-5)
        for step in range(5):
            start = on(model, [7 + step, 4 + step, 7 + step])
            tokens = on(model, [[first[0][7 + step]], [refill[4 + step]], [first[2][7 + step]]])
            logits = model.forward(tokens, start)
            for i in range(3):
                torch.testing.assert_close(logits[i, 0], expected[i][int(start[i])], rtol=0, atol=1e-5)
        # row 0 finished: rows 2 and 1 go on without it, in that order
        tokens = on(model, [[first[2][11]], [refill[9]]])
        logits = model.forward(tokens, on(model, [11, 9]), rows=on(model, [2, 1]))
    torch.testing.assert_close(logits[0, 0], expected[2][11], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, 0], expected[1][9], rtol=0, atol=1e-5)


def test_rotary_stays_fp32_for_bf16_inputs():
    rotation = rotary_angles(torch.arange(4000, 4002)[None], ModelArgs(dim=8, n_heads=1).rotary_frequencies())
    assert rotation.dtype == torch.float32 and rotation.shape == (1, 2, 4, 2)
    x = torch.randn(1, 2, 1, 8)
    ref = apply_rotary(x, rotation)
    # Position 4000 in bf16 would round to 4000 +- 16: the angles must not be computed in the input's dtype.
    assert torch.allclose(apply_rotary(x.bfloat16(), rotation).float(), ref, atol=0.05)
    # A rotation preserves the norm of each pair, and rotates the pair (x0, x1) by angle position * freq_0
    assert torch.allclose(ref.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    angle = torch.tensor(4000.0)
    x0, x1 = x[0, 0, 0, 0], x[0, 0, 0, 1]
    assert torch.allclose(ref[0, 0, 0, :2], torch.stack([x0 * angle.cos() - x1 * angle.sin(),
                                                          x0 * angle.sin() + x1 * angle.cos()]), atol=1e-4)


def test_ffn_hidden_dim_follows_meta_rule():
    assert ModelArgs(dim=4096, multiple_of=256).ffn_hidden_dim == 11008  # 7B
    assert ModelArgs(dim=5120, n_heads=40, multiple_of=256).ffn_hidden_dim == 13824  # 13B
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672


def test_model_args_reject_unknown_and_inconsistent_keys():
    with pytest.raises(ValueError, match="unknown keys \\['n_expert'\\]"):
        ModelArgs.from_params({"dim": 64, "n_heads": 4, "n_expert": 8})
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ModelArgs(dim=60, n_heads=8)


def test_valid_model_parallel_sizes():
    assert ModelArgs(dim=64, n_heads=8, n_kv_heads=2).valid_model_parallel_sizes() == [1, 2, 4, 8]
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8).valid_model_parallel_sizes() == [1, 2, 4, 8, 16, 32, 64]
    assert ModelArgs(dim=60, n_heads=6, n_kv_heads=6).valid_model_parallel_sizes() == [1, 2, 3, 6]
