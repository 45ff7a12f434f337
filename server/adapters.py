"""The adapter registry: fine-tuned LoRA adapters, found by name, each with a typed record.

``lorekeeper finetune export`` registers an adapter here; the llama.cpp generator, ``ask``, ``chat``
and the MCP server read it. An adapter is two files in the adapters folder of the data directory:

    NAME.json          the record (``AdapterRecord``): base model, training prompt, sampling ...
    NAME[.xxxxxxxx].gguf  the LoRA weights the record's ``adapter_file`` names

The record is the commit point of a registration: the new GGUF is written under a fresh name first,
then ``NAME.json`` is replaced atomically to point at it, then the old GGUF is removed. A crash at
any moment leaves either the old pair or the new pair, never a mix (an orphaned GGUF is removed by
the next registration). A bare ``NAME.gguf`` without a record (copied in by hand) is an adapter too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(ValueError):
    """An adapter name is invalid or its files cannot be used; the message says what to do."""


class UnknownAdapterError(AdapterError, LookupError):
    """A request named an adapter that is not registered; the message lists the known ones."""


def validate_name(name: str) -> str:
    """The one rule for adapter names: letters, digits, ``.``, ``_`` and ``-``, not starting with a dot."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith((".json", ".gguf")):
        raise AdapterError(
            f"adapter name {name!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64), "
            "such as 'notes-v1'"
        )
    return name


@dataclass
class AdapterRecord:
    """What lorekeeper knows about one registered adapter."""

    name: str
    adapter_file: str = ""  # the GGUF's file name inside the adapters folder
    base_model: str | None = None  # the GGUF the adapter was trained on (and runs on)
    base_sha256: str | None = None
    architecture: str | None = None
    rank: int | None = None
    alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    run_dir: str | None = None
    created: str | None = None
    # how it was trained, so it is asked the same way at answer time
    system_prompt: str | None = None  # the system turn of the training chats (None: there was none)
    chat_template: str | None = None  # the template the training chats were rendered with
    sampling: dict[str, float] = field(default_factory=dict)  # default temperature, top_p, ...
    description: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def base_path(self) -> Path | None:
        return Path(self.base_model) if self.base_model else None


class AdapterRegistry:
    """The adapters folder: list, read, register, remove, and match adapters with base models."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._sha_cache: dict[tuple[str, int, int], str] = {}

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        """Every registered adapter: those with a record, and bare ``NAME.gguf`` files."""
        if not self.directory.is_dir():
            return []
        found = set()
        referenced = set()
        ggufs = []
        for path in self.directory.iterdir():
            if path.suffix == ".json" and path.is_file() and _NAME.match(path.stem):
                record = self._load_json(path)
                if record is not None:
                    referenced.add(record.adapter_file)
                    if (self.directory / record.adapter_file).is_file():
                        found.add(path.stem)
            elif path.suffix == ".gguf" and path.is_file() and _NAME.match(path.stem):
                ggufs.append(path)
        for path in ggufs:
            if path.name not in referenced and not (self.directory / f"{path.stem}.json").exists():
                found.add(path.stem)
        return sorted(found)

    def _load_json(self, path: Path) -> AdapterRecord | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ignoring the adapter record %s: %s", path, exc)
            return None
        if not isinstance(data, dict):
            return None
        data.setdefault("name", path.stem)
        data.setdefault("adapter_file", f"{path.stem}.gguf")
        return AdapterRecord.from_dict(data)

    def read(self, name: str) -> AdapterRecord:
        """The record of adapter ``name``; ``UnknownAdapterError`` (listing the known ones) if none."""
        validate_name(name)
        record = None
        meta = self.directory / f"{name}.json"
        if meta.is_file():
            record = self._load_json(meta)
        if record is None and (self.directory / f"{name}.gguf").is_file():
            record = AdapterRecord(name=name, adapter_file=f"{name}.gguf")
        if record is None or not (self.directory / record.adapter_file).is_file():
            known = self.names()
            listing = ", ".join(known) if known else "none (train one with `lorekeeper finetune`)"
            raise UnknownAdapterError(
                f"unknown adapter {name!r}: it is not registered in {self.directory}; known adapters: {listing}"
            )
        return record

    def gguf_path(self, name: str) -> Path:
        return self.directory / self.read(name).adapter_file

    # ------------------------------------------------------------------ writing

    def register(self, name: str, adapter_gguf: Path, record: AdapterRecord) -> tuple[Path, Path]:
        """Install ``adapter_gguf`` as adapter ``name`` with ``record``, replacing any previous pair
        as one step (see the module docstring). Returns (gguf, record) paths."""
        validate_name(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        previous = self._current_file(name)
        new_file = f"{name}.{secrets.token_hex(4)}.gguf"
        target = self.directory / new_file
        tmp = self.directory / f".{new_file}.tmp"
        try:
            shutil.copyfile(adapter_gguf, tmp)
            _fsync(tmp)
            os.replace(tmp, target)
            record.name = name
            record.adapter_file = new_file
            if record.created is None:
                record.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            meta = self.directory / f"{name}.json"
            meta_tmp = self.directory / f".{name}.json.tmp"
            meta_tmp.write_text(json.dumps(record.to_dict(), indent=2) + "\n", encoding="utf-8")
            _fsync(meta_tmp)
            os.replace(meta_tmp, meta)  # the commit point
        except BaseException as exc:
            with contextlib.suppress(OSError):  # a read-only disk refuses the clean-up too
                for leftover in (tmp, self.directory / f".{name}.json.tmp"):
                    leftover.unlink(missing_ok=True)
                if self._current_file(name) != new_file:
                    target.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (
                errno.ENOSPC,
                errno.EDQUOT,
                errno.EROFS,
                errno.EFBIG,
            ):
                kept = (
                    f"adapter {name!r} as registered before is unchanged"
                    if previous
                    else "nothing was registered"
                )
                raise AdapterError(
                    f"cannot register adapter {name!r} in {self.directory}: {exc.strerror}; {kept}. Free "
                    "some space (or make the folder writable) and export again"
                ) from exc
            raise
        _fsync_dir(self.directory)
        self._remove_orphans(name, keep=new_file)
        if previous and previous != new_file:
            log.info("replaced the registered adapter %s (%s -> %s)", name, previous, new_file)
        return target, meta

    def remove(self, name: str) -> list[Path]:
        """Unregister adapter ``name``: its record first (the commit point), then its GGUF files."""
        self.read(name)
        removed = []
        meta = self.directory / f"{name}.json"
        if meta.exists():
            meta.unlink()
            removed.append(meta)
        removed += self._remove_orphans(name, keep=None)
        return removed

    def _current_file(self, name: str) -> str | None:
        meta = self.directory / f"{name}.json"
        if meta.is_file():
            record = self._load_json(meta)
            if record is not None:
                return record.adapter_file
        return f"{name}.gguf" if (self.directory / f"{name}.gguf").is_file() else None

    def _remove_orphans(self, name: str, keep: str | None) -> list[Path]:
        """GGUF files of ``name`` that no record points at (left by a replace or a crash), and the
        half-written temporary files of a registration that was killed."""
        gone = []
        escaped = re.escape(name)
        pattern = re.compile(
            rf"^({escaped}(\.[0-9a-f]{{8}})?\.gguf|\.{escaped}\.[0-9a-f]{{8}}\.gguf\.tmp|\.{escaped}\.json\.tmp)$"
        )
        for path in self.directory.iterdir():
            if pattern.match(path.name) and path.name != keep:
                path.unlink(missing_ok=True)
                gone.append(path)
        return gone

    # ------------------------------------------------------------------ base models

    def runs_on(self, name: str, model_path: Path) -> bool | None:
        """Whether ``model_path`` is the base adapter ``name`` was trained on (the same file, or a
        byte-identical copy by SHA-256); None when the record names no base."""
        base = self.read(name).base_path
        if base is None:
            return None
        if base.expanduser().resolve() == Path(model_path).resolve():
            return True
        wanted = self.read(name).base_sha256
        if not wanted:
            return False
        return wanted == self.sha256(Path(model_path))

    def sha256(self, path: Path) -> str:
        """SHA-256 of a model file, remembered per (path, size, mtime)."""
        from lorekeeper.plugins.models import file_sha256

        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._sha_cache:
            self._sha_cache[key] = file_sha256(path)
        return self._sha_cache[key]


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
