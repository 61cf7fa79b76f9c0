"""Incremental detokenization and stop strings, one object per sequence.

Decoding every token on its own breaks multi-byte characters and, for some tokenizers, spaces; decoding
the whole output each step is quadratic. The usual way (TGI, vLLM): decode a short window of recent
tokens twice, with and without the newest, and emit the difference once it is no longer an unfinished
UTF-8 sequence ("\ufffd" at the end).

Stop strings: the text is searched after each token, and a stream holds back the last
``len(longest stop) - 1`` characters, since they may be the start of a stop string. With
``min_tokens``, stop strings are searched only from that many tokens on, and only in text that
includes the newest token's (as vLLM does): a stop string completed earlier never ends the output.
"""

from __future__ import annotations

from typing import Callable

PROMPT_CONTEXT = 4  # prompt tokens kept as decoding context for the first output tokens


class Detokenizer:
    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int], stop: tuple[str, ...] = (),
                 min_tokens: int = 0):
        self.decode = decode
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0  # self.ids[prefix:read] decodes to text that has been emitted already
        self.read = len(self.ids)
        self.text = ""  # the output text so far (cut before a stop string once one is found)
        self.sent = 0  # characters of self.text handed out by `delta`
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False
        self.min_tokens = min_tokens
        self.added = 0  # tokens added so far

    def add(self, token_id: int) -> bool:
        """Appends one token; returns True when the text now contains a stop string (and is cut before it)."""
        self.ids.append(token_id)
        self.added += 1
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # an unfinished character (or a token with no text): wait for more
        start = len(self.text)
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        if len(self.ids) > 64:  # keep the window short; only ids from `prefix` on are decoded
            cut = self.prefix
            self.ids, self.prefix, self.read = self.ids[cut:], 0, self.read - cut
        if self.stop and self.added >= self.min_tokens:
            lo = max(0, start - self.hold)  # a stop string may begin in the previous chunk
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return True
        return False

    def delta(self, final: bool) -> str:
        """New text since the last call; while not final, the tail that may begin a stop string stays back.

        When final, bytes of an unfinished character are flushed too (as U+FFFD, what decoding all ids gives)."""
        if final and not self.stopped and self.read < len(self.ids):
            self.text += self.decode(self.ids[self.prefix :])[len(self.decode(self.ids[self.prefix : self.read])) :]
            self.prefix = self.read = len(self.ids)
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out
