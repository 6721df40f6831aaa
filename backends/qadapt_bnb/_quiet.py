"""Silence one bitsandbytes log line that every CPU run prints and nobody can act on.

On CPUs with AVX512-BF16, ``import bitsandbytes`` tries to fetch a fused 4-bit kernel from the
Hugging Face hub (``kernels-community``) and logs a warning when it cannot: always offline, and
whenever the optional ``kernels`` package is absent. bitsandbytes then uses its own kernels, so
the line is noise. This filter drops exactly that record (it is kept at DEBUG on this package's
logger); every other bitsandbytes warning passes unchanged.
"""

from __future__ import annotations

import logging

#: The logger bitsandbytes 0.50 emits the line on, and the start of its message template.
SOURCE_LOGGER = "bitsandbytes.backends.cpu.ops"
MESSAGE_START = "Failed to load CPU gemm_4bit_forward from kernels-community"

_log = logging.getLogger("qadapt_bnb")


class HubKernelNoise(logging.Filter):
    """Drops the optional hub kernel's load failure; lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(MESSAGE_START):
            _log.debug("bitsandbytes: %s", record.getMessage())
            return False
        return True


def install() -> None:
    """Attach the filter to bitsandbytes' CPU-ops logger (once; before bitsandbytes is imported)."""
    logger = logging.getLogger(SOURCE_LOGGER)
    if not any(isinstance(f, HubKernelNoise) for f in logger.filters):
        logger.addFilter(HubKernelNoise())
