"""TeaCache runtime: skip a diffusers transformer's block stack on steps where its output barely changes.

    from runtime import TeaCache
    cache = TeaCache.from_coefficients("qwen_image").apply(pipe)

Depends on torch and diffusers only.
"""

from .adapters import ADAPTERS, BlockCall, ModelAdapter, adapter_for, register_adapter, supported_classes
from .cache import TeaCache
from .coefficients import (
    SCHEMA,
    Coefficients,
    DecisionDefaults,
    ThresholdRow,
    available_names,
    coefficients_from_dict,
    load_coefficients,
    save_coefficients,
)
from .decision import DecisionRule, replay
from .errors import CoefficientsError, ConfigError, TeaCacheError, UnsupportedModelError
from .hooks import rel_l1
from .stats import BranchStats, StepRecord

__all__ = [
    "ADAPTERS",
    "BlockCall",
    "BranchStats",
    "Coefficients",
    "CoefficientsError",
    "ConfigError",
    "DecisionDefaults",
    "DecisionRule",
    "ModelAdapter",
    "SCHEMA",
    "StepRecord",
    "TeaCache",
    "TeaCacheError",
    "ThresholdRow",
    "UnsupportedModelError",
    "adapter_for",
    "available_names",
    "coefficients_from_dict",
    "load_coefficients",
    "register_adapter",
    "rel_l1",
    "replay",
    "save_coefficients",
    "supported_classes",
]
