"""Multiple-choice scoring: the native log-likelihood scorer and the lm-eval harness on a local task.

A tiny GPT-NeoX, built from a config with random weights, is trained for a few seconds on the correct answers of
tests/data/mc_items.jsonl, so which choice is likelier is known. Its tokenizer is a byte-level BPE (GPT-2's scheme)
trained on the test texts with a 300-token vocabulary: a 50k vocabulary made training take minutes on 2 cores.

The flag item is built so that the raw sum and the length-normalised scores disagree: its correct answer is long and
each of its 8 trained variants has probability ~1/11, while the short wrong answer "none" has ~3/11.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

from ft_dist.errors import DataError, UserError
from ft_dist.eval import harness
from ft_dist.eval.multiple_choice import (
    TARGET_DELIMITER,
    ChoiceScore,
    accuracy_metrics,
    choice_loglikelihoods,
    encode_pair,
    format_context,
    load_items,
    parse_item,
    predictions,
    score_multiple_choice,
)

DATA = Path(__file__).parent / "data" / "mc_items.jsonl"
ASSETS = Path(os.environ.get("FT_DIST_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
TOKENIZER = ASSETS / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
EOS = "<|endoftext|>"
FLAG = "Describe the flag."
FLAG_VARIANTS = [
    f"{a} stripes and {b} stars on a {c} blue field"
    for a, b, c in itertools.product(("red", "green"), ("white", "gold"), ("dark", "pale"))
]


def training_texts(items) -> list:
    """Context + correct answer for the fact items; 8 long variants and 3 x "none" for the flag item."""
    texts = []
    for item in items:
        answers = FLAG_VARIANTS + ["none"] * 3 if item.question == FLAG else [item.choices[item.answer]]
        texts += [format_context(item.question) + TARGET_DELIMITER + answer for answer in answers]
    return texts


def train_tiny_model(tokenizer, texts, steps: int = 100):
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64,
    )
    model = transformers.GPTNeoXForCausalLM(config)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core machine 2 threads ran 4x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def items():
    return load_items(DATA)


def small_bpe_tokenizer(texts, vocab_size: int = 300) -> transformers.PreTrainedTokenizerFast:
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


@pytest.fixture(scope="module")
def neox_tokenizer():
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), eos_token=EOS)


@pytest.fixture(scope="module")
def tokenizer(items):
    return small_bpe_tokenizer(training_texts(items) + [c for item in items for c in item.choices])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, items, tokenizer):
    """The trained model, and the directory it is saved in with its tokenizer (what lm-eval loads)."""
    model = train_tiny_model(tokenizer, training_texts(items))
    model_dir = tmp_path_factory.mktemp("mc_model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model, model_dir


def test_trained_model_picks_the_trained_answers(trained, tokenizer, items):
    model, _ = trained
    facts = [item for item in items if item.question != FLAG]
    metrics = score_multiple_choice(model, tokenizer, facts)["metrics"]
    assert metrics["acc"] == 1.0 and metrics["acc_norm"] == 1.0 and metrics["acc_norm_token"] == 1.0
    assert metrics["n"] == len(facts)
    assert metrics["acc_stderr"] == 0.0


def test_length_normalisation_picks_the_long_answer_the_raw_sum_misses(trained, tokenizer, items):
    model, _ = trained
    flag = next(item for item in items if item.question == FLAG)
    none, long = (flag.choices.index(c) for c in ("none", FLAG_VARIANTS[0]))
    (scores,) = choice_loglikelihoods(model, tokenizer, [flag])
    # Trained probabilities ~3/11 for "none" and ~1/11 for the long answer: the raw sum prefers "none" ...
    assert scores[none].loglikelihood > scores[long].loglikelihood
    assert scores[long].num_tokens > 5 * scores[none].num_tokens
    picks = predictions(scores)
    assert picks["acc"] == none
    # ... while per token and per character the long answer is far likelier.
    assert picks["acc_norm_token"] == long and picks["acc_norm"] == long
    metrics = accuracy_metrics([scores], [flag.answer])
    assert (metrics["acc"], metrics["acc_norm"], metrics["acc_norm_token"]) == (0.0, 1.0, 1.0)


def test_batching_and_padding_do_not_change_scores(trained, tokenizer, items):
    model, _ = trained
    one = choice_loglikelihoods(model, tokenizer, items, batch_size=1)
    many = choice_loglikelihoods(model, tokenizer, items, batch_size=7)
    for a, b in zip(itertools.chain(*one), itertools.chain(*many)):
        assert a.num_tokens == b.num_tokens and a.loglikelihood == pytest.approx(b.loglikelihood, abs=1e-4)


def test_encode_pair_keeps_the_whole_strings_tokens(neox_tokenizer):
    tokenizer = neox_tokenizer
    context, continuation = encode_pair(tokenizer, "Question: q\nAnswer: ", "carbon dioxide")
    # The context's trailing space moves to the continuation, so " carbon" stays one token as in running text.
    assert context + continuation == tokenizer.encode("Question: q\nAnswer: carbon dioxide")
    assert tokenizer.decode(continuation) == " carbon dioxide"


def test_accuracy_metrics_on_hand_made_scores():
    # Item 1: raw sum picks the short choice 0; per token (-4/8) and per char (-4/40) pick the long choice 1.
    # Item 2: choice 1 has the better total but choice 0 wins per token; per char (0: -3/30, 1: -2/10) also 0.
    scores = [
        [ChoiceScore(-2.0, 1, 4), ChoiceScore(-4.0, 8, 40)],
        [ChoiceScore(-3.0, 6, 30), ChoiceScore(-2.0, 1, 10)],
        [ChoiceScore(-1.0, 1, 5), ChoiceScore(-9.0, 1, 5)],
        [ChoiceScore(-5.0, 2, 10), ChoiceScore(-1.0, 2, 10)],
    ]
    metrics = accuracy_metrics(scores, [1, 0, 0, 0])
    assert metrics["acc"] == 0.25  # only item 3
    assert metrics["acc_norm_token"] == 0.75 and metrics["acc_norm"] == 0.75
    # Standard error of a mean of 0/1 values: sample std / sqrt(n) = sqrt(p (1 - p) n / (n - 1) / n).
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 * 4 / 3 / 4))


def test_items_accept_choice_text_and_reject_bad_answers(tmp_path):
    assert parse_item({"question": "q", "choices": ["1", "2"], "answer": "2"}).answer == 1  # text before index
    assert parse_item({"question": "q", "choices": ["a", "b"], "answer": "1"}).answer == 1
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "c"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: answer 'c' is not one of the choices"):
        load_items(path)
    with pytest.raises(DataError, match="not an index into 2 choices"):
        parse_item({"question": "q", "choices": ["a", "b"], "answer": 2})


def test_harness_runs_the_local_task_and_agrees_with_the_native_scorer(trained, tokenizer, items, tmp_path,
                                                                      monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))  # keep ~/.cache clean
    model, model_dir = trained
    out = harness.run_harness(model_dir, items_path=DATA, task_dir=tmp_path / "tasks", device="cpu", log_samples=True)
    task = harness.LOCAL_TASK_NAME
    assert task in out["results"]
    computed = out["results"][task]
    reported = out["metrics"][task]
    # ft-dist reports the harness's own numbers ...
    assert reported["acc"] == computed["acc,none"] and reported["acc_norm"] == computed["acc_norm,none"]
    assert reported["acc_stderr"] == computed["acc_stderr,none"] and reported["n"] == len(items)
    # ... which agree with the native scorer on the same items: 4 facts right, the flag item right only by norm.
    native = score_multiple_choice(model, tokenizer, items)
    assert reported["acc"] == native["metrics"]["acc"] == 0.8
    assert reported["acc_norm"] == native["metrics"]["acc_norm"] == 1.0
    assert reported["acc_stderr"] == pytest.approx(native["metrics"]["acc_stderr"])
    # Same strings, same tokens: the per-choice log-likelihoods match too.
    for sample in out["samples"][task]:
        harness_lls = [resp[0] for resp in sample["filtered_resps"]]
        native_lls = native["items"][sample["doc_id"]]["loglikelihoods"]
        assert harness_lls == pytest.approx(native_lls, abs=1e-4)
    # In-training use: the loaded model object (with its tokenizer) gives the same numbers as its directory.
    in_memory = harness.run_harness(model, items_path=DATA, task_dir=tmp_path / "tasks2", tokenizer=tokenizer)
    assert in_memory["metrics"][task] == reported


def test_harness_task_file_is_reusable(tmp_path):
    yaml_path = harness.write_task(DATA, tmp_path, "my_task")
    data = [json.loads(line) for line in (tmp_path / "my_task.jsonl").read_text().splitlines()]
    assert yaml_path.name == "my_task.yaml" and "doc_to_choice: choices" in yaml_path.read_text()
    assert data[2]["answer"] == 2  # "honey" written as its index


def test_named_task_without_hub_access_is_a_user_error(monkeypatch, tokenizer):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    model = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(UserError, match="no task no_such_task"):
        harness.run_harness(model, tasks=["arc_easy", "no_such_task"], tokenizer=tokenizer)
    # Second call: the built-in task index is reused, not rebuilt (seconds).
    with pytest.raises(UserError, match="not reachable"):
        harness.run_harness(model, tasks=["arc_easy"], tokenizer=tokenizer)
