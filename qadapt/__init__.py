"""qadapt: parameter-efficient adapters on quantized PyTorch layers.

Methods (OFT, RandLora, ...) and backends (bitsandbytes int8/nf4/fp4, float, ...) are plugins
found through the entry-point groups ``qadapt.methods`` and ``qadapt.backends``. Importing
qadapt imports no plugin.
"""

from qadapt.errors import (
    AdapterStateError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    DuplicatePluginError,
    PluginError,
    PluginLoadError,
    QAdaptError,
    TargetError,
    UnknownPluginError,
    UnsafeMergeError,
)
from qadapt.layer import MergeResult, QuantAdapterLinear
from qadapt.protocols import API_VERSION, Backend, BackendCapabilities, Method, PluginOptions, QuantizedWeight
from qadapt.registry import PluginInfo, plugins

__version__ = "0.1.0"

__all__ = [
    "API_VERSION",
    "AdapterStateError",
    "Backend",
    "BackendCapabilities",
    "CapabilityError",
    "CheckpointError",
    "ConfigError",
    "DuplicatePluginError",
    "MergeResult",
    "Method",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PluginOptions",
    "QAdaptError",
    "QuantAdapterLinear",
    "QuantizedWeight",
    "TargetError",
    "UnknownPluginError",
    "UnsafeMergeError",
    "__version__",
    "plugins",
]
