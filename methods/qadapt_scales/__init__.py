"""``scales``: train the quantizer's own per-group scales (PEQA-style), merged exactly.

One trainable multiplier ``s`` per quantization group of the base layer (bnb4: per absmax block;
bnb8: per row; any backend that declares ``capabilities.group_scales``: its own groups). The
adapted layer computes with the weight ``W * expand(s)``; merging writes ``scales * s`` into the
backend's storage, so the merged layer computes what the adapter did, up to the format's rounding
of scales (with bitsandbytes' double quantization, the nested 8-bit scale state).
"""

from qadapt_scales.method import ScalesAdapter, ScalesMethod, ScalesOptions

__all__ = ["ScalesAdapter", "ScalesMethod", "ScalesOptions"]
