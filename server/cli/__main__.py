"""``python -m lorekeeper.server.cli``: the same as the ``lorekeeper`` command."""

from . import main

main()
