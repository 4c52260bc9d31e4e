"""One generated row's text as its tokens arrive: decoded incrementally, cut at stop strings, released only when safe.

SentencePiece drops the leading space of the first piece it decodes, and a character may be spelled by several
byte-fallback tokens, of which any prefix decodes to U+FFFD. So each new token is decoded within a window that
starts at an earlier token (both decodes drop the same space) and its text is released only once it no longer ends
in U+FFFD. Text that could still be the start of a stop string is held back until it cannot be. The pieces
released, joined, are exactly the final text: the decoding of every token, cut before the first stop string.
"""

from typing import List, Sequence, Union

from llama.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what an incomplete byte-fallback sequence decodes to


def check_stops(stops: Union[None, str, Sequence[str]]) -> List[str]:
    """The stop strings of a call, checked: None, a str or a list of non-empty str."""
    stops = [] if stops is None else [stops] if isinstance(stops, str) else list(stops)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop strings must be non-empty str, got {stops!r}")
    return stops


class RowText:
    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.ids: List[int] = []
        self.window = 0  # the token the decoding window starts at
        self.decoded = 0  # tokens whose text is in self.text
        self.text = ""  # complete characters decoded so far (cut at a stop string once one is seen)
        self.released = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was seen: no more text

    def add(self, token: int) -> str:
        """Take the next token; the text it makes safe to release (often '')."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.window : self.decoded])
        after = self.tokenizer.decode(self.ids[self.window :])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""  # part of a character: wait for the rest
        self._extend(after[len(before) :])
        self.window, self.decoded = self.decoded, len(self.ids)
        return self._release(len(self.text) if self.stopped else len(self.text) - self._held_back())

    def finish(self) -> str:
        """The row has ended: whatever text is still held back (an unfinished character comes out as decoded)."""
        if not self.stopped and self.decoded < len(self.ids):
            self._extend(self.tokenizer.decode(self.ids[self.window :])[len(
                self.tokenizer.decode(self.ids[self.window : self.decoded])) :])
            self.decoded = len(self.ids)
        return self._release(len(self.text))

    def _extend(self, new: str) -> None:
        """Add decoded text, cut before the first stop string it completes."""
        searched = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += new
        found = [i for i in (self.text.find(s, searched) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        return max((n for s in self.stops for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)

    def _release(self, upto: int) -> str:
        piece = self.text[self.released : upto]
        self.released = max(self.released, upto)
        return piece
