"""Triton kernels of fastbd (installed as ``fastbd.kernels``).

Kernels only: launch wrappers, input checks and the torch references live in ``fastbd.ops``.
Importing a module here imports Triton; ``fastbd.ops`` does so lazily.
"""
