"""What the LyCORIS methods ``loha`` and ``lokr`` share: options, per-layer rank and alpha patterns, and
the forward with PEFT 0.21.2's module and rank dropout.

Both methods add a full-size update ``ΔW [out, in]`` built from small factors; only how the factors
combine differs (a Hadamard product of two low-rank products, or a Kronecker product). This
package registers no plugin: ``qadapt_loha`` and ``qadapt_lokr`` do.
"""

from qadapt_lycoris.base import LycorisMethod, pattern_value
from qadapt_lycoris.options import LycorisOptions

__all__ = ["LycorisMethod", "LycorisOptions", "pattern_value"]
