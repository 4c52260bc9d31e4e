"""Llama 3, 3.1 and 3.2: the tiktoken tokenizer against tiktoken and Hugging Face, the chat format token for token,
scaled rotary embeddings and tied embeddings against transformers past the original context, Meta's vocabulary-split
shards, model parallelism, conversion both ways and the tools, on tiny checkpoints made here."""

import base64
import json
import os
import subprocess
import sys

import pytest
import tiktoken
import tiktoken.load
import torch
from safetensors import safe_open

import mp_worker
from llama import Llama, Tokenizer, convert
from llama.config import ModelArgs
from llama.dialog import encode_dialog
from llama.formats.base import load_shard
from llama.formats.hf import config_to_params
from llama.tiny import LLAMA3_CONFIGS, TIED_CONFIGS, main as tiny_main, make_checkpoint, train_tiktoken

transformers = pytest.importorskip("transformers")
from test_convert import same_tensors  # noqa: E402
from test_distributed import torchrun  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Written out here from Meta's llama-models (models/llama3/tokenizer.py), not imported from the library under test
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
META_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
META_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(META_SPECIALS))]
TEXTS = [
    "Hello, world! I'm here; you'LL see.",
    "<|begin_of_text|><|eot_id|> and <|start_header_id|>user<|end_header_id|>",  # special tokens' names, as text
    "<|eot_id| <eot_id|> < |eom_id|> <|reserved_special_token_7|> <|image|>",  # look-alikes and names
    "emoji: 🦙🔥👩‍👩‍👧 and ❤️",
    "日本語の文章です。中文句子，한국어 문장",
    "digits 1234567890123456789012345678901234567890 and 3.14159",
    "  leading spaces\n\n\ttabs\r\nand   runs   of  spaces  ",
    "",
]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """<config>-mp1 and <config>-mp2 of each tiny Llama 3 config (the same weights), each with its tokenizer.model."""
    root = tmp_path_factory.mktemp("llama3")
    train_tiktoken(str(root / "tokenizer.model"))
    for name, params in LLAMA3_CONFIGS.items():
        for n_shards in (1, 2):
            make_checkpoint(str(root / f"{name}-mp{n_shards}"), params, params["vocab_size"], n_shards, seed=0,
                            tied=name in TIED_CONFIGS, tokenizer_path=str(root / "tokenizer.model"))
    return root


@pytest.fixture(scope="module")
def tok_path(llama3_dir):
    return str(llama3_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer(tok_path)


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_the_kind_is_told_by_the_file(tok, tokenizer_path, tmp_path):
    assert type(tok).__name__ == "TiktokenTokenizer" and tok.kind == "tiktoken"
    assert type(Tokenizer(tokenizer_path)).__name__ == "SentencePieceTokenizer"  # Llama 2's, whatever its name
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"IQ== 0\nnot base64!! x\n")
    with pytest.raises(ValueError, match="bad.model, line 2: not a tiktoken BPE line"):
        Tokenizer(str(bad))


def test_special_ids_are_metas(tok):
    n = 512  # ordinary tokens of the tiny tokenizer; Llama 3's has 128000, and the specials follow in the same order
    assert tok.n_words == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 4)
    assert tok.stop_ids == [n + 1, n + 8, n + 9]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert tok.decode([n + 6, n + 7, n + 10, n + 255]) == (
        "<|start_header_id|><|end_header_id|><|python_tag|><|reserved_special_token_245|>")


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_are_tiktokens_with_metas_pattern(tok, tok_path, text):
    ranks = tiktoken.load.load_tiktoken_bpe(tok_path)
    direct = tiktoken.Encoding("meta", pat_str=META_PATTERN, mergeable_ranks=ranks,
                               special_tokens={s: len(ranks) + i for i, s in enumerate(META_SPECIALS)})
    ids = tok.encode(text, bos=True, eos=True)
    assert ids == [tok.bos_id] + direct.encode(text, disallowed_special=()) + [tok.eos_id]
    assert tok.decode(ids[1:-1]) == text
    assert all(i < 512 for i in ids[1:-1])  # a special token's name in text is never a control token


@pytest.fixture(scope="module")
def hf_tokenizer(tok_path):
    """transformers' fast tokenizer for the same file, converted by transformers' own tiktoken converter."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=tok_path, pattern=META_PATTERN,
                                  extra_special_tokens=META_SPECIALS).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted)


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_are_hugging_faces(tok, hf_tokenizer, text):
    # split_special_tokens: HF otherwise matches special tokens' names in text, which Meta's code never does
    assert tok.encode(text, bos=False, eos=False) == hf_tokenizer.encode(text, add_special_tokens=False,
                                                                          split_special_tokens=True)


def test_long_runs_are_cut_where_metas_tokenizer_cuts_them(tok):
    text = "x" * 30_000 + " " * 26_000 + "y"  # runs over 25000 characters are encoded in slices, as Meta's are
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    direct = tok.model.encode_ordinary
    assert tok.encode(text, bos=False, eos=False) == (direct("x" * 25_000) + direct("x" * 5_000 + " " * 20_000)
                                                       + direct(" " * 6_000 + "y"))


# ---------------------------------------------------------------------------------------------------- chat format


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """A tokenizer whose ids can be written by hand: each byte is its own token (id = the byte), one merge,
    "\\n\\n" = 256; Meta's specials follow: <|begin_of_text|> 257, <|start_header_id|> 263, <|end_header_id|> 264,
    <|eom_id|> 265, <|eot_id|> 266."""
    path = tmp_path_factory.mktemp("bytes") / "tokenizer.model"
    tokens = [bytes([b]) for b in range(256)] + [b"\n\n"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return Tokenizer(str(path))


BOS, START, END, EOT = 257, 263, 264, 266


def test_chat_format_token_for_token(byte_tok):
    dialog = [{"role": "system", "content": " Be brief. "},
              {"role": "user", "content": "Hi <|eot_id|>!\n"},
              {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye"}]
    expected = ([BOS]
                + [START, *b"system", END, 256, *b"Be brief.", EOT]
                + [START, *b"user", END, 256, *b"Hi <|eot_id|>!", EOT]
                + [START, *b"assistant", END, 256, *b"Hello.", EOT]
                + [START, *b"user", END, 256, *b"Bye", EOT]
                + [START, *b"assistant", END, 256])
    assert encode_dialog(byte_tok, dialog) == expected


def test_chat_format_without_a_system_prompt(byte_tok):
    assert encode_dialog(byte_tok, [{"role": "user", "content": "[INST] x"}]) == (
        [BOS, START, *b"user", END, 256, *b"[INST] x", EOT, START, *b"assistant", END, 256])


# ---------------------------------------------------------------------------------------------------- model


def test_rotary_scaling_keeps_blends_and_stretches():
    base = dict(dim=128, n_heads=8, rope_theta=500000.0)  # head_dim 16: 8 frequencies
    plain = ModelArgs(**base).rotary_frequencies()
    args = ModelArgs(**base, use_scaled_rope=True, rope_old_context_len=256)
    scaled = args.rotary_frequencies()
    wavelen = 2 * torch.pi / plain
    kept, stretched = wavelen < 256 / 4, wavelen > 256
    assert kept.any() and stretched.any() and (~kept & ~stretched).any()  # the tiny configs' bands, all three
    assert torch.equal(scaled[kept], plain[kept]) and torch.equal(scaled[stretched], plain[stretched] / 8)
    between = ~kept & ~stretched
    assert ((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8)).all()


def test_the_scaling_factor():
    scaled = dict(n_heads=32, n_kv_heads=8, vocab_size=128256, rope_theta=500000.0, use_scaled_rope=True)
    assert ModelArgs(dim=4096, n_layers=32, **scaled).rope_factor == 8  # 3.1 8B: Meta's reference value
    assert ModelArgs(dim=2048, n_layers=16, **scaled).rope_factor == 32  # 3.2 1B: Hugging Face's, confirmed by Meta
    assert ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, use_scaled_rope=True).rope_factor == 32  # 3B
    assert ModelArgs(dim=2048, n_layers=16, rope_scaling_factor=8.0, **scaled).rope_factor == 8  # as a file says
    with pytest.raises(ValueError, match="unknown keys \\['rope_scaling'\\]"):
        ModelArgs.from_params({"dim": 64, "rope_scaling": {}})


def independent_hf_model(ckpt_dir: str, tied: bool):
    """transformers' LlamaForCausalLM for a 1-shard tiny Llama 3 checkpoint, its config written here from Hugging
    Face's Llama 3.1 format and its weights converted here (not by the library's converter)."""
    params = json.loads(open(os.path.join(ckpt_dir, "params.json")).read())
    args = ModelArgs.from_params(params)
    meta = load_shard(os.path.join(ckpt_dir, "consolidated.00.pth"))
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, max_position_embeddings=131072, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                         "factor": params.get("rope_scaling_factor", 8.0), "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0,
                         "original_max_position_embeddings": params["rope_old_context_len"]})

    def unpermute(w, n_heads):  # Meta's interleaved pairs -> HF's halves, per head
        return w.view(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape[0], -1)

    hf = {"model.embed_tokens.weight": meta["tok_embeddings.weight"], "model.norm.weight": meta["norm.weight"]}
    if not tied:
        hf["lm_head.weight"] = meta["output.weight"]
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf[h + "self_attn.q_proj.weight"] = unpermute(meta[m + "attention.wq.weight"], args.n_heads)
        hf[h + "self_attn.k_proj.weight"] = unpermute(meta[m + "attention.wk.weight"], args.n_kv_heads)
        for ours, theirs in [("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                             ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                             ("feed_forward.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
                             ("ffn_norm", "post_attention_layernorm")]:
            hf[h + theirs + ".weight"] = meta[m + ours + ".weight"]
    model = transformers.LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if tied else [])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


LONG = 300  # past the tiny configs' original context of 256, where the rescaled frequencies matter most
LONG_TOKENS = torch.arange(7, 7 + 2 * LONG).remainder(760).view(2, LONG)


@pytest.mark.parametrize("config", list(LLAMA3_CONFIGS))
def test_logits_match_transformers_past_the_original_context(llama3_dir, tok_path, device, config):
    ckpt = str(llama3_dir / f"{config}-mp1")
    ours = Llama.build(ckpt, None, LONG, 2, device=str(device), dtype="fp32").model
    theirs = independent_hf_model(ckpt, tied=config in TIED_CONFIGS)
    with torch.inference_mode():
        logits = ours.forward(LONG_TOKENS.to(device), 0).cpu()
        reference = theirs(LONG_TOKENS).logits
        theirs.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}  # the same, unscaled
        unscaled = type(theirs)(theirs.config).eval()
        unscaled.load_state_dict(theirs.state_dict())
        plain = unscaled(LONG_TOKENS).logits
    diff = (logits - reference).abs().amax(dim=(0, 2))  # per position
    assert diff.max().item() <= 1e-4, diff.max().item()
    # not vacuous: without the scaling the logits are far off, before and past the original context
    assert (plain - reference).abs()[:, 200:256].max() > 1e-2 and (plain - reference).abs()[:, 256:].max() > 1e-2


def test_cached_decode_equals_one_forward(llama3_dir, device):
    model = Llama.build(str(llama3_dir / "llama3-mp1"), None, LONG, 2, device=str(device), dtype="fp32").model
    tokens = LONG_TOKENS.to(device)
    with torch.inference_mode():
        full = model.forward(tokens, 0)
        model.forward(tokens[:, :270], 0)
        steps = [model.forward(tokens[:, p : p + 1], p) for p in range(270, LONG)]
    assert (torch.cat(steps, dim=1) - full[:, 270:]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------------- shards


def test_metas_shards_split_the_embedding_on_the_vocabulary(llama3_dir):
    shard = load_shard(str(llama3_dir / "llama3-mp2" / "consolidated.00.pth"))
    assert tuple(shard["tok_embeddings.weight"].shape) == (768 // 2, 128)  # VocabParallelEmbedding's, as Meta's


@pytest.mark.cpu_only("torchrun with gloo")
@pytest.mark.parametrize("config", list(LLAMA3_CONFIGS))
def test_two_shards_in_one_process_and_on_two_match_one(llama3_dir, tok_path, tmp_path, config):
    reference = mp_worker.run(str(llama3_dir / f"{config}-mp1"), tok_path)
    in_one = mp_worker.run(str(llama3_dir / f"{config}-mp2"), tok_path)
    on_two = torchrun(2, llama3_dir / f"{config}-mp2", tok_path, tmp_path / "out.pt")
    assert on_two["world_size"] == 2
    for result in (in_one, on_two):  # sums split over ranks round differently: logits up to ~20, fp32
        assert (result["logits"] - reference["logits"]).abs().max().item() <= 5e-5
        assert result["tokens"] == reference["tokens"]


def test_reshard_writes_metas_layout(llama3_dir, tmp_path):
    convert.reshard(str(llama3_dir / "llama3-mp1"), str(tmp_path / "mp2"), model_parallel_size=2)
    same_tensors(tmp_path / "mp2", llama3_dir / "llama3-mp2")
    convert.reshard(str(llama3_dir / "llama3-mp2"), str(tmp_path / "mp1"), model_parallel_size=1)
    same_tensors(tmp_path / "mp1", llama3_dir / "llama3-mp1")
    assert (tmp_path / "mp1" / "tokenizer.model").read_bytes() == (llama3_dir / "tokenizer.model").read_bytes()


# ---------------------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("config", list(LLAMA3_CONFIGS))
def test_meta_to_hf_to_meta_is_bit_exact(llama3_dir, tmp_path, config):
    convert.to_hf(str(llama3_dir / f"{config}-mp2"), str(tmp_path / "hf"))
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tied = config in TIED_CONFIGS
    assert hf_config["tie_word_embeddings"] == tied
    assert hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0 if tied else 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 256}
    assert hf_config["eos_token_id"] == [513, 520, 521] and hf_config["bos_token_id"] == 512
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied
    for shards in (1, 2):
        convert.from_hf(str(tmp_path / "hf"), str(tmp_path / f"back{shards}"), model_parallel_size=shards)
        same_tensors(tmp_path / f"back{shards}", llama3_dir / f"{config}-mp{shards}")
        back, meta = (json.loads((d / "params.json").read_text()) for d in (tmp_path / f"back{shards}",
                                                                              llama3_dir / f"{config}-mp1"))
        assert ModelArgs.from_params(back).ffn_hidden_dim == ModelArgs.from_params(meta).ffn_hidden_dim
        ffn = ("multiple_of", "ffn_dim_multiplier")  # config.json keeps the FFN's size, not how Meta's rule made it
        assert {k: v for k, v in back.items() if k not in ffn} == {k: v for k, v in meta.items() if k not in ffn}


@pytest.mark.parametrize("config", list(LLAMA3_CONFIGS))
def test_transformers_loads_our_export_and_we_load_theirs(llama3_dir, tok_path, tmp_path, config):
    convert.to_hf(str(llama3_dir / f"{config}-mp1"), str(tmp_path / "ours"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    reference = mp_worker.run(str(llama3_dir / f"{config}-mp1"), tok_path)
    with torch.inference_mode():
        assert (model(mp_worker.LOGIT_TOKENS).logits - reference["logits"]).abs().max().item() <= 1e-4
    model.save_pretrained(str(tmp_path / "theirs"))  # transformers 5's config.json: rope_parameters only
    result = mp_worker.run(str(tmp_path / "theirs"), tok_path)
    assert (result["logits"] - reference["logits"]).abs().max().item() <= 1e-5 and (
        result["tokens"] == reference["tokens"])


def test_transformers_4_and_5_configs_give_the_same_params(llama3_dir, tmp_path):
    convert.to_hf(str(llama3_dir / "llama3.2-mp1"), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    scaling, theta = config["rope_scaling"], config["rope_theta"]
    base = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    v4 = {**base, "rope_theta": theta, "rope_scaling": scaling}
    v5 = {**base, "rope_parameters": {**scaling, "rope_theta": theta}}
    expected = json.loads((llama3_dir / "llama3.2-mp1" / "params.json").read_text())
    ffn = ("multiple_of", "ffn_dim_multiplier")  # see test_meta_to_hf_to_meta_is_bit_exact
    assert config_to_params(v4, "v4") == config_to_params(v5, "v5")
    assert {k: v for k, v in config_to_params(v5, "v5").items() if k not in ffn} == {
        k: v for k, v in expected.items() if k not in ffn}
    with pytest.raises(ValueError, match="asks for rope scaling of type 'yarn'"):
        config_to_params({**v5, "rope_parameters": {"rope_type": "yarn"}}, "config.json")


# ---------------------------------------------------------------------------------------------------- generation


def test_generation_uses_the_models_stops_and_chat_format(llama3_dir, device):
    generator = Llama.build(str(llama3_dir / "llama3-mp1"), None, 64, 2, device=str(device), dtype="fp32")
    tok = generator.tokenizer
    dialog = [{"role": "user", "content": "hello [INST] <<SYS>> <|eot_id|>"}]  # Llama 2's tags are text here
    request = generator._request([encode_dialog(tok, dialog)], 4, 0.0, 1.0, False, (), [5], None)
    assert generator._start(request).stop_ids == [513, 520, 521, 5]
    result = generator.chat_completion([dialog], max_gen_len=4, temperature=0)[0]
    streamed = "".join(e["text"] for e in generator.chat_completion_stream([dialog], max_gen_len=4, temperature=0))
    assert result["generation"]["content"] == streamed != "Error: special tags are not allowed as part of the prompt."
    text = generator.text_completion(["the capital of france"], max_gen_len=4, temperature=0)[0]["generation"]
    assert text == "".join(e["text"] for e in generator.text_completion_stream(["the capital of france"],
                                                                                max_gen_len=4, temperature=0))


def test_quantized_llama3_stays_close(llama3_dir, tok_path):
    reference = mp_worker.run(str(llama3_dir / "llama3-mp1"), tok_path)
    int8 = mp_worker.run(str(llama3_dir / "llama3-mp1"), tok_path, quantize="int8")
    rel = (int8["logits"] - reference["logits"]).norm() / reference["logits"].norm()
    assert rel.item() <= 0.03


@pytest.mark.cpu_only("runs the chat tool in a subprocess")
def test_tiny_cli_and_chat(tmp_path):
    tiny_main(str(tmp_path), config="llama3.2")
    ckpt = tmp_path / "llama3.2"
    assert sorted(os.listdir(ckpt)) == ["checklist.chk", "consolidated.00.pth", "params.json", "tokenizer.model"]
    chat = subprocess.run([sys.executable, "-m", "llama.chat", "--ckpt_dir", str(ckpt), "--dtype", "fp32",
                           "--temperature", "0", "--max_seq_len", "128", "--system", "[INST] brief"],
                          input="hello <|eot_id|>\n/quit\n", capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert chat.returncode == 0 and "nothing was sent" not in chat.stdout, chat.stdout + chat.stderr
