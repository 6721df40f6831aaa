"""qadapt: parameter-efficient adapters on quantized PyTorch layers.

``qadapt.export`` is the export function; the rest of the export lives in :mod:`qadapt.exporting`.

Methods (OFT, RandLora, ...) and backends (bitsandbytes int8/nf4/fp4, float, ...) are plugins
found through the entry-point groups ``qadapt.methods`` and ``qadapt.backends``. Importing
qadapt imports no plugin.
"""

from qadapt.config import ConfigValidationError, PluginSpec, QAdaptConfig, config_schema, load_config
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
from qadapt.exporting import ExportReport, export
from qadapt.merge.engine import merge_storage
from qadapt.merge.result import MergeResult, RequantizeMode
from qadapt.model.adapters import (
    add_adapter,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    set_adapter,
)
from qadapt.model.layer import QuantAdapterLinear
from qadapt.model.layers import list_adapters
from qadapt.model.model_merge import MergeReport, merge, unmerge, unwrap
from qadapt.model.summary import WrapSummary, summary
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
from qadapt.version import __version__

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
    "config_schema",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "export",
    "list_adapters",
    "load_adapter",
    "load_config",
    "load_peft_adapter",
    "merge",
    "merge_storage",
    "plugins",
    "save_adapter",
    "save_peft_adapter",
    "set_adapter",
    "summary",
    "unmerge",
    "unwrap",
    "wrap",
]
