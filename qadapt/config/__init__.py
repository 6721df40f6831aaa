"""Config: :class:`QAdaptConfig` and its plugin specs, validation, the JSON Schema and file readers.

``model`` holds the pydantic models and the two-step validation (resolve the plugin, then its
options); ``sources`` one small, bounded reader per file format; ``schema`` the JSON Schema.
Imports errors, protocols and plugins only.
"""

from qadapt.config.model import (
    ALL_LINEAR,
    AUTO_BACKEND,
    REGEX_PREFIX,
    PluginSpec,
    QAdaptConfig,
    check_adapter_name,
    load_config,
    validate_config,
    validate_plugin_options,
)
from qadapt.config.schema import config_schema
from qadapt.errors import ConfigValidationError

__all__ = [
    "ALL_LINEAR",
    "AUTO_BACKEND",
    "REGEX_PREFIX",
    "ConfigValidationError",
    "PluginSpec",
    "QAdaptConfig",
    "check_adapter_name",
    "config_schema",
    "load_config",
    "validate_config",
    "validate_plugin_options",
]
