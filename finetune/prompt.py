"""How a run's chats were asked, so its adapter is asked the same way at answer time.

An adapter learns its answers after one particular prompt: the system turn of its training chats,
rendered with one chat template. Asked without that system turn (``ask`` puts its retrieval
instructions there), it shows little of what it learnt. Training writes ``prompt.json`` into the run
directory; export copies it into the adapter's record (``lorekeeper.server.adapters.AdapterRecord``),
which ``ask``, ``chat`` and the MCP ``generate`` tool read.

    system_prompt        the most common system turn of the training chats (None: they had none,
                         so the chat template's own default applied, as it will at answer time)
    system_prompt_share  the share of chat records that carried exactly that system turn
    chat_template        the Jinja template the chats were rendered with
    records, formats     what the run trained on, for a default description
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT_FILE = "prompt.json"


def most_common_system(records: Sequence[Any]) -> tuple[str | None, float]:
    """The system turn most chat records open with, and the share of chat records that carry it;
    (None, share without one) when most chats have no system turn."""
    turns: Counter[str | None] = Counter()
    for record in records:
        if getattr(record, "kind", None) != "chat" or not record.messages:
            continue
        first = record.messages[0]
        turns[first["content"] if first["role"] == "system" else None] += 1
    if not turns:
        return None, 0.0
    # ties go to the turn seen first, as Counter keeps insertion order
    system, count = turns.most_common(1)[0]
    return system, round(count / sum(turns.values()), 4)


def training_prompt(records: Sequence[Any], chat_template: str | None) -> dict[str, Any]:
    """What ``prompt.json`` holds for a run that trained on ``records`` rendered with ``chat_template``."""
    system, share = most_common_system(records)
    formats = Counter(getattr(r, "format_name", getattr(r, "kind", "?")) for r in records)
    return {
        "system_prompt": system,
        "system_prompt_share": share,
        "chat_template": chat_template or None,
        "records": len(records),
        "formats": dict(formats),
    }


def write_training_prompt(run_root: Path, records: Sequence[Any], chat_template: str | None) -> Path:
    path = Path(run_root) / PROMPT_FILE
    path.write_text(json.dumps(training_prompt(records, chat_template), indent=2) + "\n", encoding="utf-8")
    return path


def read_training_prompt(run_root: Path) -> dict[str, Any]:
    """The run's ``prompt.json``; for a run trained before it existed, the chat template saved with
    its tokenizer and no system prompt."""
    path = Path(run_root) / PROMPT_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            return data
    return {"system_prompt": None, "chat_template": saved_chat_template(Path(run_root) / "tokenizer")}


def saved_chat_template(tokenizer_dir: Path) -> str | None:
    """The chat template a ``save_pretrained`` tokenizer folder carries (``chat_template.jinja`` or
    the ``chat_template`` key of ``tokenizer_config.json``), read without transformers."""
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = tokenizer_dir / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML}


def chat_template_text(spec: str) -> str:
    """The Jinja text of ``--chat-template``: a named template or a file (checked by TrainConfig)."""
    return NAMED[spec] if spec in NAMED else Path(spec).read_text(encoding="utf-8")


def apply_chat_template(tokenizer: Any, spec: str | None) -> Any:
    """Give ``tokenizer`` the run's ``--chat-template`` (no change without one); returns it."""
    if spec:
        tokenizer.chat_template = chat_template_text(spec)
    return tokenizer


def default_description(run_name: str, prompt: dict[str, Any]) -> str:
    """A one-line description from the run's data when the user gave none."""
    records = prompt.get("records")
    formats = prompt.get("formats") or {}
    what = ", ".join(f"{n} {kind}" for kind, n in sorted(formats.items())) if formats else None
    trained = f"{records} records ({what})" if records and what else "its data"
    return f"LoRA adapter from run {run_name}, trained on {trained}"
