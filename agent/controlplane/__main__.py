"""``python -m agent.controlplane``: the same command line as ``cloudbender-cp``.

See :mod:`agent.controlplane.cli`. The older form without a command,
``python -m agent.controlplane --token-file FILE [--port N]``, still runs ``serve``.
"""

from __future__ import annotations

import sys

from agent.controlplane.cli import main, read_tokens

__all__ = ["main", "read_tokens"]

if __name__ == "__main__":
    sys.exit(main())
