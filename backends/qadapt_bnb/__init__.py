"""bitsandbytes backends for qadapt: ``bnb8`` (``Linear8bitLt``) and ``bnb4`` (``Linear4bit``, nf4/fp4).

This package is the only place in qadapt that imports bitsandbytes; it is imported when one of its
entry points is asked for, never by ``import qadapt``.
"""

from qadapt_bnb import _quiet

_quiet.install()  # before bitsandbytes is first imported: its CPU backend logs at import time

from qadapt_bnb.bnb4 import Bnb4Backend, Bnb4Options  # noqa: E402
from qadapt_bnb.bnb8 import Bnb8Backend, Bnb8Options  # noqa: E402

__all__ = ["Bnb4Backend", "Bnb4Options", "Bnb8Backend", "Bnb8Options"]
