"""Results that leave the site: the output gate, the spool and the uploader (PROTOCOL.md §5)."""
