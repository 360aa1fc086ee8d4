"""Shared test helpers: valid configs on disk, free ports, the one time constant."""
