"""The operator's controls over a local Unix socket (DESIGN: ``drain``, ``undrain``,
``cancel JOB``, ``reconnect``).

- :mod:`agent.control.peer`: who is calling (SO_PEERCRED, SO_PEERGROUPS) and whether
  they may.
- :mod:`agent.control.server`: the socket's life (mode 0660, root:group) and its framing,
  one JSON request line, one JSON reply line.
- :mod:`agent.control.commands`: what each command does to the job manager, the link
  and the drained flag, and its audit-ledger entry.
- :mod:`agent.control.redial`: the link owner that ``reconnect`` restarts.
- :mod:`agent.control.client`: the CLI side.
- ``review list|show|release|refuse``: the airlock's commands, answered by
  :mod:`agent.airlock.review` over the same socket and access rule.

The health server stays read-only; everything that changes the node goes through here.
"""
