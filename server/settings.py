"""Every lorekeeper setting and its default, in one place, resolved once.

Precedence, highest first: a command-line flag, an environment variable (``LOREKEEPER_`` + the
key in upper case, e.g. ``LOREKEEPER_N_CTX``), the config file ``config.toml`` in the data
directory (``lorekeeper config set KEY VALUE`` writes it), then the default below. The data
directory itself comes only from ``LOREKEEPER_HOME`` (the config file lives inside it) or the
platform's user data directory.

A ``Settings`` object is made once per command or server (``Settings.load``) and passed to the
store, the indexer, the watcher, the plugins and the servers; nothing reads the environment for a
setting anywhere else, and nothing writes it. ``settings.sources`` says where each value came from
(``lorekeeper config show`` prints it).

This is also the one module that touches ``os.environ``: besides reading settings it sets the few
variables third-party libraries read at import (``process_environment``).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import platformdirs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "LOREKEEPER_"
HOME_ENV = "LOREKEEPER_HOME"
CONFIG_FILE = "config.toml"

GENERATOR_CHOICES = ("llamacpp", "openai")
REPACK_CHOICES = ("auto", "on", "off")
SEARCH_MODES = ("hybrid", "vector", "keyword")
EMBEDDER_RUNTIMES = ("auto", "torch", "onnx")
OPENAI_ADAPTER_MODES = ("none", "llama-server", "model-name")


def is_database_url(target: object) -> bool:
    """Whether ``target`` names a PostgreSQL database (``postgresql://...`` or ``postgres://...``)."""
    return isinstance(target, str) and target.strip().lower().startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """A database URL without its password, for messages, ``status`` and ``config show``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "postgresql://(unreadable URL)"
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else (f"{k}={v}" if sep else k)
        for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item)
    )  # libpq also takes ?password=...
    parts = parts._replace(query=query)
    if password:
        user, host = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}")
    return urlunsplit(parts)


class SettingsError(ValueError):
    """A setting has a value it cannot take; the message names the key, where it came from, and
    what it accepts."""


def _s(default: Any, help: str, *, kind: type | str, choices: tuple[str, ...] = (), lo: float | None = None,
       secret: bool = False) -> Any:  # fmt: skip
    meta = {"help": help, "kind": kind, "choices": choices, "lo": lo, "secret": secret}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """lorekeeper's settings. Field order is the order ``config show`` prints them in."""

    # --- the index ---------------------------------------------------------------------------
    db: str | None = _s(
        None,
        "The index file (default: index.db in the data directory), or a postgresql://USER:PASSWORD@HOST/DB "
        "URL for an index on PostgreSQL with pgvector (the postgres extra).",
        kind="path",
    )
    max_file_mb: float = _s(
        50.0, "Files larger than this many megabytes are recorded as skipped.", kind=float, lo=0.001
    )
    max_chars_per_file: int = _s(
        5_000_000,
        "A file whose extracted text is longer than this many characters fails with that reason (it "
        "would hold the indexer and memory for minutes); the rest of the folder indexes.",
        kind=int,
        lo=1000,
    )
    max_chunks_per_file: int = _s(
        10_000, "A file that makes more chunks than this fails with that reason.", kind=int, lo=10
    )
    chunk_tokens: int | None = _s(
        None,
        "Most embedder tokens in a chunk, its heading included (default: the embedder's whole window, 254 "
        "for all-MiniLM-L6-v2; larger values are capped at it). Smaller chunks point answers at fewer lines. "
        "Files are re-chunked at the new size when next looked at: run `lorekeeper reindex` (which "
        "re-embeds them); `lorekeeper eval retrieval --chunk-sizes` measures sizes on a sample first.",
        kind=int,
        lo=16,
    )
    embedder: str | None = _s(
        None,
        "Embedder model id. Default: the one the index was built with (the built-in all-MiniLM-L6-v2 for "
        "a new index); naming another re-embeds the index.",
        kind=str,
    )
    device: str = _s("cpu", "torch device for the embedder (cpu, cuda, mps).", kind=str)
    embedder_runtime: str = _s(
        "auto",
        "How the built-in embedder runs: auto uses onnxruntime on the CPU (no torch import; the graph is "
        "exported once into the cache and checked against torch) and torch otherwise; torch or onnx force one.",
        kind=str,
        choices=EMBEDDER_RUNTIMES,
    )
    cache: str | None = _s(
        None,
        "Folder for derived files that can always be made again (exported embedders, converted models); "
        "default: cache in the data directory.",
        kind="path",
    )
    polling: bool = _s(False, "Poll folders for changes instead of native file events.", kind=bool)
    debounce: float = _s(
        0.2, "Seconds the watcher waits for a file to settle before indexing it.", kind=float, lo=0.0
    )
    load_plugins: list[str] | None = _s(
        None,
        "Allow-list of third-party plugins (comma-separated); empty loads none; unset loads all.",
        kind=list,
    )
    # --- search ----------------------------------------------------------------------------
    k: int = _s(8, "Passages retrieved per search or answer.", kind=int, lo=1)
    search_mode: str = _s("hybrid", "Default search mode.", kind=str, choices=SEARCH_MODES)
    vector_weight: float = _s(
        1.0, "Weight of the meaning (vector) list in hybrid fusion.", kind=float, lo=0.0
    )
    keyword_weight: float = _s(1.0, "Weight of the keyword (BM25) list in hybrid fusion.", kind=float, lo=0.0)
    rrf_k: int = _s(60, "Reciprocal rank fusion constant: higher flattens the rank curve.", kind=int, lo=1)
    # --- answers ---------------------------------------------------------------------------
    generator: str = _s("llamacpp", "Generator plugin: llamacpp (local GGUF) or openai (any OpenAI-compatible server).",
                        kind=str)  # fmt: skip
    model: str | None = _s(
        None, "A GGUF model for llamacpp (default: the embedded SmolLM2-135M-Instruct).", kind="path"
    )
    max_tokens: int = _s(256, "Longest answer, in tokens.", kind=int, lo=1)
    temperature: float = _s(0.2, "Sampling temperature (0 = deterministic).", kind=float, lo=0.0)
    top_p: float = _s(
        0.9, "Nucleus sampling: keep the most likely tokens up to this probability mass.", kind=float, lo=0.0
    )
    min_p: float = _s(
        0.05, "Drop tokens less likely than this share of the most likely one.", kind=float, lo=0.0
    )
    repeat_penalty: float = _s(
        1.15, "Penalty on tokens already in the recent output (1 = none).", kind=float, lo=0.0
    )
    context_sentences: int = _s(
        6,
        "Show the model only this many sentences of the retrieved passages, those closest to the "
        "question (0 = whole passages). Small models answer better from a short focused context.",
        kind=int,
        lo=0,
    )
    extractive_fallback: bool = _s(
        True,
        "When no sentence of a generated answer is supported by the sources, answer with the best "
        "supporting sentence quoted from them instead.",
        kind=bool,
    )
    # --- llama.cpp -------------------------------------------------------------------------
    n_ctx: int = _s(4096, "llama.cpp context window in tokens.", kind=int, lo=64)
    threads: int | None = _s(None, "llama.cpp CPU threads (default: llama.cpp's own choice).", kind=int, lo=1)
    gpu_layers: int = _s(-1, "Layers offloaded to a GPU build of llama.cpp (-1 = all).", kind=int, lo=-1)
    llama_repack: str = _s(
        "auto",
        "llama.cpp weight repacking: auto turns it off on Intel AMX CPUs, where it crashes (llama.cpp "
        "issue 20824); on or off force it.",
        kind=str,
        choices=REPACK_CHOICES,
    )
    # --- the openai generator ----------------------------------------------------------------
    openai_base_url: str | None = _s(
        None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1.", kind=str
    )
    openai_model: str = _s("default", "Model name the OpenAI-compatible server expects.", kind=str)
    openai_api_key: str | None = _s(
        None, "Bearer key for the OpenAI-compatible server.", kind=str, secret=True
    )
    openai_context: int = _s(8192, "Context window of the remote model, in tokens.", kind=int, lo=64)
    openai_timeout: float = _s(120.0, "Seconds to wait for the remote server.", kind=float, lo=0.1)
    openai_adapters: str = _s(
        "none",
        "How the OpenAI-compatible server takes a LoRA adapter per request: llama-server (llama.cpp's "
        "server, adapters loaded with --lora, chosen by the request's lora field), model-name (vLLM "
        "--lora-modules, llama-cpp-python's server: the adapter is served as a model of its name) or none.",
        kind=str,
        choices=OPENAI_ADAPTER_MODES,
    )
    # --- the MCP server ----------------------------------------------------------------------
    token: str | None = _s(None, "Bearer token for serve --http (default: generated into the data dir).",
                           kind=str, secret=True)  # fmt: skip
    http_port: int = _s(8765, "Port of serve --http.", kind=int, lo=1)
    reuse_server: bool = _s(
        True,
        "search and ask use a running `serve --http` for the same index (its models are loaded) when it "
        "answers on http_port within 0.2 s; otherwise they run in their own process.",
        kind=bool,
    )

    # where each value came from: "default", "config.toml", "env LOREKEEPER_X", "flag"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    home: Path = field(default_factory=lambda: _default_home(), compare=False)

    def __post_init__(self) -> None:
        for f in setting_fields():
            _check(f, getattr(self, f.name), self.sources.get(f.name, "default"))

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        home: Path | str | None = None,
    ) -> Settings:
        """Resolve every setting: ``flags`` (None values ignored), then the environment, then
        ``config.toml``, then the default."""
        env = os.environ if environ is None else environ
        home_path = Path(home).expanduser() if home is not None else _default_home(env)
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        from_file = read_config_file(home_path / CONFIG_FILE)
        by_name = {f.name: f for f in setting_fields()}
        for key, raw in from_file.items():
            if key not in by_name:
                raise SettingsError(
                    f"{home_path / CONFIG_FILE}: unknown key {key!r}; `lorekeeper config show` lists the keys"
                )
            values[key] = _parse(by_name[key], raw, CONFIG_FILE)
            sources[key] = CONFIG_FILE
        for f in setting_fields():
            name = env_name(f.name)
            if name in env:
                values[f.name] = _parse(f, env[name], f"env {name}")
                sources[f.name] = f"env {name}"
        for key, value in (flags or {}).items():
            if value is None:
                continue
            if key not in by_name:
                raise SettingsError(f"unknown setting {key!r}")
            values[key] = _parse(by_name[key], value, "flag")
            sources[key] = "flag"
        for f in setting_fields():
            sources.setdefault(f.name, "default")
        return cls(**values, sources=sources, home=home_path)

    def with_flags(self, **flags: Any) -> Settings:
        """A copy with command-line values on top (None values ignored)."""
        changed = {}
        sources = dict(self.sources)
        by_name = {f.name: f for f in setting_fields()}
        for key, value in flags.items():
            if value is None:
                continue
            if key not in by_name:
                raise SettingsError(f"unknown setting {key!r}")
            changed[key] = _parse(by_name[key], value, "flag")
            sources[key] = "flag"
        return replace(self, **changed, sources=sources) if changed else self

    # ------------------------------------------------------------------ where things live

    @property
    def data_dir(self) -> Path:
        """The data directory, created (mode 0700: it holds the text of private files) on first use."""
        return private_dir(self.home)

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def db_path(self) -> Path:
        """The index file; for an index on PostgreSQL (``db_url``), a file named after the database
        in the data directory, where per-index reports and evaluation files go."""
        if self.db_url:
            name = urlsplit(self.db_url).path.strip("/") or "postgres"
            return self.data_dir / f"{name}.postgres"
        return Path(self.db).expanduser() if self.db else self.data_dir / "index.db"

    @property
    def db_url(self) -> str | None:
        """The PostgreSQL URL when the index lives on a server (``db = postgresql://...``), else None."""
        return self.db.strip() if is_database_url(self.db) else None

    @property
    def db_target(self) -> Path | str:
        """What to open the index from (``stores.open_store``): the PostgreSQL URL or the file."""
        return self.db_url or self.db_path

    @property
    def adapters_dir(self) -> Path:
        """Where exported LoRA adapters (``NAME.gguf`` plus ``NAME.json``) are registered."""
        return private_dir(self.data_dir / "adapters")

    @property
    def runs_dir(self) -> Path:
        """Where fine-tuning runs keep their config, checkpoints, metrics and plots."""
        return private_dir(self.data_dir / "runs")

    @property
    def cache_dir(self) -> Path:
        """Derived files that can always be made again (converted base models, exported embedders)."""
        return private_dir(Path(self.cache).expanduser() if self.cache else self.data_dir / "cache")

    @property
    def token_path(self) -> Path:
        """The bearer token of ``lorekeeper serve --http`` (mode 0600)."""
        return self.data_dir / "token"

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def model_path(self) -> Path | None:
        return Path(self.model).expanduser() if self.model else None

    def describe(self, as_text: bool = True) -> list[tuple[str, Any, str, str]]:
        """(key, value, source, help) for every setting, secrets masked; values as text for people,
        or as they are (for JSON) with ``as_text=False``."""
        rows = []
        for f in setting_fields():
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = "***"
            elif is_database_url(value):
                value = redact_url(value)
            if as_text:
                value = "(unset)" if value is None else _format(value)
            rows.append((f.name, value, self.sources.get(f.name, "default"), f.metadata["help"]))
        return rows


# ---------------------------------------------------------------------------- helpers


def setting_fields() -> list[Any]:
    """The settable fields (not ``sources``/``home``)."""
    return [f for f in fields(Settings) if "kind" in f.metadata]


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def default_value(key: str) -> Any:
    for f in setting_fields():
        if f.name == key:
            return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
    raise SettingsError(f"unknown setting {key!r}; `lorekeeper config show` lists the keys")


def _default_home(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    override = env.get(HOME_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_data_dir("lorekeeper"))


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and return it."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def tighten(path: Path, mode: int) -> bool:
    """Set ``path``'s permission bits to ``mode`` if others could read more; True if it changed."""
    if os.name != "posix":
        return False
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if current & ~mode & 0o077:
        path.chmod(current & mode)
        return True
    return False


def _parse(f: Any, raw: Any, where: str) -> Any:
    kind = f.metadata["kind"]
    key = f.name
    try:
        if raw is None:
            return None
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, str) and raw.strip() == "":
                return None if f.default is None else f.default
            return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
            if value != value:  # NaN
                raise ValueError
            return value
        if kind is list:
            if isinstance(raw, (list, tuple)):
                return [str(x).strip() for x in raw if str(x).strip()]
            return [part.strip() for part in str(raw).split(",") if part.strip()]
        if kind == "path":
            text = str(raw).strip()
            if key == "db" and is_database_url(text):
                return text  # a PostgreSQL URL, not a file
            return str(Path(text).expanduser()) if text else None
        text = str(raw).strip()
        return text if text else (None if f.default is None else f.default)
    except (TypeError, ValueError):
        what = {
            bool: "true or false",
            int: "a whole number",
            float: "a number",
            list: "a comma-separated list",
        }
        raise SettingsError(f"{key}={raw!r} ({where}): {key} must be {what.get(kind, 'text')}") from None


def _check(f: Any, value: Any, where: str) -> None:
    if value is None:
        return
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise SettingsError(f"{f.name}={value!r} ({where}): use one of {', '.join(meta['choices'])}")
    if meta["lo"] is not None and isinstance(value, (int, float)) and value < meta["lo"]:
        raise SettingsError(f"{f.name}={value!r} ({where}): must be at least {meta['lo']:g}")


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


# ---------------------------------------------------------------------------- the config file


def read_config_file(path: Path) -> dict[str, Any]:
    """The key/value pairs of ``config.toml`` ({} when there is none)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{path} cannot be read: {exc}; fix it or delete it") from exc
    if not isinstance(data, dict):
        return {}
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config_value(home: Path, key: str, value: Any | None) -> Path:
    """Set ``key`` in ``config.toml`` (``value`` None removes it), validating it first; the file is
    rewritten atomically, keys in setting order."""
    by_name = {f.name: f for f in setting_fields()}
    if key not in by_name:
        raise SettingsError(f"unknown setting {key!r}; `lorekeeper config show` lists the keys")
    path = private_dir(home) / CONFIG_FILE
    current = read_config_file(path)
    if value is None:
        current.pop(key, None)
    else:
        parsed = _parse(by_name[key], value, CONFIG_FILE)
        _check(by_name[key], parsed, CONFIG_FILE)
        current[key] = parsed
    lines = ["# lorekeeper settings; `lorekeeper config show` lists every key and where its value comes from"]
    for f in setting_fields():
        if f.name in current and current[f.name] is not None:
            lines.append(f"{f.name} = {_toml_value(current[f.name])}")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- process environment


def process_environment() -> None:
    """Variables third-party libraries read at import, set before they load (a user's own values win).

    - ``OMP_WAIT_POLICY=PASSIVE``: the embedder (torch) and llama.cpp both use OpenMP; busy-waiting
      idle threads turn a 20 ms query embedding into ~700 ms on a machine doing anything else.
    - ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: models ship inside packages; nothing is fetched.
    - ``TOKENIZERS_PARALLELISM=false``: no fork warnings from the tokenizers library.
    """
    for name, value in (
        ("OMP_WAIT_POLICY", "PASSIVE"),
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)


def home_from_environment() -> str | None:
    """``LOREKEEPER_HOME`` as the user set it (an MCP client config must pass it on), else None."""
    return os.environ.get(HOME_ENV) or None
