"""The Llama 2 chat format: dialogs to prompt token ids."""

from typing import List, Literal, Optional, TypedDict

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


def has_special_tags(dialog: Dialog) -> bool:
    """Whether any message smuggles in the format's own tags (the reply is then an error)."""
    return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Prompt ids: BOS [INST] user [/INST] assistant EOS for each finished turn, then BOS [INST] user [/INST]."""
    validate_dialog(dialog)
    if dialog[0]["role"] == "system":
        first_user = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first_user}] + dialog[2:]
    ids: List[int] = []
    for user, assistant in zip(dialog[:-1:2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {assistant['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids
