"""Run the ``lorekeeper`` command with the test fakes registered (the hash embedder, the scripted
generator), so a real server subprocess can be started without loading the models.

    python tests/serve_with_fakes.py --db X serve --watch DIR     (with LOREKEEPER_EMBEDDER=test-hash-64)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import register_fakes  # noqa: E402

if __name__ == "__main__":
    register_fakes()
    from lorekeeper.server.cli import main

    sys.argv[0] = "lorekeeper"
    main()
