"""torchao backend for qadapt: ``torchao`` (int8 / int4 weight-only and NF4 tensor subclasses on ``nn.Linear``).

This package is the only place in qadapt that imports torchao; it is imported when its entry point
is asked for, never by ``import qadapt``.
"""

from qadapt_torchao.backend import TorchaoBackend
from qadapt_torchao.options import TorchaoOptions

__all__ = ["TorchaoBackend", "TorchaoOptions"]
