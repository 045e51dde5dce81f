"""The training loss: cross-entropy summed over the response tokens, divided by the caller's token count.

Two implementations of the same number (`train.loss`):

- `full`: transformers' own loss. The model computes [tokens x vocab] logits, and the loss upcasts them to fp32:
  for a 128k vocabulary at 8k tokens per micro-batch that is 4 GiB of fp32 logits, plus their gradient.
- `chunked`: the LM head runs on chunks of `train.loss_chunk_tokens` tokens straight from the final hidden states,
  each chunk's cross-entropy is summed, and each chunk but the last is recomputed in backward
  (torch.utils.checkpoint), so at most one chunk of logits exists at any time. The last chunk's backward is the
  first to run, so keeping its log-softmax from forward holds the same memory at the same moment as recomputing
  it would, without the recompute. Torch-native, so it runs on CPU and V100 alike.
  Where the batch names its `label_positions` (the training loader and eval collate them on the host), the head
  runs on those positions only: prompt and padding positions, whose logits the loss ignores, cost no head FLOPs
  (the head is the largest matmul of a small model: a 50k-128k vocabulary).

`chunked` works by taking over the forward of the model's output-embedding module (the LM head) while a loss is
computed: the head's module hooks still run around it, so FSDP2 and ZeRO-3 gather its weight as they would for the
full logits. Generation and everything else see the ordinary head. It is exact (in fp32) only where the model hands
the head's output straight to the loss; `auto` picks it for the architectures known to do so (CHUNKED_LOSS_ARCHS)
and `full` for the rest. Under 16-bit compute the head's weight gradient is a sum of per-chunk 16-bit terms, so it
differs from `full` by 16-bit rounding, as micro-batch accumulation does.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ft_dist.config import CHUNKED_LOSS_ARCHS
from ft_dist.errors import ConfigError

IGNORE = -100


def output_head(model: nn.Module) -> nn.Module:
    """The LM head of a (PEFT-wrapped) HF causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]  # PEFT
    return cast(nn.Module, base.get_output_embeddings())  # type: ignore[operator]  # PreTrainedModel method


def chunked_loss_supported(model: nn.Module) -> Optional[str]:
    """None if `chunked` is exact for this (PEFT-wrapped) HF model, else why not."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in CHUNKED_LOSS_ARCHS:
        return f"model_type {model_type!r} is not one of {sorted(CHUNKED_LOSS_ARCHS)}"
    head = output_head(model)
    # A plain projection: nn.Linear's own forward. FSDP2's FSDPLinear subclass keeps it; a LoRA-wrapped head (PEFT's
    # forward) or a quantized one (bitsandbytes' forward) does not.
    if not (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward):
        return f"its LM head is a {type(head).__name__}, not a plain linear projection"
    return None


class CausalLMLoss:
    """`loss(model, batch, n_items)`: the summed response-token cross-entropy of `batch` divided by `n_items`.

    `model` is what the strategy calls (DDP, FSDP2 or DeepSpeed may wrap it); `hf_model` is the (PEFT-wrapped) HF
    model inside, whose LM head `chunked` takes over.
    """

    def __init__(self, hf_model: nn.Module, kind: str, chunk_tokens: int) -> None:
        why_not = chunked_loss_supported(hf_model) if kind != "full" else None
        if kind == "chunked" and why_not:
            raise ConfigError("train.loss", f"chunked cross-entropy is not exact here: {why_not}; use full or auto")
        self.kind = "full" if kind == "full" or why_not else "chunked"
        self.chunk_tokens = chunk_tokens
        self._labels: Optional[torch.Tensor] = None
        self._positions: Optional[torch.Tensor] = None
        if self.kind == "chunked":
            head = output_head(hf_model)
            self._head_forward: Callable[[torch.Tensor], torch.Tensor] = head.forward
            # An instance attribute shadows the class's forward; nn.Module.__call__ (and so every hook) is unchanged.
            head.forward = self._forward

    def __call__(self, model: nn.Module, batch: Dict[str, torch.Tensor], n_items: float) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_positions")}
        if self.kind == "full":
            return model(**inputs, labels=batch["labels"], use_cache=False, num_items_in_batch=n_items).loss
        with self._computing(batch["labels"], batch.get("label_positions")):
            summed = model(**inputs, use_cache=False).logits  # the head returned the summed loss (see _forward)
        return summed / n_items

    @contextlib.contextmanager
    def _computing(self, labels: torch.Tensor, positions: Optional[torch.Tensor]) -> Iterator[None]:
        self._labels, self._positions = labels, positions
        try:
            yield
        finally:
            self._labels = self._positions = None

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's forward: the ordinary logits, or, while a loss is computed, the loss summed over chunks."""
        if self._labels is None:
            return self._head_forward(hidden)
        # Position t predicts token t+1; the last position predicts nothing (as transformers' ForCausalLMLoss).
        targets = F.pad(self._labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        # Its size is a shape, known on the host. A micro-batch with no label at all keeps every position, so the
        # head (and the graph through it) still runs, as data-parallel gradient sync expects of every parameter.
        if self._positions is not None and self._positions.numel():
            flat, targets = flat.index_select(0, self._positions), targets.index_select(0, self._positions)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, flat.shape[0], self.chunk_tokens):
            end = start + self.chunk_tokens
            if end >= flat.shape[0]:  # the last chunk: its backward runs first, when its logits would be rebuilt
                return total + self._chunk_loss(flat[start:end], targets[start:end])
            # Recomputed in backward: only this chunk's logits ever exist, in forward and in backward.
            total = total + checkpoint(self._chunk_loss, flat[start:end], targets[start:end], use_reentrant=False)
        return total

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._head_forward(hidden).float()  # the fp32 upcast transformers' loss does, one chunk at a time
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")

    def __str__(self) -> str:
        return f"{self.kind} cross-entropy" + (
            f" ({self.chunk_tokens} tokens a chunk)" if self.kind == "chunked" else ""
        )
