"""The chat formats, dialogs to prompt token ids: Llama 2's ([INST] tags in text) and Llama 3's (header and
end-of-turn control tokens), chosen by the tokenizer's kind."""

from typing import Callable, List, Literal, NamedTuple, Optional, Sequence, TypedDict

from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def validate_dialog(dialog: Dialog, index: Optional[int] = None) -> None:
    """Raise ValueError unless dialog is [system], then user/assistant alternating, ending with user."""
    where = "dialog" if index is None else f"dialog {index}"
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of messages")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise ValueError(f"{where}, message {i}: each message is a dict with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}, message {i}: content must be a str")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    expected = ["user", "assistant"]
    roles = [m["role"] for m in turns]
    if not roles or any(role != expected[i % 2] for i, role in enumerate(roles)):
        raise ValueError(
            f"{where} has roles {[m['role'] for m in dialog]}: expected an optional 'system' first, "
            "then 'user' and 'assistant' alternating, starting with 'user'"
        )
    if roles[-1] != "user":
        raise ValueError(f"{where} must end with a 'user' message, not '{roles[-1]}'")


def has_special_tags(dialog: Dialog, tags: Sequence[str] = SPECIAL_TAGS) -> bool:
    """Whether any message smuggles in the format's own tags (the reply is then an error)."""
    return any(tag in message["content"] for message in dialog for tag in tags)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Prompt ids of a dialog, checked, in the chat format of the tokenizer's model."""
    validate_dialog(dialog)
    return chat_format(tokenizer).encode(tokenizer, dialog)


def _encode_llama2(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """BOS [INST] user [/INST] assistant EOS for each finished turn, then BOS [INST] user [/INST]; a system prompt
    goes inside the first [INST] between <<SYS>> tags."""
    if dialog[0]["role"] == "system":
        first_user = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first_user}] + dialog[2:]
    ids: List[int] = []
    for user, assistant in zip(dialog[:-1:2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {assistant['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def _encode_llama3(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """<|begin_of_text|>, each message as <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, then the
    assistant's header for the answer. Content is stripped and encoded as text: it can never make a control token."""
    special = tokenizer.special_ids

    def header(role: str) -> List[int]:
        return ([special["<|start_header_id|>"]] + tokenizer.encode(role, bos=False, eos=False)
                + [special["<|end_header_id|>"]] + tokenizer.encode("\n\n", bos=False, eos=False))

    ids = [tokenizer.bos_id]
    for message in dialog:
        ids += header(message["role"]) + tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        ids.append(special["<|eot_id|>"])
    return ids + header("assistant")


class ChatFormat(NamedTuple):
    encode: Callable[[Tokenizer, Dialog], List[int]]  # a checked dialog -> prompt ids
    # Strings a message may not contain (its reply is then UNSAFE_ERROR): Llama 2's tags are text the model reads
    # as structure; Llama 3's structure is control tokens, which no text encodes to, so it refuses nothing.
    special_tags: Sequence[str]


CHAT_FORMATS = {"sentencepiece": ChatFormat(_encode_llama2, SPECIAL_TAGS), "tiktoken": ChatFormat(_encode_llama3, ())}


def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    """The chat format of the model a tokenizer belongs to: Llama 2's for SentencePiece, Llama 3's for tiktoken."""
    return CHAT_FORMATS[tokenizer.kind]
