"""Results that leave the site: the output gate, the spool, the uploader (docs/protocol.md §5)."""
