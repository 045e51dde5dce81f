"""Chat data: render a conversation with a chat template and find which characters the assistant wrote.

The tokenizer's `apply_chat_template` renders the text (any Jinja template: the tokenizer's own, or ChatML). To
put the loss on assistant turns only, each assistant turn's character span is found by rendering the prefix that
ends just before it (with the generation prompt) and the prefix that ends just after it: with any template whose
renderings of a conversation's prefixes are prefixes of its full rendering (the usual case, and what generation
relies on), the span lies between the two. This works without `{% generation %}` markers, which most
tokenizers' templates lack (so `return_assistant_tokens_mask` cannot be used on them).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ft_dist.errors import DataError

Span = Tuple[int, int]


def _render(tokenizer: Any, messages: Sequence[Dict[str, str]], template: str, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def with_system_prompt(messages: List[Dict[str, str]], system_prompt: Optional[str]) -> List[Dict[str, str]]:
    """Put `system_prompt` first unless the conversation already has a system message."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_conversation(tokenizer: Any, messages: Sequence[Dict[str, str]], template: str) -> Tuple[str, List[Span]]:
    """The rendered conversation and the character spans of its assistant turns (content plus end-of-turn text)."""
    full = _render(tokenizer, messages, template, False)
    spans: List[Span] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, True) if i else ""
        through = _render(tokenizer, messages[: i + 1], template, False)
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(
                "the chat template renders a conversation's prefix differently from the conversation "
                "itself, so assistant turns cannot be located (use data.template=chatml)"
            )
        spans.append((len(before), len(through)))
    return full, spans


def generation_prompt(tokenizer: Any, messages: Sequence[Dict[str, str]], template: str) -> str:
    """What `generate` is given for the last assistant turn: the turns before it plus the generation prompt."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _render(tokenizer, messages[:last], template, True)


def encode_conversation(
    tokenizer: Any, messages: Sequence[Dict[str, str]], template: str, train_on_prompt: bool
) -> Tuple[List[int], List[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained on (assistant text).

    The conversation ends with the tokenizer's EOS (added when the template does not end with it), trained on, so
    generation, which stops at EOS, learns where an answer ends.
    """
    text, spans = render_conversation(tokenizer, messages, template)
    # Templates that write the BOS themselves must not get a second one from the tokenizer.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids: List[int] = list(enc["input_ids"])
    trained = []
    for start, end in enc["offset_mapping"]:
        # Special tokens added by the tokenizer have an empty span (0, 0): never trained unless train_on_prompt.
        inside = end > start and any(a <= start < b for a, b in spans)
        trained.append(train_on_prompt or inside)
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
        trained.append(True)
    return ids, trained
