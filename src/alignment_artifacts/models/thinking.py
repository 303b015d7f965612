"""Reasoning models: the chat template's thinking switch, where a thinking block closes, and the
answer split from its thinking.

Models like Qwen3 write a ``<think>...</think>`` block before the answer. Their templates read a
switch (``enable_thinking``); switched off, they emit an empty block (``<think>\\n\\n</think>\\n\\n``)
so that the model answers at once. What a template supports is found by rendering it, not by
reading its source: a switch exists when rendering with it on and off differs.

``--thinking`` is ``auto`` (the template's default), ``on`` or ``off``. ``on`` on a template without
a switch that does not think anyway is an error; ``off`` there is a no-op (the model answers at once
already), except on a template that always opens a thinking block, where it is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import UserError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINKING_MODES = ("auto", "on", "off")
SWITCH = "enable_thinking"  # the template variable Qwen3 (and SmolLM3, GLM-4.5) read
DEFAULT_THINKING_BUDGET = 1024  # tokens a thinking answer may spend before its answer tokens
_PROBE = [{"role": "user", "content": "2+2?"}]


@dataclass(frozen=True)
class TemplateThinking:
    """What a chat template does about thinking, found by rendering it."""

    switch: bool  # rendering with the switch on and off differs
    default_on: bool  # the default rendering leaves the answer to start with thinking
    always: bool  # the generation prompt opens a thinking block that no switch closes


def _render(tokenizer: Any, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True, **kwargs)


def template_thinking(tokenizer: Any) -> TemplateThinking:
    if not getattr(tokenizer, "chat_template", None):
        return TemplateThinking(False, False, False)
    default, on, off = _render(tokenizer), _render(tokenizer, **{SWITCH: True}), _render(tokenizer, **{SWITCH: False})
    tail = default[default.rfind(_PROBE[0]["content"]):]
    opens = tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)
    if on != off:
        return TemplateThinking(switch=True, default_on=default == on, always=False)
    return TemplateThinking(switch=False, default_on=opens, always=opens)


def check_mode(mode: str) -> None:
    if mode not in THINKING_MODES:
        raise UserError(f"--thinking must be one of {', '.join(THINKING_MODES)} (got '{mode}').")


@dataclass(frozen=True)
class ThinkingFormat:
    """How prompts are rendered and answers read for one ``--thinking`` choice on one template.

    ``kwargs`` render the prompts that are generated from; ``answer_kwargs`` render prompts whose
    first generated token is an answer token (the thinking block closed empty, where the template
    can), which first-token KL and refusal scores read.
    """

    mode: str
    thinks: bool  # generated text starts with a thinking block
    budget: int  # extra tokens generation allows for the thinking
    kwargs: dict[str, Any] = field(default_factory=dict)
    answer_kwargs: dict[str, Any] = field(default_factory=dict)
    opened: bool = False  # the prompt itself opens the block (templates that always think)

    def max_tokens(self, answer_tokens: int) -> int:
        """Tokens to generate: the answer's, plus the thinking budget when the model thinks first."""
        return answer_tokens + (self.budget if self.thinks else 0)

    def split(self, text: str) -> ThinkingSplit:
        """The generated text's thinking and answer; all answer, untouched, when the model does not think."""
        return split_thinking(text, self.opened) if self.thinks else ThinkingSplit("", text, True)


def thinking_format(tokenizer: Any, mode: str = "auto", budget: int = DEFAULT_THINKING_BUDGET) -> ThinkingFormat:
    """The rendering for ``mode``; a clear UserError where the template cannot do what was asked."""
    check_mode(mode)
    if budget < 0:
        raise UserError(f"--thinking-budget must be >= 0 (got {budget}).")
    support = template_thinking(tokenizer)
    if not support.switch:
        if mode == "on" and not support.always:
            raise UserError("--thinking on: this model's chat template has no thinking switch (it renders the same "
                            f"with {SWITCH} on and off) and opens no <think> block, so the model does not think. "
                            "Use --thinking auto (or off) with this model.")
        if mode == "off" and support.always:
            raise UserError("--thinking off: this model's chat template always opens a <think> block and has no "
                            f"switch ({SWITCH}) to close it. Use --thinking auto (or on) with this model.")
        return ThinkingFormat(mode, thinks=support.always, budget=budget, opened=support.always)
    closed = {SWITCH: False}
    if mode == "auto":
        return ThinkingFormat(mode, thinks=support.default_on, budget=budget, answer_kwargs=closed)
    return ThinkingFormat(mode, thinks=mode == "on", budget=budget, kwargs={SWITCH: mode == "on"},
                          answer_kwargs=closed)


class ThinkingSplit(NamedTuple):
    """A generated text cut into its thinking and its answer."""

    thinking: str
    answer: str
    finished: bool  # the thinking block closed (an unfinished one leaves the answer empty)


def split_thinking(text: str, opened: bool = False) -> ThinkingSplit:
    """(thinking, answer) of a generated text; ``opened``: the prompt already opened the block.

    Text with neither tag (and a prompt that opened nothing) is all answer. A block that opens and
    never closes ran out of budget: all thinking, no answer.
    """
    close = text.find(THINK_CLOSE)
    if close >= 0:
        thinking = text[:close]
        start = thinking.find(THINK_OPEN)
        thinking = thinking[start + len(THINK_OPEN):] if start >= 0 else thinking
        return ThinkingSplit(thinking.strip(), text[close + len(THINK_CLOSE):].strip(), True)
    start = text.find(THINK_OPEN)
    if start >= 0 and not text[:start].strip():
        return ThinkingSplit(text[start + len(THINK_OPEN):].strip(), "", False)
    if opened:
        return ThinkingSplit(text.strip(), "", False)
    return ThinkingSplit("", text.strip(), True)


def think_end_index(text: str, offsets: list[tuple[int, int]], after: int = 0) -> int | None:
    """Token index of the ``post_think`` position in a rendered prompt: where the thinking block has closed.

    That is the last token of ``</think>`` and the whitespace right after it (Qwen3: the one ``\\n\\n``
    token after ``</think>``), the position whose output predicts the first answer token. Only
    text from character ``after`` on is searched (the user's own text may hold the tag). None when
    no block closes there.
    """
    close = text.find(THINK_CLOSE, after)
    if close < 0:
        return None
    end = close + len(THINK_CLOSE)
    while end < len(text) and text[end].isspace():
        end += 1
    inside = [i for i, (start, _stop) in enumerate(offsets) if start < end and _stop > close]
    return inside[-1] if inside else None


def post_think_kwargs(tokenizer: Any, mode: str) -> dict[str, Any]:
    """Template kwargs for prompts that end after a closed thinking block (the ``post_think`` position).

    Collection reads the prompt only, never generated thinking, so the block must close in the
    prompt: ``auto`` and ``off`` render the template's empty block; ``on`` cannot.
    """
    if mode == "on":
        raise UserError("The position post_think reads the first position after the thinking block in the prompt, "
                        "and with --thinking on the block is left for the model to write (collection does not "
                        "generate it). Use --thinking off or auto: the template then closes an empty block.")
    return thinking_format(tokenizer, mode).answer_kwargs
