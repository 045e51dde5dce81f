"""Time ft-eval's full evaluation on lamini_docs with a from-config Pythia-style model on CPU.

    python bench/eval_lamini.py                       # 140 test examples, pythia-70m architecture (random init)
    python bench/eval_lamini.py --examples 8 --arch tiny

The full evaluation is what `ft-eval` runs on one model: loss and perplexity over the test split, greedy
generation of every test answer with exact/normalised match, token-F1 and ROUGE-L, error analysis against a
vocabulary of the training split, and the local multiple-choice file through lm-eval. A random-init model never
emits EOS, so every answer runs to max_new_tokens: the slowest case. The budget is 10 minutes on CPU; the script
prints the time, its share of the budget and each phase's seconds, and exits 1 when over budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

ASSETS = Path(os.environ.get("FT_DIST_ASSETS", REPO.parent / "shared" / "assets"))
BUDGET_S = 600.0
ARCHS = {
    # pythia-70m as published (512 wide, 6 layers), built from config: the real cost of the smallest Pythia.
    "pythia-70m": [],
    # conftest.TINY_NEOX's size: for the test that runs this script.
    "tiny": ["model.arch.hidden_size=64", "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4",
             "model.arch.intermediate_size=256"],
}


def overrides(args: argparse.Namespace, out_dir: Path) -> list:
    return [
        "model=pythia-70m", "model.from_config=true", f"model.tokenizer={ASSETS / 'tokenizers' / 'gpt-neox-20b'}",
        *ARCHS[args.arch],
        "data=lamini", f"data.path={ASSETS / 'datasets' / 'lamini_docs.jsonl'}", f"data.test_size={args.examples}",
        f"data.cache_dir={args.cache_dir or out_dir / 'cache'}",
        f"eval.max_new_tokens={args.max_new_tokens}", "eval.batch_size=16", "device=cpu",
        f"mc_file={REPO / 'tests' / 'data' / 'mc_items.jsonl'}" if args.mc else "mc_file=null",
        f"output_dir={out_dir / 'eval'}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=140, help="test examples (data.test_size)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="pythia-70m")
    parser.add_argument("--no-mc", dest="mc", action="store_false", help="skip the lm-eval multiple-choice file")
    parser.add_argument("--cache-dir", help="prepared-data cache (default: inside the output dir)")
    parser.add_argument("--out", help="output dir (default: a temporary one)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    import ft_dist.commands.startup as cli
    from ft_dist.commands.eval import run

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="ft-dist-bench-eval-"))
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides(args, out_dir))
    start = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - start
    result = json.loads((out_dir / "eval" / "eval.json").read_text())["base"]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in result["seconds"].items() if k != "total")
    mc = "".join(f", {task} acc {m['acc']:.2f}" for task, m in result.get("mc", {}).items())
    print(f"lamini full evaluation: {result['examples']} examples, {args.arch} from config, "
          f"max_new_tokens {args.max_new_tokens}: {seconds:.1f} s ({seconds / BUDGET_S:.2f} of the 10-minute budget)")
    print(f"phases: {phases} (the rest: tokenizer, data preparation, reports)")
    print(f"included: eval_loss {result['eval_loss']:.3f}, exact_match {result['exact_match']:.3f}, "
          f"token_f1 {result['token_f1']:.3f}, rouge_l {result['rouge_l']:.3f}, errors {result['errors']}{mc}")
    print(f"outputs: {out_dir / 'eval'}")
    return 0 if seconds <= BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
