"""Import-time shims that let the engines' own code run on a CPU-only machine.

Each one is listed and justified in docs/compat.md. A shim replaces a GPU-only *choice* (which
GEMM kernel, which attention backend); none touches config parsing, module construction,
parameter creation or weight loading, which is what the compat suite tests.
"""
