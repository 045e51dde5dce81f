"""Named prompt templates: how a (prompt, context) pair or a conversation becomes the text the model continues.

Prompt/response data: training and generation render prompts through the same function (`render_prompt`), so a
finetuned model is always asked in the format it learned; the response follows directly and ends with the
tokenizer's EOS. Chat data (and `template=tokenizer`) goes through the tokenizer's `apply_chat_template`, with
either the tokenizer's own Jinja template or ChatML (`CHATML_JINJA`), see ft_dist/data/chat.py.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ft_dist.errors import ConfigError

# name -> (template without context, template with context)
TEMPLATES: Dict[str, Tuple[str, str]] = {
    "qa": (
        "### Question:\n{prompt}\n\n### Answer:\n",
        "### Question:\n{prompt}\n\n### Input:\n{context}\n\n### Answer:\n",
    ),
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{prompt}\n\n### Response:\n",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{prompt}\n\n### Input:\n{context}\n\n### Response:\n",
    ),
    "chatml": (
        "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{prompt}\n\n{context}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "plain": ("{prompt}", "{prompt}\n{context}"),
}


def render_prompt(template: str, prompt: str, context: str = "") -> str:
    """The model input for one example, up to where the response starts."""
    if template not in TEMPLATES:
        raise ConfigError("data.template", f"expected one of {', '.join(TEMPLATES)}, got {template!r}")
    plain, with_context = TEMPLATES[template]
    return (with_context if context else plain).format(prompt=prompt, context=context)


# ChatML as a Jinja chat template, the same text as TEMPLATES["chatml"] for a single user turn.
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_template_for(template: str, tokenizer: Any) -> Optional[str]:
    """The Jinja template chat rendering uses: ChatML for `chatml`, the tokenizer's own for `tokenizer`, else None."""
    if template == "chatml":
        return CHATML_JINJA
    if template == "tokenizer":
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise ConfigError(
                "data.template",
                "expected a tokenizer with a chat template for template=tokenizer; "
                "this one has none (use template=chatml)",
            )
        return own if isinstance(own, str) else own.get("default", next(iter(own.values())))
    return None
