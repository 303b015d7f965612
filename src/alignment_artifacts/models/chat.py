"""The prompt as the model sees it: chat formatting, the context it must fit, and end-of-turn tokens.

A model fed more positions than it was built for returns garbage without complaint, so every
entry point checks (or, asked to, truncates) here before running the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import UserError

PLAIN_TEMPLATE_USER = "User: "
PLAIN_TEMPLATE_ASSISTANT = "\nAssistant:"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_chat(tokenizer: Any, prompt: str, system: str | None = None,
                history: Sequence[dict[str, str]] | None = None, template_kwargs: dict[str, Any] | None = None
                ) -> str:
    """The prompt as the model sees it, ending where the assistant's answer begins.

    ``template_kwargs`` go to the chat template (e.g. the thinking switch, models/thinking.py).
    """
    if not prompt or not prompt.strip():
        raise UserError("The prompt is empty. Pass the text to send to the model.")
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.extend(history or [])
    messages.append({"role": "user", "content": prompt})
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}))
    lines = [f"System: {system}\n"] if system else []
    for message in messages[1 if system else 0:]:
        prefix = PLAIN_TEMPLATE_USER if message["role"] == "user" else "\nAssistant: "
        lines.append(prefix + message["content"])
    return "".join(lines) + PLAIN_TEMPLATE_ASSISTANT


TRUNCATE_FIX = ("Shorten it, lower --max-tokens, or pass --truncate (truncate=True in the API) to drop tokens from "
                "the start of the user's text.")


def context_length(model: Any) -> int | None:
    """Positions the model was built for (None if its config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def context_error(tokens: int, context: int, reserved: int, fix: str = TRUNCATE_FIX, which: str = "The prompt"
                  ) -> UserError:
    """The prompt does not fit: say how long it is, what fits, and what to do."""
    room = f", {reserved} of which are kept for generated tokens" if reserved else ""
    return UserError(f"{which} is {tokens} tokens long (chat template included), but the model's context is "
                     f"{context} tokens{room}: at most {context - reserved} prompt tokens fit. {fix}")


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_fits(tokenizer: Any, texts: Sequence[str], context: int | None, reserved: int,
               where: str = "the prompts", fix: str = "Shorten it or remove it.") -> None:
    """Refuse chat-formatted texts that leave less than ``reserved`` positions of the context."""
    if context is None:
        return
    for index, text in enumerate(texts):
        tokens = count_tokens(tokenizer, text)
        if tokens + reserved > context:
            raise context_error(tokens, context, reserved, fix, which=f"Prompt {index + 1} of {where}")


def fit_prompt(tokenizer: Any, prompt: str, context: int | None, reserved: int = 0, truncate: bool = False,
               system: str | None = None, history: Sequence[dict[str, str]] | None = None,
               template_kwargs: dict[str, Any] | None = None) -> str:
    """The chat-formatted prompt if it leaves ``reserved`` positions of the context, else a UserError.

    A model fed more positions than it was built for returns garbage without complaint, so a long
    prompt is refused unless ``truncate``: then the oldest turns go first, then tokens from the
    start of the user's text; the template and the system prompt always stay.
    """
    turns = list(history or [])
    while True:
        text = format_chat(tokenizer, prompt, system, turns, template_kwargs)
        tokens = count_tokens(tokenizer, text) if context is not None else 0
        if context is None or tokens + reserved <= context:
            return text
        if not truncate:
            raise context_error(tokens, context, reserved)
        if turns:
            turns = turns[2:]
            continue
        excess = tokens + reserved - context
        starts = [start for start, _ in tokenizer(prompt, add_special_tokens=False,
                                                  return_offsets_mapping=True)["offset_mapping"]]
        if excess >= len(starts):
            raise UserError(f"The chat template and system prompt alone take {tokens - len(starts)} of the model's "
                            f"{context} tokens, leaving no room for the user's text and the {reserved} answer "
                            "tokens. Shorten the system prompt or lower --max-tokens.")
        prompt = prompt[max(1, starts[excess]):]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(token_id, int) and token_id >= 0:
            ids.add(token_id)
    return sorted(ids)
