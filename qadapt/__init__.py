"""qadapt: parameter-efficient adapters on quantized PyTorch layers.

``qadapt.export`` is the export function; the rest of the export lives in :mod:`qadapt.exporting`.

Methods (OFT, RandLora, ...) and backends (bitsandbytes int8/nf4/fp4, float, ...) are plugins
found through the entry-point groups ``qadapt.methods`` and ``qadapt.backends``. Importing
qadapt imports no plugin, and not even torch: every public name below is imported on first use
(so ``qadapt --help`` and ``qadapt --version`` start at once).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qadapt.errors import (
    AdapterStateError,
    ArgumentTypeError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    DuplicatePluginError,
    InputError,
    LayerFitError,
    MissingDependencyError,
    PairMismatchError,
    PluginError,
    PluginLoadError,
    QAdaptError,
    TargetError,
    UnknownPluginError,
    UnsafeMergeError,
)
from qadapt.version import __version__

#: public name -> the module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    "API_VERSION": "qadapt.protocols",
    "Backend": "qadapt.protocols",
    "BackendCapabilities": "qadapt.protocols",
    "BaseLayer": "qadapt.protocols",
    "CalibrationStats": "qadapt.protocols",
    "ConfigValidationError": "qadapt.config",
    "ExportReport": "qadapt.exporting",
    "GroupLayout": "qadapt.protocols",
    "MergeReport": "qadapt.model.model_merge",
    "MergeResult": "qadapt.merging.result",
    "Method": "qadapt.protocols",
    "PluginInfo": "qadapt.registry.loader",
    "PluginOptions": "qadapt.protocols",
    "PluginSpec": "qadapt.config",
    "QAdaptConfig": "qadapt.config",
    "QuantAdapterLinear": "qadapt.model.layer",
    "QuantizedWeight": "qadapt.protocols",
    "RequantizeMode": "qadapt.merging.result",
    "WrapSummary": "qadapt.model.summary",
    "add_adapter": "qadapt.model.adapters",
    "calibration_batches": "qadapt.formats.calibration_text",
    "config_schema": "qadapt.config",
    "delete_adapter": "qadapt.model.adapters",
    "disable_adapters": "qadapt.model.adapters",
    "enable_adapters": "qadapt.model.adapters",
    "export": "qadapt.exporting",
    "list_adapters": "qadapt.model.layers",
    "load_adapter": "qadapt.persist.adapter",
    "load_config": "qadapt.config",
    "load_gguf": "qadapt.hf.model_files",
    "load_model_file": "qadapt.hf.model_files",
    "load_peft_adapter": "qadapt.persist.peft",
    "merge": "qadapt.model.model_merge",
    "merge_storage": "qadapt.merging.engine",
    "merged_weights": "qadapt.model.merged_weights",
    "plugins": "qadapt.registry.loader",
    "print_trainable_parameters": "qadapt.model.summary",
    "save_adapter": "qadapt.persist.adapter",
    "save_peft_adapter": "qadapt.persist.peft",
    "self_calibration": "qadapt.model.self_calibration",
    "set_adapter": "qadapt.model.adapters",
    "set_merge_aware": "qadapt.model.adapters",
    "summary": "qadapt.model.summary",
    "unmerge": "qadapt.model.model_merge",
    "unwrap": "qadapt.model.model_merge",
    "wrap": "qadapt.model.wrap",
}
#: Subpackages reachable as attributes before anything imported them (``qadapt.registry.load``).
_SUBPACKAGES = frozenset(
    {"cli", "config", "exporting", "formats", "hf", "merging", "model", "persist", "registry", "testing"}
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        # The Hugging Face integration registers its hooks into the model operations before any is used.
        importlib.import_module("qadapt.hf")
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES or name in ("protocols", "rounding"):
        return importlib.import_module(f"qadapt.{name}")
    raise AttributeError(f"module 'qadapt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what a type checker and an IDE see: the eager imports
    from qadapt.config import ConfigValidationError, PluginSpec, QAdaptConfig, config_schema, load_config
    from qadapt.exporting import ExportReport, export
    from qadapt.formats.calibration_text import calibration_batches
    from qadapt.hf.model_files import load_gguf, load_model_file
    from qadapt.merging.engine import merge_storage
    from qadapt.merging.result import MergeResult, RequantizeMode
    from qadapt.model.adapters import (
        add_adapter,
        delete_adapter,
        disable_adapters,
        enable_adapters,
        set_adapter,
        set_merge_aware,
    )
    from qadapt.model.layer import QuantAdapterLinear
    from qadapt.model.layers import list_adapters
    from qadapt.model.merged_weights import merged_weights
    from qadapt.model.model_merge import MergeReport, merge, unmerge, unwrap
    from qadapt.model.self_calibration import self_calibration
    from qadapt.model.summary import WrapSummary, print_trainable_parameters, summary
    from qadapt.model.wrap import wrap
    from qadapt.persist.adapter import load_adapter, save_adapter
    from qadapt.persist.peft import load_peft_adapter, save_peft_adapter
    from qadapt.protocols import (
        API_VERSION,
        Backend,
        BackendCapabilities,
        BaseLayer,
        CalibrationStats,
        GroupLayout,
        Method,
        PluginOptions,
        QuantizedWeight,
    )
    from qadapt.registry.loader import PluginInfo, plugins

__all__ = [
    "API_VERSION",
    "AdapterStateError",
    "ArgumentTypeError",
    "Backend",
    "BackendCapabilities",
    "BaseLayer",
    "CalibrationStats",
    "CapabilityError",
    "CheckpointError",
    "ConfigError",
    "ConfigValidationError",
    "DuplicatePluginError",
    "ExportReport",
    "GroupLayout",
    "InputError",
    "LayerFitError",
    "MergeReport",
    "MergeResult",
    "Method",
    "MissingDependencyError",
    "PairMismatchError",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PluginOptions",
    "PluginSpec",
    "QAdaptConfig",
    "QAdaptError",
    "QuantAdapterLinear",
    "QuantizedWeight",
    "RequantizeMode",
    "TargetError",
    "UnknownPluginError",
    "UnsafeMergeError",
    "WrapSummary",
    "__version__",
    "add_adapter",
    "calibration_batches",
    "config_schema",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "export",
    "list_adapters",
    "load_adapter",
    "load_config",
    "load_gguf",
    "load_model_file",
    "load_peft_adapter",
    "merge",
    "merge_storage",
    "merged_weights",
    "plugins",
    "print_trainable_parameters",
    "save_adapter",
    "save_peft_adapter",
    "self_calibration",
    "set_adapter",
    "set_merge_aware",
    "summary",
    "unmerge",
    "unwrap",
    "wrap",
]
