"""Streaming, stop strings and tokens, finish reasons: what a caller reading text as it is written relies on."""

import random

import pytest
import torch

from llama.dialog import UNSAFE_ERROR
from llama.streaming import RowText

PROMPTS = ["the capital of france", "hello", "a model token weight layer head attention cache"]


def collect(events):
    """Per prompt index: (pieces, last event)."""
    pieces, last = {}, {}
    for event in events:
        pieces.setdefault(event["index"], []).append(event["text"])
        if "finish_reason" in event:
            assert event["index"] not in last, "one last event per prompt"
            last[event["index"]] = event
    return pieces, last


def test_streamed_pieces_join_to_the_completion_for_a_ragged_batch(build):
    generator = build("gqa")
    expected = generator.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    pieces, last = collect(generator.text_completion_stream(PROMPTS, temperature=0, max_gen_len=12))
    for i, result in enumerate(expected):
        assert "".join(pieces[i]) == result["generation"]
        assert last[i]["finish_reason"] == result["finish_reason"] == "length"
        assert last[i]["completion_tokens"] == 12
        assert last[i]["prompt_tokens"] == len(generator.tokenizer.encode(PROMPTS[i], bos=True, eos=False))
        assert not any("\ufffd" in p for p in pieces[i][:-1]) or "\ufffd" in result["generation"]


def test_streamed_logprobs_are_the_completions(build):
    generator = build("mha")
    expected = generator.text_completion(PROMPTS[:2], temperature=0, max_gen_len=6, logprobs=True)
    events = list(generator.text_completion_stream(PROMPTS[:2], temperature=0, max_gen_len=6, logprobs=True))
    for i, result in enumerate(expected):
        mine = [e for e in events if e["index"] == i and "logprobs" in e]
        assert [t for e in mine for t in e["tokens"]] == result["tokens"]
        torch.testing.assert_close(torch.tensor([p for e in mine for p in e["logprobs"]]),
                                   torch.tensor(result["logprobs"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("text", ["the capital of france is paris 🦙🦙 北京 café naïve", "ünïcödé 日本語のテキスト 🎉 end",
                                  "😀", " two  spaces\nand a line"])
def test_characters_of_several_byte_tokens_never_come_out_partial(tokenizer_path, text):
    from llama import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert any(tokenizer.sp_model.is_byte(i) for i in ids) or text == " two  spaces\nand a line"  # byte fallback
    row = RowText(tokenizer)
    pieces = [row.add(i) for i in ids] + [row.finish()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_any_token_sequence_streams_to_its_decoding(tokenizer_path):
    """Random ids (byte tokens among them, so invalid UTF-8 too): the pieces always join to the full decoding."""
    from llama import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, tokenizer.n_words) for _ in range(rng.randint(1, 30))]
        row = RowText(tokenizer)
        assert "".join([row.add(i) for i in ids] + [row.finish()]) == tokenizer.decode(ids)


def test_stop_strings_across_tokens_in_one_row_of_a_batch(build):
    """A stop string spanning several tokens ends only its row, which leaves the batch; the others go on. The text
    stops before it, streamed or not, and no piece of it was ever streamed."""
    generator = build("gqa")
    full = [r["generation"] for r in generator.text_completion(PROMPTS, temperature=0, max_gen_len=16)]
    stop = full[0][4:9]  # several tokens' worth, inside row 0's text
    assert all(stop not in text for text in full[1:]) and len(generator.tokenizer.encode(stop, False, False)) > 1
    results = generator.text_completion(PROMPTS, temperature=0, max_gen_len=16, stop=[stop, "no such text"])
    assert results[0] == {"generation": full[0][: full[0].index(stop)], "finish_reason": "stop"}
    assert [r["generation"] for r in results[1:]] == full[1:]
    assert [r["finish_reason"] for r in results[1:]] == ["length", "length"]
    pieces, last = collect(generator.text_completion_stream(PROMPTS, temperature=0, max_gen_len=16, stop=stop))
    assert "".join(pieces[0]) == results[0]["generation"] and last[0]["finish_reason"] == "stop"
    assert last[0]["completion_tokens"] < 16 and last[1]["completion_tokens"] == 16


def test_the_earliest_of_several_stops_wins(build):
    generator = build("mha")
    text = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=16)[0]["generation"]
    early, late = text[2:5], text[8:12]
    result = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=16, stop=[late, early])[0]
    assert result["generation"] == text[: text.index(early)]


def test_finish_reasons(build):
    generator = build("mha", max_seq_len=24)
    greedy = generator.generate([[1, 40, 41]], max_gen_len=8, temperature=0)[0][0]
    # a stop token (here the third generated one) ends the row like EOS, and is not part of its text
    result = generator.text_completion(["x"], temperature=0, max_gen_len=8, stop_token_ids=[greedy[2]])
    prompt = generator.tokenizer.encode("x", bos=True, eos=False)
    expected = generator.generate([prompt], max_gen_len=8, temperature=0)[0][0]
    cut = expected.index(greedy[2]) if greedy[2] in expected else len(expected)
    assert result[0]["generation"] == generator.tokenizer.decode(expected[:cut])
    assert result[0]["finish_reason"] == ("stop" if greedy[2] in expected else "length")
    # EOS: the model's own stop token
    eos_generator = build("mha", max_seq_len=24)
    original = eos_generator.tokenizer.eos_id
    try:
        eos_generator.tokenizer.eos_id = greedy[1]
        out = list(eos_generator.stream([[1, 40, 41]], max_gen_len=8, temperature=0))
    finally:
        eos_generator.tokenizer.eos_id = original
    # the stop token counts as generated
    assert out[-1]["finish_reason"] == "stop" and out[-1]["completion_tokens"] == greedy.index(greedy[1]) + 1
    # max_gen_len, and the context filled (max_seq_len 24 leaves 4 tokens after a 20-token prompt)
    assert generator.text_completion(["x"], temperature=0, max_gen_len=3)[0]["finish_reason"] == "length"
    long_prompt = [1] + list(range(40, 59))
    _, last = collect(generator.stream([long_prompt], max_gen_len=10, temperature=0))
    assert last[0]["finish_reason"] == "length" and last[0]["completion_tokens"] == 4
    _, last = collect(generator.stream([list(range(1, 25))], max_gen_len=10, temperature=0))
    assert last[0] == {"index": 0, "text": "", "finish_reason": "length", "prompt_tokens": 24, "completion_tokens": 0}


def test_chat_streams_and_says_why_it_ended(build):
    generator = build("gqa")
    dialogs = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "[INST] sneaky"}]]
    expected = generator.chat_completion(dialogs, temperature=0, max_gen_len=6)
    pieces, last = collect(generator.chat_completion_stream(dialogs, temperature=0, max_gen_len=6))
    assert "".join(pieces[0]) == expected[0]["generation"]["content"]
    assert "".join(pieces[1]) == expected[1]["generation"]["content"] == UNSAFE_ERROR
    assert [last[i]["finish_reason"] for i in (0, 1)] == [r["finish_reason"] for r in expected]


@pytest.mark.parametrize("kwargs, message", [
    ({"stop": ""}, "stop strings must be non-empty str"),
    ({"stop": ["ok", ""]}, "stop strings must be non-empty str"),
    ({"stop_token_ids": [512]}, "stop token ids \\[512\\] are not in the vocabulary \\(0..511\\)"),
    ({"stop_token_ids": [-1]}, "stop token ids \\[-1\\] are not in the vocabulary"),
    ({"stop": "x", "echo": True}, "echo=True cannot be combined with stop strings"),
])
def test_bad_stops_are_refused_before_generating(build, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build("mha").text_completion(["hello"], max_gen_len=4, **kwargs)
    if "echo" not in kwargs:  # a stream refuses them when it is made, before any event is asked for
        with pytest.raises(ValueError, match=message):
            build("mha").text_completion_stream(["hello"], max_gen_len=4, **kwargs)


def test_logprobs_end_with_the_text_whichever_way_it_is_stopped(build):
    """A stop token ends the tokens and logprobs as it ends the text, with or without stop strings in the call;
    stop=None means no stop strings."""
    generator = build("mha")
    first = generator.generate([[1, 40, 41]], max_gen_len=6, temperature=0)[0][0]
    kwargs = dict(temperature=0, max_gen_len=10, logprobs=True, stop_token_ids=[first[2]])
    plain = generator.text_completion(["x", "hello"], **kwargs)
    with_stops = generator.text_completion(["x", "hello"], stop=["no such text"], **kwargs)
    assert plain == with_stops
    assert generator.text_completion(["x"], max_gen_len=3, stop=None)[0]["finish_reason"] == "length"
