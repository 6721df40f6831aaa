"""Model surgery and whole-model operations: :class:`~qadapt.model.layer.QuantAdapterLinear`, targeting,
``wrap``, named adapters, the summary, whole-model merge/unmerge/unwrap, calibration, distributed
helpers and the one rollback every operation runs in (``transaction``). Imports the merge engine,
config, plugins, protocols and errors; never persist, exporting or cli."""
