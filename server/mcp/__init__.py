"""The MCP server: the user's documents and a local model, offered to an AI assistant.

Tools (``tools.py``): ``retrieve``, ``generate`` (tokens streamed as progress, ``progress.py``),
``index_status``, and - only when the user starts the server with ``--allow-folder-tools`` -
``add_folder`` / ``remove_folder``. Resources and the prompt (``resources.py``):
``lorekeeper://doc/{path}`` (a document's text, only inside registered roots: ``documents.py``)
``lorekeeper://status`` and the last evaluation reports (``lorekeeper://eval/retrieval``,
``lorekeeper://eval/answers``); the resource list changes, with a notification, whenever the index
does (``notify.py``, which also holds every private SDK detail we rely on). Output shapes are in
``schemas.py``, the per-connection state in ``state.py``, the server and its lifespan in
``server.py``, Streamable HTTP with its token and Origin checks in ``http.py``.
"""

from .documents import DOC_SCHEME, DocumentAccessError, doc_uri
from .http import http_app, load_or_create_token, origin_allowed, run_http
from .resources import STATUS_URI
from .server import LorekeeperMCP, create_server, run_stdio
from .state import AppState, ServerOptions

__all__ = [
    "DOC_SCHEME",
    "STATUS_URI",
    "AppState",
    "DocumentAccessError",
    "LorekeeperMCP",
    "ServerOptions",
    "create_server",
    "doc_uri",
    "http_app",
    "load_or_create_token",
    "origin_allowed",
    "run_http",
    "run_stdio",
]
