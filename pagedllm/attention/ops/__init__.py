"""Triton kernels over the paged KV cache (reshape_and_cache, paged attention).

Each kernel module has a pure-torch reference next to the kernel. Importing a submodule
imports triton; the CPU path (backends/torch_ref.py) never does.
"""
