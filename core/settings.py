"""The one settings object: environment variables first, then `.env`, then these defaults."""

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_MODEL = "embedded"
PROJECT = Path(__file__).resolve().parent.parent


class KeyLimits(BaseModel):
    """One key's own limits (KEY_LIMITS), in place of the defaults for all keys."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, gt=0, description="Its share of free slots against other keys with work waiting.")
    max_queued_tasks: int | None = Field(None, ge=1)
    max_running: int | None = Field(None, ge=0)
    requests_per_minute: int | None = Field(None, ge=0)
    max_streams: int | None = Field(None, ge=1)
    max_kept_bytes: int | None = Field(None, ge=1)


class WebhookTarget(BaseModel):
    """Where one key's events go (KEY_WEBHOOKS), signed with its own secret."""

    model_config = ConfigDict(extra="forbid")

    url: str
    secret: SecretStr = Field(description="whsec_ and base64, as Standard Webhooks (and OpenAI) write it.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=(), env_ignore_empty=True)

    # Where things run.
    redis_url: str = "redis://localhost:6379/0"
    redis_sentinels: str = Field(
        "", description="Comma-separated host:port of Redis Sentinels; empty means REDIS_URL's server is the one Redis."
    )
    redis_sentinel_master: str = Field("mymaster", description="The name the Sentinels know the primary by.")
    redis_sentinel_password: SecretStr = Field(
        SecretStr(""), description="The Sentinels' own password (their requirepass); empty sends none."
    )
    redis_min_replicas: int = Field(
        0, ge=0, description="Replicas that must hold a new task before the API answers 202; 0 waits for none."
    )
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = Field("", description="Base URL clients use; empty means http://{api_host}:{api_port}.")
    log_level: str = "INFO"

    # The engine and the model.
    engine: Literal["llamacpp", "vllm", "transformers"] = Field(
        "llamacpp", description="What generates: llama.cpp's llama-server, vLLM's server, or transformers in-process."
    )
    model_id: str = Field(EMBEDDED_MODEL, description="'embedded' (SmolLM2-135M-Instruct), a Hub id or a local folder.")
    gguf_file: str = Field(
        "", description="ENGINE=llamacpp: the GGUF to serve, a path or a file in MODEL_ID's folder or Hub repo; "
        "empty for the embedded model."
    )
    hf_token: SecretStr | None = None
    quantization: Literal["auto", "nf4", "int8", "none"] = Field(
        "auto", description="transformers and vLLM: 'auto' is NF4 on CUDA and none on the CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_cache_dir: Path = Path(".cache/models")
    model_alias: str = Field("", description="Another name clients may give as `model` (the OpenAI API).")
    any_model_name: bool = Field(
        False, description="Answer any `model` name with the served model, as llama-server does (OpenAI and vLLM "
        "answer 404 for a name they do not serve).",
    )
    prompt_format: Literal["auto", "llama2", "template"] = "auto"
    context_window: int | None = Field(None, ge=16, description="Tokens; empty means the model config's value.")
    default_system_prompt: str = "You are a helpful assistant."

    # Generation defaults and limits.
    default_max_new_tokens: int = Field(256, ge=1)
    max_new_tokens_limit: int = Field(1024, ge=1)
    default_temperature: float = Field(0.6, ge=0)
    default_top_p: float = Field(0.9, gt=0, le=1)
    default_top_k: int = Field(50, ge=0)
    default_repetition_penalty: float = Field(1.0, gt=0)

    # Worker and streaming.
    worker_concurrency: int | None = Field(
        None, ge=1, description="Tasks one worker serves at once (the engine's slots); empty means 8 on the engine "
        "servers and 1 on transformers, where more than 1 batches with fewer sampling options."
    )
    kv_cache_tokens: int = Field(16_384, ge=256, description="KV cache shared by the tasks an engine batches.")
    engine_threads: int | None = Field(None, ge=1, description="CPU threads an engine server uses; empty means all cores.")
    engine_port: int | None = Field(None, ge=1, le=65535, description="Loopback port of the engine server; empty picks a free one.")
    engine_start_timeout_s: int = Field(600, ge=5, description="How long an engine server may take to start.")
    llama_server_bin: Path = Field(
        Path(".cache/llama.cpp/bin/llama-server"), description="llama.cpp's server binary (`make llama-server` builds it)."
    )
    llama_server_args: str = Field("", description="Extra llama-server arguments, e.g. '-ngl 99' for a CUDA build.")
    vllm_python: Path = Field(
        Path(".cache/vllm/bin/python"), description="The Python of vLLM's own environment (`make vllm` makes it)."
    )
    vllm_args: str = Field("", description="Extra `vllm serve` arguments.")

    @field_validator("llama_server_bin", "vllm_python")
    @classmethod
    def _in_the_project(cls, path: Path) -> Path:
        """What `make` built lives in this checkout, wherever a process is started from."""
        return path if path.is_absolute() else PROJECT / path
    max_batch_tokens: int = Field(512, ge=16, description="Most prompt tokens prefilled in one batched step.")
    stream_flush_tokens: int = Field(4, ge=1, description="Publish a chunk after this many new tokens...")
    stream_flush_ms: int = Field(100, ge=0, description="...or after this many milliseconds, whichever comes first.")
    result_ttl_s: int = Field(86_400, ge=60, description="How long chunks and results stay in Redis.")

    # Faults.
    task_time_limit_s: int = Field(600, ge=1, description="A generation running longer ends with finish_reason 'timeout'.")
    max_attempts: int = Field(3, ge=1, description="Deliveries of a task whose worker keeps dying before it fails.")
    worker_redis_retry_s: int = Field(
        30, ge=1, description="How long a running task waits for Redis to come back before it is requeued."
    )
    lease_s: float = Field(
        8.0, ge=1, description="A running task's lease: another worker takes it over once this passes unrenewed."
    )
    lease_renew_s: float = Field(2.0, gt=0, description="How often a worker renews the leases of its tasks.")
    generation_stall_s: float = Field(
        120.0, gt=0, description="A generation with no new token for this long (an engine stuck in one step) "
        "stops being renewed, and another worker takes the task over."
    )

    @model_validator(mode="after")
    def _renewed_within_the_lease(self) -> "Settings":
        if self.lease_renew_s >= self.lease_s:
            raise ValueError(f"LEASE_RENEW_S ({self.lease_renew_s}) must be shorter than LEASE_S ({self.lease_s})")
        return self

    @model_validator(mode="after")
    def _webhooks_signed(self) -> "Settings":
        targets = [("WEBHOOK_SECRET", self.webhook_secret)] if self.webhook_url else []
        targets += [(f"KEY_WEBHOOKS[{name}].secret", target.secret) for name, target in self.key_webhooks.items()]
        for name, secret in targets:
            if not secret.get_secret_value().startswith("whsec_"):
                raise ValueError(f"{name} must be a Standard Webhooks secret, whsec_ and base64")
        return self

    @model_validator(mode="after")
    def _sentinels_readable(self) -> "Settings":
        self.sentinel_addresses  # an entry that is not host:port fails at startup, not at the first connection
        return self

    @property
    def visibility_timeout_s(self) -> int:
        """How long Redis waits for a delivered task's ack before handing it to another worker.

        The last resort behind the leases, for a task whose lease could not be reclaimed (its
        request was lost with Redis's unsynced writes): it must exceed the longest generation.
        """
        return 2 * self.task_time_limit_s + 10

    # Limits and access (the API), and the client's key.
    max_queued_tasks: int = Field(
        1000, ge=1, description="Tasks one key may have waiting (all callers together without API_KEYS); more answer 429."
    )
    max_running_per_key: int = Field(0, ge=0, description="Tasks of one key that run at once; 0 sets no cap.")
    requests_per_minute: int = Field(0, ge=0, description="Generation requests one key may send a minute; 0 sets no cap.")
    max_streams_per_key: int = Field(100, ge=1, description="Streams one key may hold open at once; more answer 429.")
    max_kept_bytes_per_key: int = Field(
        268_435_456, ge=1, description="Bytes of requests one key may have kept within RESULT_TTL_S; more answer 429."
    )
    key_limits: dict[str, KeyLimits] = Field(
        {}, description='Per key name, JSON: {"team-a": {"weight": 3, "max_running": 4}}; unset fields take the defaults.'
    )
    interactive_slots: int = Field(
        1, ge=0, description="Slots background work leaves free while no interactive request waits (if the fleet has more).",
    )
    background_share: float = Field(
        0.1, gt=0, lt=1, description="Share of free slots that background work gets while interactive work waits."
    )
    background_active_share: float = Field(
        0.125, gt=0, le=1, description="Share of the slots background work may hold (at least one) while interactive "
        "work is active: for INTERACTIVE_ACTIVE_S after an interactive request starts. 1 lets it hold all.",
    )
    interactive_active_s: float = Field(
        30.0, ge=0, description="How long interactive work counts as active after an interactive request starts.",
    )
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies answer 413.")
    file_max_bytes: int = Field(33_554_432, ge=1024, description="Largest file one upload may hold; larger answer 413.")
    webhook_url: str = Field("", description="Where events (responses and batches ending) are sent; empty sends none.")
    webhook_secret: SecretStr = Field(SecretStr(""), description="WEBHOOK_URL's signing secret, whsec_ and base64.")
    key_webhooks: dict[str, WebhookTarget] = Field(
        {}, description='Per key name, JSON: {"team-a": {"url": "...", "secret": "whsec_..."}}; wins over WEBHOOK_URL.'
    )
    webhook_retry_base_s: float = Field(5.0, gt=0, description="The first retry's wait; each next one doubles it.")
    webhook_retry_for_s: float = Field(259_200, gt=0, description="How long an undelivered event is retried (72 h).")
    batch_window_s: int = Field(
        86_400, ge=1, description="How long a batch's completion_window ('24h') lasts; what is unfinished then expires."
    )
    batch_max_in_flight: int = Field(64, ge=1, description="Lines of one batch queued or running at once.")
    files_bytes_per_key: int = Field(
        268_435_456, ge=1024, description="Bytes of files one key may keep (all callers together without API_KEYS); more answer 413."
    )
    max_prompt_chars: int = Field(100_000, ge=1, description="Prompt (or message contents) plus system prompt.")
    max_messages: int = Field(256, ge=1, description="Most messages one request may hold; more answers 422.")
    api_keys: SecretStr = Field(
        SecretStr(""), description="Comma-separated keys the API accepts, each as name:key or a bare key; empty means open."
    )
    api_key: SecretStr | None = Field(None, description="The key run_client.py sends.")
    public_docs: bool = Field(True, description="Serve the OpenAPI docs (/docs, /openapi.json) to anyone.")
    cors_origins: str = Field("", description="Comma-separated origins browsers may call from; empty means none.")
    allow_open_api: bool = Field(
        False, description="Let the API listen beyond loopback with no API_KEYS; without it, it refuses to start."
    )

    @property
    def worker_slots(self) -> int:
        """WORKER_CONCURRENCY, or the engine's default: the servers batch 8; transformers runs 1, with every option."""
        if self.worker_concurrency is not None:
            return self.worker_concurrency
        return 1 if self.engine == "transformers" else 8

    def usable_context(self, model_window: int) -> int:
        """Tokens one request may use: batched requests share the KV cache, and a request larger
        than the whole cache could never be served."""
        if self.engine == "transformers" and self.worker_slots == 1:
            return model_window
        return min(model_window, self.kv_cache_tokens)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs. With any, every client asks them for the primary, and
        REDIS_URL gives only the password and the database number (its host and port are ignored)."""
        addresses = []
        for item in _split(self.redis_sentinels):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"REDIS_SENTINELS: {item!r} is not host:port")
            addresses.append((host.strip("[]"), int(port)))
        return addresses

    @property
    def base_url(self) -> str:
        return self.api_url or f"http://{self.api_host}:{self.api_port}"

    @property
    def accepted_api_keys(self) -> list[str]:
        """A comma-separated string in the environment reads better than the JSON list pydantic expects."""
        return list(self.api_key_names)

    @property
    def api_key_names(self) -> dict[str, str]:
        return api_key_names(self.api_keys.get_secret_value())

    @property
    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)


def api_key_names(api_keys: str) -> dict[str, str]:
    """API_KEYS as each key and the name its lane and metrics go by: the part before its first ':',
    or, for a bare key, a short hash of it (so that no secret is ever a label)."""
    names = {}
    for item in _split(api_keys):
        name, _, key = item.partition(":")
        if not key or not name:
            name, key = f"key-{hashlib.sha256(item.encode()).hexdigest()[:8]}", item
        names[key] = name
    return names


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
