"""GGUF backend for qadapt: ``gguf`` (linear layers over GGUF blocks as a GGUF file stores them).

This package is the only place in qadapt that reads or writes GGUF files; it is imported when its entry
point is asked for, never by ``import qadapt``.
"""

from qadapt_gguf.backend import GgufBackend, GgufLinear, GgufOptions

__all__ = ["GgufBackend", "GgufLinear", "GgufOptions"]
