"""Pallas kernels, one folder per op: reference.py, gpu.py, tpu.py, ops.py.

Layers never import from here; ``effarch.ops`` dispatches by ``implementation``.
"""
