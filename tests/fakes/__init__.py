"""Fakes with real state and injectable failures, for systems a test machine lacks.

``nvml``: :class:`~tests.fakes.nvml.FakeNvml`, a stand-in for the ``pynvml`` module.
"""
