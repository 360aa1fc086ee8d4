"""Jobs: admission, the state machine, one runner per job, the durable store."""
