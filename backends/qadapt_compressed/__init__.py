"""compressed-tensors backend for qadapt: ``compressed`` (symmetric int4 / int8 per-group weights in
compressed-tensors' ``pack-quantized`` layout, the ``w4a16`` / ``w8a16`` export targets vLLM serves).

Pure torch: neither compressed-tensors nor vLLM is imported; they are needed only to load the result.
"""

from qadapt_compressed.backend import CompressedBackend, CompressedOptions, PackedIntLinear

__all__ = ["CompressedBackend", "CompressedOptions", "PackedIntLinear"]
