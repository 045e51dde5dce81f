"""Packing: bin packing, collation, and the check that matters: a packed batch's loss equals the same examples'
unpacked loss in a real model built from config (transformers turns restarting position_ids into a
block-diagonal mask only when no attention mask is passed and use_cache=False)."""

from __future__ import annotations

import pytest
import torch

from conftest import LAMINI, TINY_NEOX, compose
from ft_dist.data.batching import collate, count_real_tokens, examples_from_rows
from ft_dist.data.pack import pack_batch, pack_lengths
from ft_dist.data.prepare import prepare_dataset
from ft_dist.data.tokenize import IGNORE_INDEX
from ft_dist.models import build_model, load_tokenizer


def test_best_fit_decreasing_is_tight_and_complete():
    lengths = [7, 5, 5, 4, 3, 3, 2, 1, 9, 1]
    rows = pack_lengths(lengths, capacity=10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 40 tokens in rows of 10: the optimum
    with pytest.raises(ValueError):
        pack_lengths([11], capacity=10)


def test_pack_batch_restarts_positions_and_sums_loss_tokens():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "labels": [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9]],
             "num_loss_tokens": [2, 1, 2]}
    out = pack_batch(batch, capacity=6)
    assert sorted(out["num_examples"]) == [1, 2] and sum(out["num_loss_tokens"]) == 5
    for ids, pos, labels in zip(out["input_ids"], out["position_ids"], out["labels"]):
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert all(labels[i] == IGNORE_INDEX for i in starts)  # no example learns to predict the next one's start
        assert all(pos[i] == pos[i - 1] + 1 for i in range(1, len(pos)) if i not in starts)


def test_collate_packed_rows_and_real_token_count():
    rows = {"input_ids": [[1, 2, 3, 4, 5], [6, 7, 8]], "labels": [[-100, 2, 3, -100, 5], [-100, 7, 8]],
            "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2]]}
    examples = examples_from_rows(rows)
    assert examples[1] == {"input_ids": [6, 7, 8], "labels": [-100, 7, 8], "position_ids": [0, 1, 2]}
    batch = collate(examples, pad_id=0)
    assert "attention_mask" not in batch  # its absence is what lets transformers detect the packed examples
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 0] and batch["labels"][1, 3:].tolist() == [-100, -100]
    assert count_real_tokens(batch) == 8
    plain = collate(examples_from_rows({k: v for k, v in rows.items() if k != "position_ids"}), pad_id=0)
    assert count_real_tokens(plain) == 8 and "position_ids" not in plain


@pytest.fixture(scope="module")
def lamini_both(cache_dir):
    """The same lamini examples (GPT-NeoX tokenizer) unpacked and packed into 256-token rows."""
    cfg = compose([*TINY_NEOX, "data=lamini", f"data.path={LAMINI}", f"data.cache_dir={cache_dir}", "data.limit=120",
                   "data.test_size=8", "data.max_seq_len=256"])
    tok = load_tokenizer(cfg.model)
    plain = prepare_dataset(cfg.data, tok)
    packed = prepare_dataset(compose([*TINY_NEOX, "data=lamini", f"data.path={LAMINI}", f"data.cache_dir={cache_dir}",
                                      "data.limit=120", "data.test_size=8", "data.max_seq_len=256", "data.packing=true"]).data, tok)
    return cfg, tok, plain, packed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(lamini_both, attn):
    torch.set_num_threads(1)
    cfg, tok, plain, packed = lamini_both
    cfg.model.attn_implementation = attn
    torch.manual_seed(0)
    model = build_model(cfg.model, tok).eval()
    rows = packed.train[:3]  # three packed rows and exactly the examples they hold, unpacked
    n_examples = sum(rows["num_examples"])
    assert n_examples > 3
    examples = []
    for ids, labels, pos in zip(rows["input_ids"], rows["labels"], rows["position_ids"]):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
        examples += [dict(input_ids=ids[a:b], labels=labels[a:b]) for a, b in zip(starts, starts[1:])]
    assert len(examples) == n_examples and {tuple(e["input_ids"]) for e in examples} <= set(map(tuple, plain.train["input_ids"]))
    n_loss = sum(rows["num_loss_tokens"])
    packed_batch = collate(examples_from_rows(rows), tok.pad_token_id)
    unpacked_batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        out_packed = model(**packed_batch, use_cache=False, num_items_in_batch=n_loss)
        out_plain = model(**unpacked_batch, use_cache=False, num_items_in_batch=n_loss)
        # Control: positions that do not restart let examples attend to each other.
        leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1]).expand_as(packed_batch["input_ids"]))
        out_leaky = model(**leaky, use_cache=False, num_items_in_batch=n_loss)
    # The same logits, example by example, read back from the packed rows.
    def per_example(logits):
        pieces = []
        for row, pos in enumerate(rows["position_ids"]):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            pieces += [logits[row, a:b] for a, b in zip(starts, starts[1:])]
        return pieces
    plain_logits = [out_plain.logits[i, :len(e["input_ids"])] for i, e in enumerate(examples)]
    logit_diff = max((a - b).abs().max().item() for a, b in zip(per_example(out_packed.logits), plain_logits))
    leak_diff = max((a - b).abs().max().item() for a, b in zip(per_example(out_leaky.logits), plain_logits))
    loss_diff = abs(out_packed.loss - out_plain.loss).item()
    print(f"{attn}: packed loss {out_packed.loss.item():.7f} unpacked {out_plain.loss.item():.7f} diff {loss_diff:.2e}; "
          f"max logit diff {logit_diff:.2e}, with leaking positions {leak_diff:.2e}")
    assert loss_diff < 1e-5 and logit_diff < 1e-4
    assert leak_diff > 1e-2
    assert count_real_tokens(packed_batch) == sum(len(e["input_ids"]) for e in examples) == count_real_tokens(unpacked_batch)
