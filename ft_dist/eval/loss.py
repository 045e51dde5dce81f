"""Eval loss: the mean per-token loss and perplexity of the test split, under any strategy (used by the training
loop's periodic eval and by ft-eval)."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch

from ft_dist import dist
from ft_dist.data.batching import collate, examples_from_rows, label_positions, to_device
from ft_dist.strategies.base import Strategy


@torch.no_grad()
def evaluate_loss(
    strategy: Strategy, dataset: Any, pad_id: int, batch_size: int, max_batches: int = 0
) -> Dict[str, float]:
    """Mean per-token loss and perplexity over (the first `max_batches` batches of) `dataset`, sharded over ranks."""
    model = strategy.model
    was_training = model.training
    model.eval()
    world = strategy.world
    n_batches = math.ceil(len(dataset) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    loss_sum, tokens = 0.0, 0.0
    # Every rank runs the same number of forwards (sharded models gather weights collectively in each one);
    # a rank with no batch left re-runs batch 0 and discards the result.
    rounds = math.ceil(n_batches / world.size)
    for b in range(world.rank, rounds * world.size, world.size):
        real = b < n_batches
        start = (b if real else 0) * batch_size
        rows = dataset[start : start + batch_size]
        batch = collate(examples_from_rows(rows), pad_id)
        batch = to_device({**batch, "label_positions": label_positions(batch["labels"])}, world.device)
        summed = strategy.loss(batch, 1)  # n_items=1: the sum over the batch's tokens
        if real:
            loss_sum += float(summed)
            tokens += float((batch["labels"] != -100).sum())
    loss_sum, tokens = dist.all_reduce_sum([loss_sum, tokens])
    if was_training:
        model.train()
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
