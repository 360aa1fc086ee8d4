"""The hash-chained egress ledger (docs/design.md §1, docs/audit.md).

``<state_dir>/audit.jsonl`` records, for every job, what was run and every byte that
left the site: ``job_assigned``, ``container_started``, ``result_file_sent`` (one per
file per job), ``result_range_resent`` (bytes sent again), ``result_accepted`` and
``job_ended``. It is append-only JSON lines; each entry carries the sha256 of the line
before it, so a changed, removed, inserted or reordered line is found by
:func:`verify`. Nothing in it is data, and no host path: datastores appear by name,
result files by their path inside the job's output directory.

- :mod:`agent.audit.chain`: the line format, :func:`verify` and :func:`read` (no state)
- :mod:`agent.audit.ledger`: :class:`AuditLedger`, the fsyncing, thread-safe writer
- :mod:`agent.audit.egress`: each result file once per job, resends as byte ranges
- :mod:`agent.audit.anchor`: the ledger's ``(seq, head)`` kept in the job store, which
  makes a deleted, shortened or replaced ledger fail to open and fail ``--verify``
"""

from agent.audit.anchor import Anchor
from agent.audit.chain import GENESIS, AuditError, VerifyResult, read, verify
from agent.audit.ledger import FILENAME, AuditLedger, ledger_path

__all__ = [
    "FILENAME",
    "GENESIS",
    "Anchor",
    "AuditError",
    "AuditLedger",
    "VerifyResult",
    "ledger_path",
    "read",
    "verify",
]
