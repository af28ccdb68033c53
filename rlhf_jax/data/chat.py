"""Text prompts as chat messages, so a chat model sees its own template (``--model.chat-template``).

A text prompt reaches a model either raw (``tokenizer(text)``, the right thing for a base model) or
as a conversation rendered with the tokenizer's chat template (what an instruct model was trained
on). :func:`as_conversation` turns text into messages:

* a **transcript** in a known speaker format becomes its turns — Anthropic HH-RLHF's
  ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"`` and the embedded world's
  ``"Customer: ...\\nAgent:"`` (:data:`TRANSCRIPT_FORMATS`); the text must end with the assistant's tag
  (a prompt awaiting the answer) and alternate speakers, user first;
* any other text becomes one user message.

A completion that follows a converted text prompt loses its leading whitespace (the separator after
the speaker tag: the template writes its own). With the embedded tokenizer, whose template renders a
user turn as ``"Customer: ...\\nAgent:"`` and an answer as ``" ...<|eos|>"``, a world prompt and its
conversation encode to the same ids, so the embedded default is the same with the template on or off.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

from rlhf_jax.data.formats import Message, Prompt

ChatTemplate = Literal["auto", "on", "off"]
CHAT_TEMPLATE_MODES: tuple[ChatTemplate, ...] = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class TranscriptFormat:
    """Speaker tags of a plain-text dialogue; ``user`` opens the text, ``assistant`` ends a prompt."""

    name: str
    user: str
    assistant: str


TRANSCRIPT_FORMATS = (
    TranscriptFormat("hh_rlhf", user="\n\nHuman:", assistant="\n\nAssistant:"),
    TranscriptFormat("customer_agent", user="Customer:", assistant="\nAgent:"),
)


def transcript_messages(text: str) -> tuple[Message, ...] | None:
    """The turns of a transcript prompt in one of :data:`TRANSCRIPT_FORMATS`, or None if it is not one.

    ``"\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye\\n\\nAssistant:"`` ->
    ``(user "Hi", assistant "Hello", user "Bye")``. Turn texts are stripped of surrounding whitespace.
    """
    for fmt in TRANSCRIPT_FORMATS:
        body = text.lstrip()
        if fmt.user.startswith("\n"):  # "Human: ..." without the leading blank line is the same transcript
            body = fmt.user[:len(fmt.user) - len(fmt.user.lstrip())] + body
        if not body.startswith(fmt.user) or not body.rstrip(" ").endswith(fmt.assistant):
            continue
        body = body.rstrip(" ")[:-len(fmt.assistant)]
        # the user tag after the first turn is preceded by a newline in the customer/agent format
        user_tag = fmt.user if fmt.user.startswith("\n") else "\n" + fmt.user
        pieces = re.split(f"({re.escape(user_tag)}|{re.escape(fmt.assistant)})", body[len(fmt.user):])
        turns = [("user", pieces[0])]
        for tag, content in zip(pieces[1::2], pieces[2::2]):
            turns.append(("user" if tag == user_tag else "assistant", content))
        roles = [r for r, _ in turns]
        if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2) or roles[-1] != "user":
            continue  # not alternating: not this format
        if any(not c.strip() for _, c in turns):
            continue
        return tuple(Message(role, content.strip()) for role, content in turns)
    return None


def as_conversation(prompt: Prompt) -> tuple[Message, ...]:
    """``prompt`` as messages: a conversation unchanged, a transcript split into turns, other text one user turn."""
    if not isinstance(prompt, str):
        return prompt
    return transcript_messages(prompt) or (Message("user", prompt.strip()),)


TOKENIZER_ATTRIBUTE = "rlhf_chat_template"
"""Where ``model_io.load_lm`` records ``--model.chat-template`` on the tokenizer it returns, so that every
encoding of the run (training rows, rollout and evaluation prompts, the reward model's) agrees."""


def uses_template(prompt: Prompt, tokenizer, mode: ChatTemplate | None = None, source: str = "<row>") -> bool:
    """Whether ``prompt`` is rendered with the chat template: conversations always; text prompts with
    ``mode="on"``, or ``"auto"`` when the tokenizer has a template; never with ``"off"``. ``mode=None``:
    the tokenizer's :data:`TOKENIZER_ATTRIBUTE` if set, else "auto"."""
    if mode is None:
        mode = getattr(tokenizer, TOKENIZER_ATTRIBUTE, "auto")
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if not isinstance(prompt, str):
        if not has_template:
            raise ValueError(f"{source}: the prompt is a conversation but the tokenizer has no chat template")
        return True
    if mode == "on" and not has_template:
        raise ValueError(f"{source}: --model.chat-template on, but the tokenizer has no chat template "
                         f"(use --model.chat-template off to feed text prompts raw)")
    return mode == "on" or (mode == "auto" and has_template)
