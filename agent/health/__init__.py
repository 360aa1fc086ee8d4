"""Node health: the facts, the one predicate over them, and the loopback server."""
