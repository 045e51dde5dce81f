"""Named prompt templates: how a (prompt, context) pair becomes the text the model continues.

Training and generation render prompts through the same function, so a finetuned model is always asked in the
format it learned. The response follows the rendered prompt directly and ends with the tokenizer's EOS.
"""

from __future__ import annotations

from typing import Dict, Tuple

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
