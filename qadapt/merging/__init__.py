"""The merge engine: one layer's merge, inverse unmerge and conversion on bare storage, and their figures.

``engine`` runs the protocol (dequantize, apply the adapter, check, requantize, guard);
``figures`` measures it; ``scales`` refits group scales; ``rows`` merges a float weight a block
of rows at a time; ``result`` holds what a merge reports. Works on tensors and
:class:`~qadapt.protocols.QuantizedWeight` only: imports errors and protocols, never a module
of the model.
"""
