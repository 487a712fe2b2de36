"""Server configuration: one dataclass, built once from the command line and the environment
(`toolkit.server_flags` holds the flags and their environment variables)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.environment import LISTEN_FD_ENV
from toolkit.server_flags import build_parser
from toolkit.service.model_files import ModelFiles, read_model_files
from toolkit.service.model_spec import EmbeddingSpec
from toolkit.service.validation import RequestLimits
from toolkit.version import __version__


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = None
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    is_embedding: bool = True
    is_reranker: bool = False
    dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"
    context_length: int | None = None
    api_key: str | None = None
    api_key_file: str | None = None
    log_level: str = "info"
    max_batch_tokens: int | None = None
    max_queued_tokens: int = 1_048_576
    max_queued_inputs: int = 65_536
    max_inputs_per_request: int = 2048
    max_tokens_per_request: int = 300_000
    request_timeout: float | None = None
    max_request_bytes: int = 128 * 1024 * 1024
    max_connections: int | None = None
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    drain_timeout: float = 30.0
    cors_allow_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    pooling: str | None = None
    normalize: bool | None = None
    default_prompt_name: str | None = None
    truncate: bool = False
    truncation_side: str = "right"
    warmup: bool = True
    compile: bool | None = None
    cuda_graphs: bool = True
    exact_gelu: bool = False
    http_workers: int = 0
    dp_size: int = 1
    device_ids: tuple[int, ...] = ()
    cpu_workers: int | None = None
    listen_fd: int | None = None

    @property
    def model_name(self) -> str:
        """The id clients must send as `model` (and that /v1/models lists)."""
        return self.served_model_name or self.model_path or DEFAULT_MODEL_NAME

    @classmethod
    def from_cli(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerArgs:
        """Parse the command line; `environ` (default os.environ) is the only environment read."""
        environ = os.environ if environ is None else environ
        namespace = build_parser(environ).parse_args(argv)
        values = vars(namespace)
        fd = environ.get(LISTEN_FD_ENV)
        values["listen_fd"] = int(fd) if fd and fd.isdigit() else None
        if values["api_key_file"] is not None:
            values["api_key"] = _read_key(values["api_key"], values["api_key_file"])
        return cls(**values)

    @classmethod
    def from_options(cls, caller: str, **options: Any) -> ServerArgs:
        """ServerArgs from keyword options (an Engine's, a Ray replica's); an unknown name is a
        TypeError that lists the known ones."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown {caller} options {unknown}; the options are ServerArgs' fields: {sorted(known)}"
            )
        if options.get("api_key_file") is not None:
            options["api_key"] = _read_key(options.get("api_key"), options["api_key_file"])
        return cls(**options)

    def model_files(self) -> ModelFiles:
        """Find the model and read its spec and tokenizer, with this server's overrides."""
        return read_model_files(
            self.model_path, self.tokenizer_path, self.pooling, self.normalize, self.is_reranker
        )

    def request_limits(self, spec: EmbeddingSpec, context_length: int, vocab_size: int) -> RequestLimits:
        """What the service enforces per request, for a model of `context_length` positions and
        `vocab_size` token ids."""
        return RequestLimits(
            context_length=context_length,
            vocab_size=vocab_size,
            max_inputs_per_request=self.max_inputs_per_request,
            truncate=self.truncate,
            truncation_side=self.truncation_side,
            default_prompt_name=self.default_prompt_name or spec.default_prompt_name,
            max_tokens_per_request=self.max_tokens_per_request,
            request_timeout=self.request_timeout,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def banner(self) -> str:
        """The start-up line: what is served where, and the settings changed from the defaults."""
        changed = [
            f"{field.name}={'***' if field.name == 'api_key' else getattr(self, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.name not in ("model_path", "host", "port", "listen_fd")
            and getattr(self, field.name) != field.default
        ]
        settings = f"; settings: {', '.join(changed)}" if changed else ""
        return f"toolkit {__version__} starting: {self.model_name} at {self.url}{settings}"

    def describe(self) -> str:
        """`ServerArgs(...)` with the api key masked, for the one start-up log line."""
        shown = dataclasses.replace(self, api_key="***" if self.api_key else None)
        return repr(shown)


DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _read_key(given: str | None, path: str) -> str:
    if given is not None:
        raise SystemExit("error: pass the api key with --api-key or --api-key-file, not both")
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SystemExit(f"error: cannot read --api-key-file {path}: {exc.strerror}") from None
    if not key:
        raise SystemExit(f"error: --api-key-file {path} is empty")
    return key
