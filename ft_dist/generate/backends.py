"""The two generators behind one interface: `complete(prompts) -> replies`, in prompt order.

LocalGenerator: an HF causal LM directory, batched greedy decoding (ft_dist.eval.generation). OpenAIGenerator: any
OpenAI-compatible endpoint through the official `openai` client (base_url, timeout, max_retries with its
exponential backoff), with at most `concurrency` requests in flight. The API key comes from the environment
variable the config names and lives only in the client object.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Protocol

from ft_dist.errors import ConfigError, UserError
from ft_dist.generate.schema import GeneratorConfig


class Generator(Protocol):
    name: str
    """Named in every pair's provenance."""

    def complete(self, prompts: List[str]) -> List[str]:
        """One reply per prompt, in order."""
        ...


def check_model_dir(path: str | None, key: str = "generate.model_path") -> Path:
    """A local HF model directory (config.json and safetensors), else one ConfigError line."""
    p = Path(path or "").expanduser()
    if not path or not (p / "config.json").is_file():
        raise ConfigError(key, f"expected an HF model directory with config.json (e.g. a run's final/), got {path!r}")
    if not any(p.glob("*.safetensors")):
        raise ConfigError(key, f"expected safetensors weights in {p}")
    return p


class LocalGenerator:
    """A causal LM directory on this rank's device, greedy and batched (left-padded by eval.generation)."""

    def __init__(self, cfg: GeneratorConfig, tokenizer: Any, device: Any):
        from ft_dist.config import ModelConfig
        from ft_dist.models import build_model

        path = str(check_model_dir(cfg.model_path))
        # safetensors only, trust_remote_code off (ModelConfig's default).
        self.model = build_model(ModelConfig(name_or_path=path, from_config=False), tokenizer, path=path).to(device)
        self.tokenizer, self.device, self.cfg = tokenizer, device, cfg
        self.name = f"local:{Path(path).resolve().name}"

    def complete(self, prompts: List[str]) -> List[str]:
        from ft_dist.eval.generation import generate

        outs = generate(
            self.model, self.tokenizer, prompts, self.cfg.max_new_tokens, self.cfg.batch_size, self.device, False
        )
        return [o.text for o in outs]


def openai_client(cfg: GeneratorConfig, max_retries: int | None = None, timeout: float | None = None) -> Any:
    """The official client for cfg.base_url; the key is read from the environment, never stored elsewhere."""
    import openai

    # Local servers (vLLM, transformers serve) take any key; the client insists on one.
    key = os.environ.get(cfg.api_key_env) or "none"
    return openai.OpenAI(
        base_url=cfg.base_url,
        api_key=key,
        timeout=cfg.timeout_s if timeout is None else timeout,
        max_retries=cfg.max_retries if max_retries is None else max_retries,
    )


def request(client: Any, cfg: GeneratorConfig, model: str, prompt: str, max_tokens: int) -> str:
    """One reply through `generate.api`: completions gets the prompt as it is, chat as one user message."""
    if cfg.api == "completions":
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=cfg.temperature)
        return r.choices[0].text or ""
    c = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=cfg.temperature
    )
    return c.choices[0].message.content or ""


def check_endpoint(cfg: GeneratorConfig) -> None:
    """Two quick requests, no retries: GET /models (5 s), so an unreachable endpoint is one line, not a hung run;
    then one 1-token request through `generate.api`, so a server that cannot serve it (a model without a chat
    template behind chat completions, a wrong model name) is one line too, not a run of replies counted malformed."""
    import openai

    try:
        client = openai_client(cfg, max_retries=0, timeout=min(cfg.timeout_s, 5.0))
        client.models.list()
        model = cfg.model or cfg.model_path or ""
        try:
            request(client.with_options(timeout=cfg.timeout_s), cfg, model, "Hi", max_tokens=1)
        except openai.AuthenticationError:
            raise
        except openai.APIStatusError as err:
            hint = " (a model without a chat template: use generate.api=completions)" if cfg.api == "chat" else ""
            raise ConfigError(
                "generate.api",
                f"{cfg.base_url} answered {err.status_code} to a 1-token {cfg.api} request for model {model!r}"
                f"{hint}; check generate.model and generate.api against what the server serves",
            ) from err
    except openai.APIConnectionError as err:
        raise ConfigError(
            "generate.base_url", f"cannot reach {cfg.base_url} ({type(err).__name__}); start the server or fix the URL"
        ) from err
    except openai.AuthenticationError as err:
        raise ConfigError(
            "generate.api_key_env", f"{cfg.base_url} refused the key in ${cfg.api_key_env} (401)"
        ) from err


class OpenAIGenerator:
    """Requests to an OpenAI-compatible server, `concurrency` at a time, each retried by the client with backoff."""

    def __init__(self, cfg: GeneratorConfig):
        self.cfg = cfg
        self.client = openai_client(cfg)
        self.model = cfg.model or cfg.model_path or ""
        self.name = f"openai:{self.model}"

    def _one(self, prompt: str) -> str:
        import openai

        try:
            return request(self.client, self.cfg, self.model, prompt, self.cfg.max_new_tokens)
        except openai.APIStatusError as err:  # a 4xx the client does not retry: this chunk's reply is unusable
            return f"<error {err.status_code}>"
        except openai.APIConnectionError as err:  # timeouts included, after the client's retries
            # The finished batches are on disk: stop in one line and let a re-run resume.
            raise UserError(
                f"config error: generate.base_url: {self.cfg.base_url} stopped answering ({type(err).__name__} "
                f"after {self.cfg.max_retries} retries); the chunks done are kept: re-run to resume"
            ) from err

    def complete(self, prompts: List[str]) -> List[str]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(self._one, prompts))
