"""Document URIs, and which files a client may read through them.

A document is named ``lorekeeper://doc/`` + its absolute path. ``resolve_document`` admits only
files the index holds, inside a registered folder, reached without ``..`` and without a link that
leads outside the folders: ignored files stay private, and nothing else on the disk is reachable.
``read_document`` then reads it as the indexer does (``prepare.read_text``): it opens the file once,
checks where the opened file really is (``files.open_checked``) and extracts the text from the bytes
of that descriptor, so a file swapped for a link between the check and the read is refused, never
served.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mcp.server.mcpserver.exceptions import ResourceNotFoundError

from lorekeeper.plugins.base import LoaderError

from ..prepare import read_text

DOC_SCHEME = "lorekeeper://doc/"


class DocumentAccessError(ResourceNotFoundError):
    """A document URI that the server refuses to serve; the message says why."""


def doc_uri(path: str | Path) -> str:
    """The resource URI of an indexed file: ``lorekeeper://doc/`` + its absolute path."""
    text = str(path).replace("\\", "/")
    return DOC_SCHEME + quote(text.lstrip("/"), safe="/:")


def path_from_param(raw: str) -> Path:
    """Turn the ``{path}`` of a document URI back into an absolute path (POSIX or Windows drive).

    The SDK has already percent-decoded it, once: decoding again would turn ``%252E%252E`` into
    ``..`` after the check, and misname files whose names hold a ``%``.
    """
    text = raw.replace("\\", "/")
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
    decoded = raw.replace("\\", "/")
    if ".." in decoded.split("/"):
        raise DocumentAccessError(
            f"'..' is not allowed in a document path ({raw!r}): use the absolute path a retrieve result gives"
        )
    wanted = path_from_param(raw)
    roots = [Path(r.path) for r in store.roots()]
    if not roots:
        raise DocumentAccessError("no folders are registered: add one with `lorekeeper add FOLDER`")
    try:
        real = wanted.resolve(strict=False)
    except OSError as exc:  # a link that changed while it was followed, a loop
        raise DocumentAccessError(f"{wanted} cannot be resolved ({exc.strerror or exc}); try again") from exc
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
            if doc.status != "indexed":
                raise DocumentAccessError(f"{candidate} is not indexed ({doc.status}: {doc.error})")
            if not Path(candidate).exists():
                raise DocumentAccessError(f"{candidate} was indexed but no longer exists on disk")
            return Path(candidate)
    raise DocumentAccessError(f"{wanted} is not in the index (it may be ignored, unsupported or new)")


def read_document(store: Any, raw: str, max_bytes: int, max_chars: int | None = None) -> str:
    """The text of the document a URI names, extracted from the very file that was checked.

    Refuses what ``resolve_document`` refuses, files over ``max_bytes`` (the ``max_file_mb``
    setting, as the indexer applies it) or whose text passes ``max_chars`` (``max_chars_per_file``),
    and a file that turned into a link or into another file between the check and the open.
    """
    target = resolve_document(store, raw)
    roots = [r.path for r in store.roots()]
    try:
        expect = os.path.realpath(target)
    except OSError as exc:  # the path changed under us (a link swapped in or out while resolving it)
        raise DocumentAccessError(
            f"{target} changed while it was being opened ({exc.strerror}): try again"
        ) from exc
    try:
        return read_text(str(target), roots, max_bytes=max_bytes, max_chars=max_chars, expect=expect)
    except LoaderError as exc:
        raise DocumentAccessError(str(exc)) from exc
