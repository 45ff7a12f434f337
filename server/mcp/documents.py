"""Document URIs, and which files a client may read through them.

A document is named ``lorekeeper://doc/`` + its absolute path. ``resolve_document`` admits only
files the index holds, inside a registered folder, reached without ``..`` and without a link that
leads outside the folders: ignored files stay private, and nothing else on the disk is reachable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from mcp.server.mcpserver.exceptions import ResourceNotFoundError

DOC_SCHEME = "lorekeeper://doc/"


class DocumentAccessError(ResourceNotFoundError):
    """A document URI that the server refuses to serve; the message says why."""


def doc_uri(path: str | Path) -> str:
    """The resource URI of an indexed file: ``lorekeeper://doc/`` + its absolute path."""
    text = str(path).replace("\\", "/")
    return DOC_SCHEME + quote(text.lstrip("/"), safe="/:")


def path_from_param(raw: str) -> Path:
    """Turn the ``{path}`` of a document URI back into an absolute path (POSIX or Windows drive)."""
    text = unquote(raw).replace("\\", "/")
    if re.match(r"^[A-Za-z]:/", text):
        return Path(text)
    return Path("/" + text.lstrip("/"))


def is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_document(store: Any, raw: str) -> Path:
    """The indexed file a document URI names, or a ``DocumentAccessError`` saying why not.

    Rejects ``..`` segments, paths outside every registered root, symlinks whose target lies
    outside the roots, and files the index does not hold (ignored files stay private).
    """
    if "\x00" in raw:
        raise DocumentAccessError("the document path contains a NUL byte")
    decoded = unquote(raw).replace("\\", "/")
    if ".." in decoded.split("/"):
        raise DocumentAccessError(
            f"'..' is not allowed in a document path ({raw!r}): use the absolute path a retrieve result gives"
        )
    wanted = path_from_param(raw)
    roots = [Path(r.path) for r in store.roots()]
    if not roots:
        raise DocumentAccessError("no folders are registered: add one with `lorekeeper add FOLDER`")
    real = wanted.resolve(strict=False)
    inside = [root for root in roots if is_within(real, root.resolve(strict=False))]
    if not inside:
        if any(is_within(wanted, root) for root in roots):
            raise DocumentAccessError(f"{wanted} is a link that points outside the registered folders")
        raise DocumentAccessError(
            f"{wanted} is outside the registered folders ({', '.join(str(r) for r in roots)})"
        )
    for candidate in (wanted, real):
        doc = store.get_document(str(candidate))
        if doc is not None:
            if not Path(candidate).exists():
                raise DocumentAccessError(f"{candidate} was indexed but no longer exists on disk")
            return Path(candidate)
    raise DocumentAccessError(f"{wanted} is not in the index (it may be ignored, unsupported or new)")
