"""How to serve registered adapters on an OpenAI-compatible server: the exact commands and config.

``lorekeeper adapters serve-config NAME...`` (and ``finetune export --server-config``) print, for
adapters that share one base model:

- llama.cpp's ``llama-server`` command: the base GGUF, each adapter GGUF loaded with ``--lora``
  and kept off (``--lora-init-without-apply``); lorekeeper picks one per request
  (``openai_adapters = llama-server``);
- a config file for llama-cpp-python's server (``python -m llama_cpp.server --config_file``): the
  base as one model and base + adapter as another per adapter, the adapter's name as its
  ``model_alias`` (``openai_adapters = model-name``). That server reloads the model when a request
  names another one, so switching there costs a model load;
- a vLLM command when the run's base is a Hugging Face folder (vLLM takes the PEFT adapter folder
  the run saved, not the GGUF): ``--enable-lora --lora-modules NAME=RUN/adapter``, and the
  ``POST /v1/load_lora_adapter`` request that adds one to a running vLLM (where
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).

Paths are this machine's: on another machine, copy the files and change the paths.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import AdapterError, AdapterRegistry

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts
VLLM_DEFAULT_RANK = 16


@dataclass
class ServePlan:
    """The servers' view of a set of adapters on one base model."""

    names: list[str]
    base_gguf: Path
    adapter_ggufs: dict[str, Path]
    port: int
    n_ctx: int
    host: str = "127.0.0.1"
    peft_dirs: dict[str, Path] = field(default_factory=dict)  # name -> the run's PEFT adapter folder
    hf_base: Path | None = None  # the runs' base as a Hugging Face folder (vLLM), if it is one
    rank: int = 0

    @property
    def base_alias(self) -> str:
        """The base model's name on a server that serves adapters as models."""
        return self.base_gguf.name.removesuffix(".gguf")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def llama_server_command(self) -> str:
        argv = ["llama-server", "-m", str(self.base_gguf)]
        for name in self.names:
            argv += ["--lora", str(self.adapter_ggufs[name])]
        argv += [
            "--lora-init-without-apply",
            "-c",
            str(self.n_ctx),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        return shlex.join(argv)

    def llama_cpp_server_config(self) -> dict[str, Any]:
        """llama-cpp-python's server config: the base first (the model it answers unknown names with)."""
        base = {"model": str(self.base_gguf), "model_alias": self.base_alias, "n_ctx": self.n_ctx}
        models = [base] + [
            {**base, "model_alias": name, "lora_path": str(self.adapter_ggufs[name])} for name in self.names
        ]
        return {"host": self.host, "port": self.port, "models": models}

    def vllm_load_commands(self) -> list[str]:
        """Loading the adapters into a running vLLM (started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
        url = f"http://{self.host}:{self.port}/v1/load_lora_adapter"
        return [
            shlex.join(
                [
                    "curl",
                    "-X",
                    "POST",
                    url,
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    json.dumps({"lora_name": name, "lora_path": str(self.peft_dirs[name])}),
                ]
            )  # fmt: skip
            for name in self.names
            if name in self.peft_dirs
        ]

    def vllm_command(self) -> str | None:
        if self.hf_base is None or len(self.peft_dirs) != len(self.names):
            return None
        argv = ["vllm", "serve", str(self.hf_base), "--enable-lora", "--lora-modules"]
        argv += [f"{name}={self.peft_dirs[name]}" for name in self.names]
        if self.rank > VLLM_DEFAULT_RANK:
            argv += ["--max-lora-rank", str(next((r for r in VLLM_RANKS if r >= self.rank), self.rank))]
        argv += ["--served-model-name", self.base_alias, "--max-model-len", str(self.n_ctx)]
        argv += ["--host", self.host, "--port", str(self.port)]
        return shlex.join(argv)


def plan_for(registry: AdapterRegistry, names: list[str], *, port: int = 8080, n_ctx: int = 4096,
             host: str = "127.0.0.1") -> ServePlan:  # fmt: skip
    """The plan for serving ``names`` together; ``AdapterError`` when one is unknown, has no
    recorded base model, or the adapters were made for different bases."""
    if not names:
        raise AdapterError("name at least one adapter (`lorekeeper adapters list` shows them)")
    records = [registry.read(name) for name in names]
    bases = {str(r.base_path) for r in records}
    if None in {r.base_path for r in records}:
        missing = [r.name for r in records if r.base_path is None]
        raise AdapterError(f"adapter(s) {', '.join(missing)} record no base model: export them again "
                           "with `lorekeeper finetune export RUN`")  # fmt: skip
    if len(bases) > 1:
        listing = "; ".join(f"{r.name}: {r.base_model}" for r in records)
        raise AdapterError(f"these adapters were made for different base models ({listing}): one server "
                           "serves one base, so give the adapters of one base")  # fmt: skip
    plan = ServePlan(
        names=list(names),
        base_gguf=records[0].base_path,  # type: ignore[arg-type]
        adapter_ggufs={r.name: registry.directory / r.adapter_file for r in records},
        port=port,
        n_ctx=n_ctx,
        host=host,
        rank=max(r.rank or 0 for r in records),
    )
    hf_bases = set()
    for record in records:
        run = Path(record.run_dir) if record.run_dir else None
        if run is not None and (run / "adapter" / "adapter_config.json").is_file():
            plan.peft_dirs[record.name] = run / "adapter"
        hf_bases.add(_hf_base_of(run))
    if len(hf_bases) == 1 and None not in hf_bases:
        plan.hf_base = hf_bases.pop()
    return plan


def _hf_base_of(run: Path | None) -> Path | None:
    """The Hugging Face folder a run trained on (its ``base.json``), or None for a GGUF base."""
    try:
        base = json.loads((run / "base.json").read_text(encoding="utf-8")) if run else {}
    except (OSError, ValueError):
        return None
    return (
        Path(base["path"])
        if isinstance(base, dict) and base.get("kind") == "hf" and base.get("path")
        else None
    )


def render(plan: ServePlan, config_file: Path | None = None) -> str:
    """The commands and settings, as text to read and copy; the llama-cpp-python config inline
    unless it was written to ``config_file``."""
    names = ", ".join(plan.names)
    first = plan.names[0]
    config = json.dumps(plan.llama_cpp_server_config(), indent=2)
    lines = [
        f"# Serving {names} on {plan.base_gguf.name}; lorekeeper then picks the adapter per request",
        f"# (`lorekeeper ask --generator openai --adapter {first} ...`, MCP generate(adapter=...)).",
        "",
        "# llama.cpp's llama-server (adapters loaded at start, off unless a request asks for one):",
        plan.llama_server_command(),
        f"lorekeeper config set openai_base_url {plan.base_url}",
        "lorekeeper config set openai_adapters llama-server",
        "",
        "# llama-cpp-python's server (pip install 'llama-cpp-python[server]'): the base and base + adapter",
        "# as models of their own names; it reloads the model when a request names another one.",
    ]
    if config_file is not None:
        lines.append(f"python -m llama_cpp.server --config_file {shlex.quote(str(config_file))}")
    else:
        lines += ["# save this as lorekeeper-serve.json:", config,
                  "python -m llama_cpp.server --config_file lorekeeper-serve.json"]  # fmt: skip
    lines += [
        f"lorekeeper config set openai_base_url {plan.base_url}",
        "lorekeeper config set openai_adapters model-name",
        f"lorekeeper config set openai_model {plan.base_alias}",
        "",
    ]
    vllm = plan.vllm_command()
    if vllm is None:
        lines.append(f"# vLLM takes the base as a Hugging Face folder; {plan.base_gguf.name} is a GGUF, so there "
                     "is no vLLM command for it.")  # fmt: skip
    else:
        lines += [
            "# vLLM (the PEFT adapter folders the runs saved; the same settings as llama-cpp-python's server):",
            vllm,
            "# or into a running vLLM started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora:",
            *plan.vllm_load_commands(),
        ]
    lines += ["", "# the window these servers are given (the openai generator assumes 8192 unless told):",
              f"lorekeeper config set openai_context {plan.n_ctx}"]  # fmt: skip
    return "\n".join(lines)


def write_config(plan: ServePlan, folder: Path) -> Path:
    """Write the llama-cpp-python server config into ``folder``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{plan.names[0]}.llama-cpp-server.json"
    path.write_text(json.dumps(plan.llama_cpp_server_config(), indent=2) + "\n", encoding="utf-8")
    return path
