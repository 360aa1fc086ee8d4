"""The airlock: results held on the node until the consumer releases them
(docs/airlock.md, docs/protocol.md §5a).

- :mod:`agent.airlock.settings`: the ``results.review_command`` rule (config).
- :mod:`agent.airlock.approvals`: held jobs and their decisions, in the job store.
- :mod:`agent.airlock.hold`: the held step of a job's life, and the decisions.
- :mod:`agent.airlock.preview`: a safe look at the spooled files.
- :mod:`agent.airlock.review`: the control socket's ``review`` commands.
- :mod:`agent.airlock.command`: the consumer's own review program, sandboxed.

Kept import-light: the config models import :mod:`agent.airlock.settings`.
"""
