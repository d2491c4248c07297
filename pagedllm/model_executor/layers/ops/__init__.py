"""Triton kernels for the GPU path of the model layers, each with a pure-torch reference.

Importing a submodule imports triton; callers on CPU-only installs must guard that import.
"""
