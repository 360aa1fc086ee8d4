"""Model artifacts (docs/protocol.md §6): fetch over the session, verify, unpack safely, cache.

- ``fetch``: :class:`ArtifactFetcher`, ``artifact.get`` → chunks → a verified file in
  the spool, with resume after a dropped session; the job manager routes
  ``artifact.chunk`` / ``artifact.end`` / ``error`` to it.
- ``download``: one download's partial file, hash and verification rules. No asyncio.
- ``unpack``: safe unpacking of a tar (or tar.gz) archive. Blocking.
- ``cache``: :class:`ModelCache`, unpacked models by sha256: reuse, hold, evict.

See docs/models.md.
"""

from agent.models.cache import ModelCache
from agent.models.fetch import ArtifactFetcher
from agent.models.unpack import unpack

__all__ = ["ArtifactFetcher", "ModelCache", "unpack"]
