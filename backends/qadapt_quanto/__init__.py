"""optimum-quanto backend for qadapt: ``quanto`` (``QLinear`` with qint8 / qint4 / qint2 weights).

This package is the only place in qadapt that imports optimum-quanto; it is imported when its entry
point is asked for, never by ``import qadapt``. It never runs quanto's C++ kernels (see
:mod:`qadapt_quanto.extension`).
"""

from qadapt_quanto.backend import QuantoBackend, QuantoOptions
from qadapt_quanto.extension import QuantoBuildLockWarning, build_lock, check_build_lock

__all__ = ["QuantoBackend", "QuantoBuildLockWarning", "QuantoOptions", "build_lock", "check_build_lock"]
