"""The ``qadapt`` command (``main``), its tables, and the end-to-end demo. Imports anything in qadapt;
nothing in qadapt imports it."""

from qadapt.cli.main import main

__all__ = ["main"]
