"""llama.cpp in a worker process, supervised: a native crash costs one answer, never the server.

llama.cpp is C++; when it crashes (a segmentation fault on some CPUs, an abort on a bad file) it
takes its whole process with it. So generation runs in a child process, as Ollama runs its model
runner: ``ModelProcess`` (used by the llama.cpp generator in the parent) starts
``python -m lorekeeper.plugins.generators.llama_worker``, sends it one request at a time and
streams back the pieces it produces. If the child dies, the request fails with a
``ModelCrashedError`` that says how (the signal), where its log is and what to try; the next
request starts a fresh child. Everything else in the parent (search, resources, status) never
notices.

The protocol is one JSON object per line. Requests go to the child's stdin:

    {"op": "load", "path": ..., "n_ctx": ..., "n_threads": ..., "n_gpu_layers": ..., "repack": bool}
    {"op": "generate", "id": n, "tokens": [...], "max_tokens": ...,
     "sampling": {...}, "stop": [...], "adapter": {"path": ..., "scale": 1.0} | null}
    {"op": "cancel", "id": n}          (while request n streams)
    {"op": "info"}  /  {"op": "exit"}

Replies come on a private copy of the child's original stdout (fd 1 itself is pointed at stderr,
so nothing a native library prints can corrupt the protocol): ``{"id": n, "piece": "..."}`` while
generating, then ``{"id": n, "done": true, "finish": "stop"|"length"|"cancelled", "tokens": k}``, or
``{"id": n, "error": "...", "kind": "AdapterLoadError"}``. The child's stderr (llama.cpp's own log)
goes to a log file in the data directory.

Private llama-cpp-python attributes (0.3.36) are used here and only here: ``Llama._model.model`` and
``Llama._ctx.ctx`` to attach LoRA adapters per request with ``llama_set_adapters_lora``. The public
API would be the ``lora_path`` argument of the ``Llama`` class, which fixes one adapter when the model loads.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

WORKER_MODULE = "lorekeeper.plugins.generators.llama_worker"
LOG_FILE = "llama-worker.log"
MAX_LOG_BYTES = 5 * 1024 * 1024
STOP_GRACE_SECONDS = 5.0


class ModelCrashedError(RuntimeError):
    """The llama.cpp worker process died while answering; the message says how and what to do."""


class ModelLoadError(RuntimeError):
    """llama.cpp could not open the model file."""


class WorkerError(RuntimeError):
    """The worker reported an error it raised while answering (its kind is kept in ``kind``)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def describe_exit(returncode: int | None) -> str:
    """``signal 11 (SIGSEGV)`` or ``exit code 3``, for people."""
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"signal {-returncode} ({name})"
    return f"exit code {returncode}"


# ---------------------------------------------------------------------------- the parent's side


class ModelProcess:
    """One supervised llama.cpp worker for one model; requests are served one at a time.

    ``load`` holds everything the child needs to open the model (path, context size, threads,
    GPU layers, repacking); the child is started, and the model loaded, on the first request.
    """

    def __init__(self, load: dict[str, Any], log_dir: Path | None = None) -> None:
        self.load = dict(load, op="load")
        self.log_dir = log_dir
        self._proc: subprocess.Popen | None = None
        self._replies: IO[str] | None = None
        self._lock = threading.Lock()
        self._next_id = 0
        self.starts = 0  # how many children were started (a restart after a crash counts)
        self.crashes = 0

    # ------------------------------------------------------------------ life cycle

    @property
    def log_path(self) -> Path | None:
        return self.log_dir / LOG_FILE if self.log_dir is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _log_handle(self) -> Any:
        path = self.log_path
        if path is None:
            return subprocess.DEVNULL
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > MAX_LOG_BYTES:
            path.replace(path.with_name(path.name + ".1"))
        return open(path, "ab")

    def _start(self) -> None:
        """Start a child and load the model in it; raises ``ModelLoadError`` if it cannot."""
        errlog = self._log_handle()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errlog,
                text=True,
                encoding="utf-8",
                bufsize=1,
                close_fds=True,
            )
        finally:
            if errlog is not subprocess.DEVNULL:
                errlog.close()
        self.starts += 1
        self._replies = self._proc.stdout
        log.info("started the llama.cpp worker (pid %d) for %s", self._proc.pid, self.load.get("path"))
        self._send(self.load)
        reply = self._read()
        if reply is None:
            raise self._crashed("while loading the model")
        if "error" in reply:
            self._send({"op": "exit"})
            self._reap()
            raise ModelLoadError(reply["error"])

    def ensure_started(self) -> None:
        if not self.alive():
            if self._proc is not None:
                self._reap()
            self._start()

    def stop(self) -> None:
        """Ask the child to exit (after the answer in progress, if any, within a grace period);
        kill it if it does not. A later request starts a new one."""
        locked = self._lock.acquire(timeout=STOP_GRACE_SECONDS)
        try:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                try:
                    if not locked:
                        raise subprocess.TimeoutExpired("llama_worker", STOP_GRACE_SECONDS)
                    self._send({"op": "exit"})
                    proc.wait(timeout=STOP_GRACE_SECONDS)
                except (OSError, ValueError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
            self._reap()
        finally:
            if locked:
                self._lock.release()

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ------------------------------------------------------------------ talking

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _read(self) -> dict[str, Any] | None:
        """The next reply, or None when the child is gone."""
        assert self._replies is not None
        line = self._replies.readline()
        if not line:
            return None
        return json.loads(line)

    def _crashed(self, during: str) -> ModelCrashedError:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        self._reap()
        self.crashes += 1
        where = f"; its log is {self.log_path}" if self.log_path is not None else ""
        message = (
            f"the model process crashed ({describe_exit(code)}) {during}{where}. lorekeeper starts a "
            "new one on the next request. If it keeps crashing on a CPU with Intel AMX, turn llama.cpp's "
            "weight repacking off: `lorekeeper config set llama_repack off` (or LOREKEEPER_LLAMA_REPACK=off)"
        )
        log.error("%s", message)
        return ModelCrashedError(message)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """A request with a single reply (``info``)."""
        with self._lock:
            self.ensure_started()
            try:
                self._send(message)
            except (BrokenPipeError, OSError, ValueError):
                raise self._crashed("before it could answer") from None
            reply = self._read()
            if reply is None:
                raise self._crashed("while answering")
            return reply

    def generate(self, message: dict[str, Any]) -> Iterator[str]:
        """Send a generate request and yield the pieces of the answer as they come.

        Stopping early (closing this iterator) cancels the request in the child, which finishes
        within a token. The last reply's details are left in ``self.last_done``.
        """
        with self._lock:
            self.ensure_started()
            self._next_id += 1
            request_id = self._next_id
            self.last_done: dict[str, Any] = {}
            try:
                self._send(dict(message, op="generate", id=request_id))
            except (BrokenPipeError, OSError, ValueError):
                raise self._crashed("before it could answer") from None
            finished = False
            try:
                while True:
                    reply = self._read()
                    if reply is None:
                        raise self._crashed("while answering")
                    if reply.get("id") != request_id:
                        continue  # a late reply of a request given up on
                    if "piece" in reply:
                        yield reply["piece"]
                    elif reply.get("done"):
                        finished = True
                        self.last_done = reply
                        return
                    elif "error" in reply:
                        finished = True
                        raise WorkerError(reply["error"], reply.get("kind", "Error"))
            finally:
                if not finished and self.alive():
                    self._cancel(request_id)

    def _cancel(self, request_id: int) -> None:
        """Stop request ``request_id`` and read up to its end, so the next request starts clean."""
        try:
            self._send({"op": "cancel", "id": request_id})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                reply = self._read()
                if reply is None:
                    self._reap()
                    return
                if reply.get("id") == request_id and (reply.get("done") or "error" in reply):
                    return
        except (OSError, ValueError):
            pass
        log.warning("the llama.cpp worker did not stop a cancelled answer; restarting it")
        self._reap()


# ---------------------------------------------------------------------------- the child's side


class _Worker:
    """Holds the model in the child and answers requests from the parent."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.llm: Any = None
        self.model_loads = 0
        self.adapters: dict[tuple[str, int], Any] = {}  # (path, mtime_ns) -> llama_adapter_lora_p
        self.active: tuple[str, float] | None = None  # (adapter path, scale) now attached
        self.cancel_id: int | None = None
        self.cancel_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    # ------------------------------------------------------------------ requests

    def load(self, msg: dict[str, Any]) -> None:
        from lorekeeper.plugins.llama_open import open_llama

        try:
            self.llm = open_llama(
                msg["path"],
                n_ctx=int(msg.get("n_ctx") or 0),
                n_threads=msg.get("n_threads"),
                n_gpu_layers=int(msg.get("n_gpu_layers", 0)),
                repack=msg.get("repack"),
                verbose=bool(msg.get("verbose", False)),  # llama.cpp's log goes to the worker log file
            )
        except Exception as exc:  # a bad file: say so and stay up for the parent to stop us
            self.send({"error": f"llama.cpp could not load {msg['path']}: {exc}", "kind": "ModelLoadError"})
            return
        self.model_loads += 1
        self.send({"loaded": True, "n_ctx": self.llm.n_ctx()})

    def info(self) -> None:
        import ctypes

        handle = ctypes.cast(self.llm._model.model, ctypes.c_void_p).value if self.llm is not None else 0
        self.send({"pid": os.getpid(), "model_loads": self.model_loads, "model_handle": handle or 0,
                   "adapter": self.active[0] if self.active else None})  # fmt: skip

    def _use_adapter(self, adapter: dict[str, Any] | None) -> None:
        import ctypes

        import llama_cpp

        wanted = (adapter["path"], float(adapter.get("scale", 1.0))) if adapter else None
        if wanted == self.active:
            return
        ctx = self.llm._ctx.ctx
        if wanted is None:
            rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            path, scale = wanted
            key = (path, os.stat(path).st_mtime_ns)
            handle = self.adapters.get(key)
            if handle is None:
                handle = llama_cpp.llama_adapter_lora_init(self.llm._model.model, path.encode("utf-8"))
                if not handle:
                    raise _AdapterLoadError(f"llama.cpp could not attach the adapter {path} to this model")
                self.adapters[key] = handle
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(scale)
            rc = llama_cpp.llama_set_adapters_lora(ctx, arr, 1, scales)
        if rc != 0:
            raise _AdapterLoadError(f"llama.cpp could not switch to adapter {wanted} (code {rc})")
        self.llm.reset()  # the KV cache holds states computed with the previous weights
        self.active = wanted

    def generate(self, msg: dict[str, Any]) -> None:
        request_id = msg["id"]
        with self.cancel_lock:
            self.cancel_id = None
        self._use_adapter(msg.get("adapter"))
        sampling = dict(msg.get("sampling") or {})
        common = {
            "max_tokens": int(msg["max_tokens"]),
            "temperature": float(sampling.pop("temperature", 0.2)),
            "stop": list(msg.get("stop") or []),
            "stream": True,
        }
        for key in ("top_p", "min_p", "repeat_penalty", "top_k", "seed"):
            if sampling.get(key) is not None:
                common[key] = sampling[key]
        chunks = self.llm.create_completion(prompt=msg["tokens"], **common)
        finish = "stop"
        count = 0
        for chunk in chunks:
            piece = chunk["choices"][0].get("text")
            if piece:
                count += 1
                self.send({"id": request_id, "piece": piece})
            reason = chunk["choices"][0].get("finish_reason")
            if reason:
                finish = reason
            with self.cancel_lock:
                if self.cancel_id == request_id:
                    finish = "cancelled"
                    break
        self.send({"id": request_id, "done": True, "finish": finish, "tokens": count})

    def cancel(self, request_id: int) -> None:
        with self.cancel_lock:
            self.cancel_id = request_id

    def close(self) -> None:
        if self.llm is None:
            return
        import llama_cpp

        llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        for handle in self.adapters.values():
            llama_cpp.llama_adapter_lora_free(handle)
        self.adapters.clear()
        self.llm.close()
        self.llm = None


class _AdapterLoadError(RuntimeError):
    pass


def main() -> None:
    """The child: answer requests from stdin until told to exit or the parent goes away."""
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # anything printed to stdout from here on lands in the log, not the protocol
    from lorekeeper.server.settings import process_environment

    process_environment()
    worker = _Worker(protocol)
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("op") == "cancel":
                worker.cancel(msg.get("id"))
            else:
                inbox.put(msg)
        inbox.put(None)  # the parent closed the pipe (or died)

    threading.Thread(target=read_stdin, name="requests", daemon=True).start()
    while True:
        msg = inbox.get()
        if msg is None or msg.get("op") == "exit":
            break
        op = msg.get("op")
        try:
            if op == "load":
                worker.load(msg)
            elif op == "info":
                worker.info()
            elif op == "generate":
                worker.generate(msg)
            else:
                worker.send({"id": msg.get("id"), "error": f"unknown request {op!r}", "kind": "ValueError"})
        except Exception as exc:
            kind = "AdapterLoadError" if isinstance(exc, _AdapterLoadError) else type(exc).__name__
            worker.send({"id": msg.get("id"), "error": str(exc) or kind, "kind": kind})
    worker.close()


if __name__ == "__main__":
    main()
