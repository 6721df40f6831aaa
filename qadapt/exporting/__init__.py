"""Export: a base checkpoint on disk and an adapter, merged a layer at a time into a servable model directory.

``targets`` names what an export writes (float dtypes and the formats backends declare), ``plan``
reads the base's headers and sizes every step against the memory cap, ``run`` executes the plan,
``adapter_source`` reads a qadapt or PEFT adapter a layer at a time; ``calibrated`` and ``blockwise``
run a calibrated export one decoder block at a time. Works on tensors: imports the merge engine,
formats, plugins and config; of :mod:`qadapt.model` only its calibration statistics, never the
live-model layer or merge code.
"""

from qadapt.exporting.run import DEFAULT_SHARD_SIZE, REPORT_FILE, ExportReport, export
from qadapt.exporting.targets import FLOAT_TARGETS, Target, export_targets

__all__ = ["DEFAULT_SHARD_SIZE", "FLOAT_TARGETS", "REPORT_FILE", "ExportReport", "Target", "export", "export_targets"]
