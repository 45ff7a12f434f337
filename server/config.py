"""Where lorekeeper keeps its state, and the settings every part shares.

All state lives under one data directory: the platform's user data dir (platformdirs), or
``LOREKEEPER_HOME`` when set. Inside it: ``index.db`` (the SQLite index), ``adapters/`` (LoRA
adapters as GGUF, found by name), ``runs/`` (fine-tuning runs) and ``token`` (the HTTP bearer token).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

HOME_ENV = "LOREKEEPER_HOME"
DB_ENV = "LOREKEEPER_DB"
MAX_FILE_MB_ENV = "LOREKEEPER_MAX_FILE_MB"

DEFAULT_MAX_FILE_MB = 50.0
DEFAULT_HTTP_PORT = 8765  # `lorekeeper serve --http`


def data_dir() -> Path:
    """The data directory, created on first use."""
    override = os.environ.get(HOME_ENV)
    path = Path(override).expanduser() if override else Path(platformdirs.user_data_dir("lorekeeper"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_db_path() -> Path:
    """``LOREKEEPER_DB`` if set, else ``index.db`` in the data directory."""
    override = os.environ.get(DB_ENV)
    return Path(override).expanduser() if override else data_dir() / "index.db"


def adapters_dir() -> Path:
    """Where exported LoRA adapters (``NAME.gguf`` plus ``NAME.json``) are registered."""
    path = data_dir() / "adapters"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Where fine-tuning runs keep their config, checkpoints, metrics and plots."""
    path = data_dir() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def token_path() -> Path:
    """The bearer token of ``lorekeeper serve --http`` (mode 0600)."""
    return data_dir() / "token"


def max_file_bytes() -> int:
    """Files larger than this are recorded as skipped rather than read (``LOREKEEPER_MAX_FILE_MB``)."""
    raw = os.environ.get(MAX_FILE_MB_ENV)
    try:
        mb = float(raw) if raw else DEFAULT_MAX_FILE_MB
    except ValueError as exc:
        raise ValueError(f"{MAX_FILE_MB_ENV}={raw!r} is not a number of megabytes") from exc
    return int(mb * 1024 * 1024)
