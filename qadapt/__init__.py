"""qadapt: parameter-efficient adapters on quantized PyTorch layers.

``qadapt.export`` is the export function; the module's other contents are imported with
``from qadapt.export import ...``.

Methods (OFT, RandLora, ...) and backends (bitsandbytes int8/nf4/fp4, float, ...) are plugins
found through the entry-point groups ``qadapt.methods`` and ``qadapt.backends``. Importing
qadapt imports no plugin.
"""

from qadapt.checkpoint import load_adapter, save_adapter
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
from qadapt.export import ExportReport, export
from qadapt.layer import MergeResult, QuantAdapterLinear
from qadapt.merge_ops import MergeReport, merge, unmerge, unwrap
from qadapt.merging import RequantizeMode, merge_storage
from qadapt.model_ops import (
    WrapSummary,
    add_adapter,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    list_adapters,
    set_adapter,
    summary,
)
from qadapt.peft_interop import load_peft_adapter, save_peft_adapter
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
from qadapt.registry import PluginInfo, plugins
from qadapt.wrap import wrap

__version__ = "0.1.0"

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
