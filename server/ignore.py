"""Which files under a watched root are left out of the index.

Three sources, in order: sensible defaults (version control folders, virtual environments,
dependency and cache folders, editor temporary files, binaries, files that usually hold secrets,
lorekeeper's own files), then every ``.gitignore`` and ``.lorekeeperignore`` from the root down to
the file's folder, each applying to paths below its own folder as git does. ``reason`` says which
rule left a path out, for ``lorekeeper files --ignored``.

Compressed single files (``.gz``) are not ignored: the indexer reads the text inside. Archives
(``.tar.gz``, ``.zip``) are.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pathspec

IGNORE_FILES = (".gitignore", ".lorekeeperignore")

DEFAULT_PATTERNS = [
    # version control and tool state
    ".git/", ".hg/", ".svn/", ".bzr/", "_darcs/",
    # environments, dependencies and caches
    ".venv/", "venv/", "node_modules/", "__pycache__/", ".mypy_cache/", ".pytest_cache/",
    ".ruff_cache/", ".tox/", ".nox/", ".cache/", ".gradle/", "target/debug/", "target/release/",
    ".ipynb_checkpoints/", ".Trash*/", "$RECYCLE.BIN/",
    # editors' temporary and swap files, written around every save
    "*.swp", "*.swo", "*.swx", "*~", ".#*", "#*#", "*.tmp", "*.temp", "*.part", "*.crdownload",
    ".~lock.*#", "~$*", "4913", ".DS_Store", "Thumbs.db", "desktop.ini",
    # keys and credentials: a folder of notes may hold them, an index served to AI assistants must not
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "*.kdbx", "id_rsa*", "id_dsa*", "id_ecdsa*",
    "id_ed25519*", ".netrc", ".pgpass", ".git-credentials", ".htpasswd",
    # the rules themselves are configuration, not documents
    ".gitignore", ".lorekeeperignore",
    # binaries and media
    "*.pyc", "*.pyo", "*.o", "*.a", "*.so", "*.dylib", "*.dll", "*.exe", "*.class", "*.jar",
    "*.zip", "*.tar", "*.tar.gz", "*.tgz", "*.bz2", "*.xz", "*.zst", "*.7z", "*.rar", "*.iso", "*.dmg",
    "*.png", "*.jpg", "*.jpeg", "*.gif", "*.bmp", "*.ico", "*.webp", "*.tiff", "*.heic",
    "*.mp3", "*.wav", "*.flac", "*.ogg", "*.mp4", "*.mov", "*.avi", "*.mkv", "*.webm",
    "*.woff", "*.woff2", "*.ttf", "*.otf", "*.eot",
    # models and databases (lorekeeper's own index among them)
    "*.gguf", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.onnx", "*.npy", "*.npz", "*.pkl",
    "*.db", "*.db-wal", "*.db-shm", "*.db-journal", "*.sqlite", "*.sqlite3", "*.sqlite-wal", "*.sqlite-shm",
]  # fmt: skip


class IgnoreRules:
    """Ignore decisions for one root. Ignore files are read once and re-read after ``invalidate``."""

    def __init__(self, root: Path | str, extra_patterns: list[str] | None = None) -> None:
        self.root = str(root).rstrip(os.sep) or os.sep
        self._defaults = pathspec.GitIgnoreSpec.from_lines(DEFAULT_PATTERNS + list(extra_patterns or []))
        self._specs: dict[str, pathspec.PathSpec | None] = {}
        self._lock = threading.Lock()

    def _spec_for(self, directory: str) -> pathspec.PathSpec | None:
        with self._lock:
            if directory in self._specs:
                return self._specs[directory]
        lines: list[str] = []
        for name in IGNORE_FILES:
            try:
                with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as handle:
                    lines.extend(handle.read().splitlines())
            except OSError:
                continue
        spec = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None
        with self._lock:
            self._specs[directory] = spec
        return spec

    def invalidate(self, directory: str | None = None) -> None:
        """Forget what was read from ignore files (in ``directory``, or everywhere)."""
        with self._lock:
            if directory is None:
                self._specs.clear()
            else:
                self._specs.pop(directory.rstrip(os.sep), None)

    def is_ignored(self, path: str | Path, is_dir: bool = False) -> bool:
        return self.reason(path, is_dir) is not None

    def reason(self, path: str | Path, is_dir: bool = False) -> str | None:
        """Why ``path`` is left out (the rule and where it comes from), or None when it is not."""
        found = self.match(path, is_dir)
        return None if found is None else found[0]

    def match(self, path: str | Path, is_dir: bool = False) -> tuple[str, str | None] | None:
        """(why ``path`` is left out, the ignored folder it lies in or None when the rule names
        the path itself), or None when it is not left out."""
        path = str(path)
        prefix = self.root + (os.sep if not self.root.endswith(os.sep) else "")
        if not path.startswith(prefix):
            return None
        rel = path[len(prefix) :]
        if not rel:
            return None
        parts = rel.split(os.sep)
        # each ancestor folder first: a file under an ignored folder is ignored
        for depth in range(1, len(parts) + 1):
            last = depth == len(parts)
            folder = None if last else prefix + os.sep.join(parts[:depth])
            sub = "/".join(parts[:depth]) + ("/" if (not last or is_dir) else "")
            hit = _rule(self._defaults, sub)
            if hit is not None:
                return f"built-in rule {hit!r}", folder
            directory = self.root
            for level in range(depth):
                spec = self._spec_for(directory)
                if spec is not None:
                    local = "/".join(parts[level:depth]) + ("/" if (not last or is_dir) else "")
                    hit = _rule(spec, local)
                    if hit is not None:
                        where = os.path.relpath(directory, self.root)
                        source = "an ignore file" if where == "." else f"an ignore file in {where}/"
                        return f"rule {hit!r} of {source}", folder
                directory = os.path.join(directory, parts[level])
        return None


def _rule(spec: pathspec.PathSpec, path: str) -> str | None:
    """The pattern of ``spec`` that ignores ``path``, or None."""
    result = spec.check_file(path)
    if not result.include:
        return None
    pattern = spec.patterns[result.index] if result.index is not None else None
    return getattr(pattern, "pattern", None) or str(pattern)
