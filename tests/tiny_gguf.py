"""The tiny GGUF Llama the tests write (it lives in the gguf backend, where the docs find it too)."""

from qadapt_gguf.tiny import BLOCK_TENSORS, HEADS, HIDDEN, KV_HEADS, LAYERS, write_tiny_gguf

__all__ = ["BLOCK_TENSORS", "HEADS", "HIDDEN", "KV_HEADS", "LAYERS", "write_tiny_gguf"]
