"""``reasoning_content``: a thinking model's chat answer and its thinking in separate fields, as vLLM returns them.

A chat request whose rendering lets the model think (``ThinkingFormat.thinks``: the template's
default, ``serve --thinking on`` or the request's ``enable_thinking``) gets the ``<think>`` block's
text in ``message.reasoning_content`` and the answer after it in ``message.content``, split as
evaluation splits them (``models.thinking.split_thinking``). Streamed, each chunk's ``delta``
carries what is new of each. A request rendered without thinking gets its text in ``content``,
untouched, as before; so do text completions.
"""

from __future__ import annotations

from typing import Any

from ..models.thinking import THINK_CLOSE, THINK_OPEN, ThinkingFormat, ThinkingSplit, split_thinking
from .jobs import held_back

TAGS = (THINK_OPEN, THINK_CLOSE)


def chat_message(text: str, thinking: ThinkingFormat) -> dict[str, Any]:
    """The ``message`` of a chat completion."""
    if not thinking.thinks:
        return {"role": "assistant", "content": text}
    split = thinking.split(text)
    return {"role": "assistant", "content": split.answer, "reasoning_content": split.thinking}


class ThinkingStream:
    """A streamed text's thinking and answer, sent as they grow.

    What has been sent of each is always the split of the text so far, less a possible start of a tag
    at its end (which waits for the next text), so the parts sent add up to what ``chat_message``
    returns for the whole text. The one exception is a tag that would move text already sent to the
    other part (an answer, then a late ``</think>``): from there on the text passes as answer, unsplit.
    """

    def __init__(self, opened: bool):
        self.opened = opened  # the prompt opened the block
        self.text, self.ready, self.unsplit = "", 0, False
        self.sent = ThinkingSplit("", "", False)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(new thinking, new answer) once ``text`` is appended; ``final``: nothing follows."""
        self.text += text
        if self.unsplit:
            return "", text
        ready = len(self.text) if final else len(self.text) - held_back(self.text, TAGS)
        now = split_thinking(self.text[:ready], self.opened)
        if not (now.thinking.startswith(self.sent.thinking) and now.answer.startswith(self.sent.answer)):
            self.unsplit = True
            return "", self.text[self.ready:]
        new = now.thinking[len(self.sent.thinking):], now.answer[len(self.sent.answer):]
        self.sent, self.ready = now, ready
        return new


class ChatChunks:
    """``choices[0]`` of each streamed chat chunk: called with each text delta, then with the finish reason."""

    def __init__(self, thinking: ThinkingFormat):
        self.split = ThinkingStream(thinking.opened) if thinking.thinks else None
        self.started = False

    def __call__(self, text: str, finish: str | None) -> dict[str, Any]:
        if self.split is None:
            delta: dict[str, Any] = {} if finish else {"content": text}
        else:
            reasoning, answer = self.split.feed(text, final=finish is not None)
            delta = {key: part for key, part in (("reasoning_content", reasoning), ("content", answer)) if part}
            if not delta and not finish:
                delta["content"] = ""
        if not self.started:
            delta["role"], self.started = "assistant", True
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
