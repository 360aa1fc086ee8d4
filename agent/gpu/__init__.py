"""GPU inventory: what GPUs this node has, what they are doing, and which jobs may use.

``base`` holds the interface and the pure helpers (no NVML), ``nvml`` the one real
backend (the only module that imports ``pynvml``), ``report`` the renderings that the
``gpus`` command prints.
"""
