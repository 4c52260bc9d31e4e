"""generate / text_completion semantics: greedy batching, logprobs, echo, sampling, and bad input."""

import json
import shutil

import pytest
import torch

from llama import Llama
from llama.kernels import cpu
from llama.generation import sample_top_p
from llama.linear import CpuLinear


def test_batch_of_different_lengths_matches_each_prompt_alone(build):
    generator = build("gqa")
    prompts = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51], [1, 60, 61, 62, 63, 64]]
    batched, _ = generator.generate(prompts, max_gen_len=12, temperature=0)
    alone = [generator.generate([p], max_gen_len=12, temperature=0)[0][0] for p in prompts]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)  # random weights rarely emit EOS; if they did, this shows it


def test_prefill_runs_every_prompt_whole_and_finished_rows_leave_the_batch(build, monkeypatch):
    """One forward over all prompts (padded to the longest), then one-token steps in which each row stops as soon
    as it is done: here rows of 2, 6 and 9 new tokens (max_seq_len cuts the first two), so after the prefill (which
    gives each row's first token) the steps hold 3 rows once, then 2 rows 4 times, then 1 row 3 times."""
    generator = build("mha", max_seq_len=16)
    prompts = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [1, 50, 51, 52, 53, 54, 55, 56, 57, 58],
               [1, 60, 61, 62]]
    calls, forward = [], generator.model.forward
    monkeypatch.setattr(generator.model, "forward", lambda tokens, *args, **kwargs: calls.append(
        tuple(tokens.shape)) or forward(tokens, *args, **kwargs))
    monkeypatch.setattr(generator, "engine", None)
    out, _ = generator.generate(prompts, max_gen_len=9, temperature=0)
    assert [len(t) for t in out] == [2, 6, 9]  # no EOS among them
    assert calls == [(3, 14)] + [(3, 1)] + [(2, 1)] * 4 + [(1, 1)] * 3


def test_greedy_tokens_are_argmax_of_full_forward(build, device):
    generator = build("mha")
    prompt = [1, 100, 200, 300]
    out, _ = generator.generate([prompt], max_gen_len=6, temperature=0)
    seq = prompt + out[0]
    with torch.inference_mode():
        logits = generator.model.forward(torch.tensor([seq], device=device), 0)
    expected = logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert out[0] == expected


def test_logprobs_are_log_softmax_of_the_previous_position(build, device):
    generator = build("mha")
    prompts = [[1, 100, 200, 300, 400], [1, 7, 8]]
    tokens, logprobs = generator.generate(prompts, max_gen_len=5, temperature=0.8, top_p=0.9, logprobs=True, echo=True)
    for prompt, toks, lps in zip(prompts, tokens, logprobs):
        assert toks[: len(prompt)] == prompt and len(toks) == len(lps) == len(prompt) + 5
        with torch.inference_mode():
            log_probs = torch.log_softmax(generator.model.forward(torch.tensor([toks], device=device), 0)[0], dim=-1)
        expected = [0.0] + [log_probs[t - 1, toks[t]].item() for t in range(1, len(toks))]
        assert lps == pytest.approx(expected, abs=1e-4)


def test_echo_off_returns_only_the_generation(build):
    generator = build("mha")
    prompt = [1, 100, 200, 300]
    echoed, lp_echo = generator.generate([prompt], max_gen_len=4, temperature=0, logprobs=True, echo=True)
    plain, lp_plain = generator.generate([prompt], max_gen_len=4, temperature=0, logprobs=True)
    assert echoed[0] == prompt + plain[0]
    assert lp_echo[0][len(prompt) :] == pytest.approx(lp_plain[0], abs=1e-5)


def test_logprobs_of_a_prompt_that_fills_the_context(build, device):
    generator = build("mha", max_seq_len=8)
    prompt = [1, 10, 11, 12, 13, 14, 15, 16]
    tokens, logprobs = generator.generate([prompt], max_gen_len=3, logprobs=True, echo=True)
    assert tokens[0] == prompt  # no room left to generate
    with torch.inference_mode():
        log_probs = torch.log_softmax(generator.model.forward(torch.tensor([prompt], device=device), 0)[0], dim=-1)
    expected = [0.0] + [log_probs[t - 1, prompt[t]].item() for t in range(1, len(prompt))]
    assert logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_generation_stops_at_eos_and_cuts_it(build, device, monkeypatch):
    generator = build("mha")
    eos = generator.tokenizer.eos_id
    # Force the model to emit EOS after two tokens by making sampling deterministic.
    picks = iter([torch.tensor([t], device=device) for t in (5, 6, eos, 7)])
    monkeypatch.setattr("llama.generation.sample_next", lambda logits, t, p, generator: next(picks))
    tokens, _ = generator.generate([[1, 2 + 1, 4]], max_gen_len=10, temperature=0.5)
    assert tokens == [[5, 6]]


def test_eos_inside_an_echoed_prompt_does_not_cut_it(build):
    generator = build("mha")
    eos = generator.tokenizer.eos_id
    prompt = [1, 100, 200, eos, 1, 300]  # a chat prompt carries EOS after each finished turn
    tokens, _ = generator.generate([prompt], max_gen_len=3, temperature=0, echo=True)
    assert tokens[0][: len(prompt)] == prompt and len(tokens[0]) == len(prompt) + 3


def test_sampling_is_seeded_and_respects_top_p(build):
    a = build("mha").text_completion(["hello world"], temperature=1.0, top_p=0.9, max_gen_len=8)
    torch.manual_seed(1)
    b = build("mha").text_completion(["hello world"], temperature=1.0, top_p=0.9, max_gen_len=8)
    torch.manual_seed(1)
    c = build("mha").text_completion(["hello world"], temperature=1.0, top_p=0.9, max_gen_len=8)
    assert b == c and isinstance(a[0]["generation"], str)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = {sample_top_p(probs, 0.7).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are never drawn


def test_text_completion_result_shape(build):
    generator = build("mha")
    out = generator.text_completion(["hello world", "the city"], temperature=0, max_gen_len=5, logprobs=True)
    assert [sorted(r) for r in out] == [["finish_reason", "generation", "logprobs", "tokens"]] * 2  # Meta's + one
    for r in out:
        assert len(r["tokens"]) == len(r["logprobs"]) == 5
        assert "".join(r["tokens"]).strip() or r["generation"] is not None
    plain = generator.text_completion(["hello world"], temperature=0, max_gen_len=5)
    assert plain == [{"generation": out[0]["generation"], "finish_reason": "length"}]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_tokens=[[1, 2]] * 5), "5 prompts exceed max_batch_size=4"),
        (dict(prompt_tokens=[[1, 2], [1] * 65]), "prompt 1 is 65 tokens long, longer than max_seq_len=64"),
        (dict(max_gen_len=0), "max_gen_len must be an integer of at least 1"),
        (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(top_p=float("nan")), "top_p must be in \\(0, 1\\]"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
        (dict(top_p=1.5), "top_p must be in \\(0, 1\\]"),
        (dict(prompt_tokens=[]), "no prompts"),
        (dict(prompt_tokens=[[1], []]), "prompt 1 is empty"),
    ],
)
def test_generate_rejects_bad_input(build, kwargs, message):
    args = {"prompt_tokens": [[1, 2, 3]], "max_gen_len": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        build("mha").generate(**args)


def test_build_rejects_bad_checkpoints(tiny_dir, tokenizer_path, tmp_path):
    src = tiny_dir / "mha-mp1"
    with pytest.raises(FileNotFoundError, match="no params.json"):
        Llama.build(str(tmp_path), tokenizer_path, 64, 4)
    (tmp_path / "params.json").write_text((src / "params.json").read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        Llama.build(str(tmp_path), tokenizer_path, 64, 4)
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Llama.build(str(src), str(tmp_path / "missing.model"), 64, 4)

    wrong_vocab = tmp_path / "vocab"
    shutil.copytree(src, wrong_vocab)
    params = json.loads((src / "params.json").read_text())
    (wrong_vocab / "params.json").write_text(json.dumps({**params, "vocab_size": 1000}))
    with pytest.raises(ValueError, match="tokenizer .* has 512 tokens but .* vocab_size=1000"):
        Llama.build(str(wrong_vocab), tokenizer_path, 64, 4)

    unknown = tmp_path / "unknown"
    shutil.copytree(src, unknown)
    (unknown / "params.json").write_text(json.dumps({**params, "moe": True}))
    with pytest.raises(ValueError, match="unknown keys \\['moe'\\]"):
        Llama.build(str(unknown), tokenizer_path, 64, 4)


def test_build_rejects_mismatched_weights(tiny_dir, tokenizer_path, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir / "mha-mp1", bad)
    state = torch.load(bad / "consolidated.00.pth", weights_only=True)
    del state["layers.1.ffn_norm.weight"]
    state["layers.1.extra.weight"] = torch.zeros(3)
    torch.save(state, bad / "consolidated.00.pth")
    with pytest.raises(ValueError, match="does not match its params.json.*layers.1.ffn_norm.weight"):
        Llama.build(str(bad), tokenizer_path, 64, 4, device="cpu", dtype="fp32")


def test_build_rejects_fp16_on_cpu(tiny_dir, tokenizer_path):
    with pytest.raises(ValueError, match="fp16 on the CPU"):
        Llama.build(str(tiny_dir / "mha-mp1"), tokenizer_path, 64, 4, device="cpu", dtype="fp16")


@pytest.mark.cpu_only("the CPU's default dtype")
def test_default_dtype_on_cpu_is_bf16(build):
    generator = build("mha", dtype=None)
    assert generator.model.output.weight.dtype == torch.bfloat16
    out = generator.text_completion(["hello"], temperature=0, max_gen_len=3)
    assert isinstance(out[0]["generation"], str)


def test_compiled_decode_matches_eager(build):
    """compile=True gives the same greedy tokens and log-probabilities (fp32: only summation order may differ).
    Each first step compiles: the slow part of these tests."""
    eager = build("gqa")
    compiled = Llama(eager.model, eager.tokenizer, compile=True)
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51]]
    tokens, logprobs = eager.generate(prompts, max_gen_len=8, temperature=0, logprobs=True)
    tokens_c, logprobs_c = compiled.generate(prompts, max_gen_len=8, temperature=0, logprobs=True)
    assert tokens_c == tokens
    assert torch.allclose(torch.tensor(logprobs_c), torch.tensor(logprobs), atol=1e-5)


@pytest.mark.cpu_only("our CPU kernels")
@pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the CPU kernels")
@pytest.mark.parametrize("config,quantize", [("gqa", None), ("mha", "int4")])
def test_compiled_bf16_step_runs_the_cpu_kernel(build, config, quantize):
    """In bf16 the compiled step calls our CPU kernel (bf16, or int4 in groups of 64) as a torch operator; its logits
    track the eager step's (bf16 rounding differs where the compiler fuses ops, so the tiny random model's near-tied
    tokens are not compared)."""
    eager = build(config, dtype="bf16", quantize=quantize, group_size=64)
    assert isinstance(eager.model.layers[0].feed_forward.w2, CpuLinear)
    compiled = Llama(eager.model, eager.tokenizer, compile=True)
    tokens = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        eager.model.forward(tokens[:, :8], 0)
        expected = eager.model.forward(tokens[:, 8:], 8)
        got = compiled.compiled_step(tokens[:, 8:], torch.tensor([8, 8]))
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def test_a_lone_string_or_dialog_is_refused_not_split(build):
    """text_completion("hi") would complete each character as a prompt: every public call wants a list."""
    generator = build("mha")
    for call in (generator.text_completion, generator.text_completion_stream):
        with pytest.raises(TypeError, match="prompts must be a list of str, one per prompt; got str"):
            call("hello", max_gen_len=2)
    for call in (generator.chat_completion, generator.chat_completion_stream):
        with pytest.raises(TypeError, match="wrap a single dialog in a list"):
            call([{"role": "user", "content": "hello"}], max_gen_len=2)
    with pytest.raises(TypeError, match="prompt_tokens must be a list of token-id lists"):
        generator.generate([1, 2, 3], max_gen_len=2)


def test_a_call_with_a_seed_samples_the_same_whatever_ran_before(build):
    generator = build("mha")
    kwargs = dict(max_gen_len=12, temperature=1.0, top_p=1.0)
    first = generator.text_completion(["hello world", "the cat"], seed=7, **kwargs)
    generator.text_completion(["something else"], **kwargs)  # moves the global generator on
    again = generator.text_completion(["hello world", "the cat"], seed=7, **kwargs)
    other = generator.text_completion(["hello world", "the cat"], seed=8, **kwargs)
    streamed = list(generator.text_completion_stream(["hello world", "the cat"], seed=7, **kwargs))
    assert first == again != other
    assert ["".join(e["text"] for e in streamed if e["index"] == i) for i in range(2)] == [
        r["generation"] for r in first]
    assert generator.chat_completion([[{"role": "user", "content": "hi"}]], seed=5, **kwargs) == \
        generator.chat_completion([[{"role": "user", "content": "hi"}]], seed=5, **kwargs)


def test_a_context_beyond_the_trained_one_warns(tiny_dir, tokenizer_path, capsys):
    Llama.build(str(tiny_dir / "mha-mp1"), tokenizer_path, 4097, 1, device="cpu", dtype="fp32")
    assert ("warning: max_seq_len=4097 is longer than the 4096 tokens this model was trained on"
            in capsys.readouterr().err)
    Llama.build(str(tiny_dir / "mha-mp1"), tokenizer_path, 4096, 1, device="cpu", dtype="fp32")
    assert "warning" not in capsys.readouterr().err


def test_loading_a_large_checkpoint_shows_progress(tiny_dir, tokenizer_path, capsys, monkeypatch):
    from llama import generation

    Llama.build(str(tiny_dir / "mha-mp1"), tokenizer_path, 64, 1, device="cpu", dtype="fp32")
    assert "Loading" not in capsys.readouterr().err  # small: nothing to wait for
    monkeypatch.setattr(generation, "PROGRESS_MIN_BYTES", 0)
    Llama.build(str(tiny_dir / "gqa-mp2"), tokenizer_path, 64, 1, device="cpu", dtype="bf16", quantize="int8")
    err = capsys.readouterr().err
    assert err.startswith("\rLoading 0.0 GB: ") and err.endswith("100%\n") and err.count("\n") == 1
