"""The Hugging Face stack: a wrapped transformers model trains in ``Trainer`` / TRL and saves like PEFT.

Registered into :mod:`qadapt.model.integrations` when qadapt is first used; importing it imports
nothing of transformers (a model can only be a transformers model once transformers is imported).
Imports model and persist; nothing but the package face imports it.
"""

from qadapt.hf.integration import attach, detach, is_transformers_model
from qadapt.model import integrations as _integrations

_integrations.register(after_wrap=attach, after_unwrap=detach)

__all__ = ["attach", "detach", "is_transformers_model"]
