"""HQQ backend for qadapt: ``hqq`` (``HQQLinear`` through hqq's PyTorch backend).

This package is the only place in qadapt that imports hqq; it is imported when its entry point is
asked for, never by ``import qadapt``.
"""

from qadapt_hqq.backend import HqqBackend, HqqOptions

__all__ = ["HqqBackend", "HqqOptions"]
