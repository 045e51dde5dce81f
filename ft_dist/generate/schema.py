"""The typed config of `ft-data generate` (conf/data_generate.yaml). No torch here: it is checked before any
heavy import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from ft_dist.settings import identity, setting

DEFAULT_TEMPLATE = (
    "Write {n_pairs} {style} pairs about the text below, as a JSON list of objects with the keys {fields}. "
    "Use only facts from the text.\n\nText:\n{chunk}\n\nJSON:"
)
STYLE_FIELDS = {"qa": ("question", "answer"), "instruction": ("instruction", "response"), "chat": ("user", "assistant")}


@dataclass
class PromptConfig:
    """What the generator is asked: a template and how many pairs of which style."""

    template: str = DEFAULT_TEMPLATE
    """The request; placeholders {chunk} (required), {n_pairs}, {style}, {fields} are replaced, other braces kept."""
    style: str = setting("qa", choices=tuple(STYLE_FIELDS))
    """qa (question/answer rows), instruction (instruction/response rows) or chat (`messages` rows)."""
    n_pairs: int = setting(3, positive=True)
    """Pairs asked for per chunk."""


@dataclass
class GeneratorConfig:
    """Which model writes the pairs, and how it is called."""

    backend: str = setting("local", choices=("local", "openai"))
    """local: an HF causal LM directory (any model dir, an ft-dist run's final/); openai: an OpenAI-compatible
    endpoint (vLLM, TGI, llama.cpp server, `transformers serve`)."""
    model_path: Optional[str] = None
    """local: the model directory (safetensors)."""
    base_url: Optional[str] = None
    """openai: the endpoint, e.g. http://127.0.0.1:8000/v1."""
    model: Optional[str] = None
    """openai: the served model name (None: model_path)."""
    api: str = setting("chat", choices=("chat", "completions"))
    """openai: /chat/completions (one user message) or /completions (the prompt as raw text)."""
    api_key_env: str = setting("OPENAI_API_KEY", identity=False)
    """openai: the environment variable holding the API key; the key itself is never written anywhere."""
    tokenizer: Optional[str] = None
    """The tokenizer that measures chunks (None: model_path's)."""
    concurrency: int = setting(4, positive=True, identity=False)
    """openai: requests in flight at once."""
    timeout_s: float = setting(60.0, positive=True, identity=False)
    """openai: per-request timeout."""
    max_retries: int = setting(3, non_negative=True, identity=False)
    """openai: retries of a failed request (connection, 5xx, 429), with the client's exponential backoff."""
    batch_size: int = setting(8, positive=True)
    """local: prompts generated together (left-padded)."""
    max_new_tokens: int = setting(256, positive=True)
    """Longest reply."""
    temperature: float = setting(0.0, non_negative=True)
    """openai: sampling temperature (0: greedy, deterministic); the local backend decodes greedily."""
    malformed_retries: int = setting(1, non_negative=True)
    """Times a chunk whose reply did not parse is asked again."""
    device: str = setting("auto", choices=("auto", "cpu", "cuda"), identity=False)
    """local: where the model runs."""


@dataclass
class FilterConfig:
    """Quality filters; each one's count is in the report."""

    min_answer_chars: int = setting(3, non_negative=True)
    """Shorter answers (after stripping) are dropped as too_short (empty ones as empty)."""
    max_answer_chars: int = setting(2000, positive=True)
    """Longer answers are dropped as too_long."""
    min_grounding: float = setting(0.5, non_negative=True)
    """Share of the answer's words found in order in its chunk (ROUGE-L precision); below it: ungrounded."""
    near_duplicate: float = setting(0.8, positive=True)
    """Estimated Jaccard similarity (MinHash over character 5-grams) at which a pair is a near duplicate."""
    num_perm: int = setting(128, positive=True)
    """MinHash permutations."""


@dataclass
class DataGenerateConfig:
    """`ft-data generate`: documents in, training-ready Q&A JSONL out (resumable, append-only)."""

    inputs: List[str] = setting(MISSING, identity=False)
    """Folders (searched recursively) and globs of .txt/.md/.html/.jsonl files. Not part of what a resume must
    match: documents added later are generated for on the next run."""
    text_field: str = "text"
    """The field holding the text in .jsonl inputs."""
    output: str = setting(MISSING, identity=False)
    """The generated JSONL (trains with data.path=<output>); <output>.parts/ keeps per-rank progress and
    <output>.report.json the counts."""
    chunk_tokens: int = setting(512, positive=True)
    """Chunk length in the generator's tokens."""
    chunk_overlap: int = setting(64, non_negative=True)
    """Tokens shared by consecutive chunks."""
    target_data: Optional[str] = None
    """The dataset the pairs are for (a data.path): pairs that match its test split (as ft-train splits it with
    conf/data/file.yaml) are dropped as test_overlap."""
    # A resume continues only a run of the same settings (settings.identity of each part; output/pipeline.py).
    generate: GeneratorConfig = field(default_factory=GeneratorConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)


def fingerprint(cfg: DataGenerateConfig) -> Dict[str, Any]:
    """What decides a chunk's record (chunking, prompt, generator, per-pair filters), not where or how fast it runs:
    the parts of a run with other values are not resumed into this one."""
    from omegaconf import OmegaConf

    def plain(schema: type, node: Any, skip: tuple = ()) -> Dict[str, Any]:
        return {
            k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
            for k, v in identity(schema, node, skip).items()
        }

    return {
        "run": plain(DataGenerateConfig, cfg, ("generate", "prompt", "filters")),
        "generate": plain(GeneratorConfig, cfg.generate),
        "prompt": plain(PromptConfig, cfg.prompt),
        "filters": plain(FilterConfig, cfg.filters),
    }
