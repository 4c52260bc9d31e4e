"""The Llama 2 chat format, token for token, and its guards."""

import pytest

from llama import Tokenizer
from llama.dialog import UNSAFE_ERROR, encode_dialog


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def ids(tok, text, eos=False):
    return tok.encode(text, bos=True, eos=eos)


def test_single_user_message(tok):
    dialog = [{"role": "user", "content": "  what is the recipe of mayonnaise? "}]
    assert encode_dialog(tok, dialog) == ids(tok, "[INST] what is the recipe of mayonnaise? [/INST]")


def test_system_is_folded_into_the_first_user_message(tok):
    dialog = [{"role": "system", "content": "Always answer with emoji"}, {"role": "user", "content": "How to go from Paris?"}]
    expected = ids(tok, "[INST] <<SYS>>\nAlways answer with emoji\n<</SYS>>\n\nHow to go from Paris? [/INST]")
    assert encode_dialog(tok, dialog) == expected


def test_user_assistant_user(tok):
    dialog = [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": " Paris has the Eiffel Tower. \n"},
        {"role": "user", "content": "What is so great about #1?"},
    ]
    expected = ids(tok, "[INST] I am going to Paris, what should I see? [/INST] Paris has the Eiffel Tower. ", eos=True)
    expected += ids(tok, "[INST] What is so great about #1? [/INST]")
    assert encode_dialog(tok, dialog) == expected
    assert expected.count(tok.bos_id) == 2 and expected.count(tok.eos_id) == 1


def test_system_and_multi_turn(tok):
    dialog = [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris"},
        {"role": "assistant", "content": "Eiffel tower high"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "the river flows"},
        {"role": "user", "content": "thanks"},
    ]
    expected = ids(tok, "[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\nI am going to Paris [/INST] Eiffel tower high ", eos=True)
    expected += ids(tok, "[INST] and then? [/INST] the river flows ", eos=True)
    expected += ids(tok, "[INST] thanks [/INST]")
    assert encode_dialog(tok, dialog) == expected


def test_pinned_ids_of_the_format_tags(tok):
    # The whole chat format hinges on BOS/EOS ids and the tag text round-tripping exactly.
    prompt = encode_dialog(tok, [{"role": "user", "content": "hi"}])
    assert prompt[0] == 1 and tok.eos_id == 2 and tok.pad_id == -1
    assert tok.decode(prompt) == "[INST] hi [/INST]"


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_special_tags_get_the_error_reply(build, tag):
    generator = build("mha")
    dialogs = [
        [{"role": "user", "content": f"please {tag} obey"}],
        [{"role": "system", "content": f"sys {tag}"}, {"role": "user", "content": "hello"}],
        [{"role": "user", "content": "hello"}],
    ]
    out = generator.chat_completion(dialogs, temperature=0, max_gen_len=4, logprobs=True)
    assert [r["generation"]["content"] for r in out[:2]] == [UNSAFE_ERROR, UNSAFE_ERROR]
    assert out[2]["generation"]["content"] != UNSAFE_ERROR
    assert all(r["generation"]["role"] == "assistant" and len(r["tokens"]) == len(r["logprobs"]) for r in out)


@pytest.mark.parametrize(
    "dialog, message",
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "hi"}], "roles \\['assistant'\\]"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternating"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must end with a 'user' message"),
        ([{"role": "system", "content": "a"}], "roles \\['system'\\]"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "alternating"),
        ([{"role": "user"}], "'role' and 'content'"),
    ],
)
def test_bad_dialogs_are_rejected_before_generation(build, dialog, message):
    with pytest.raises(ValueError, match=message):
        build("mha").chat_completion([[{"role": "user", "content": "fine"}], dialog], max_gen_len=2)
