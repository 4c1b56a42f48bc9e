"""TeaCache runtime: skip a diffusers transformer's block stack on steps where its output barely changes.

    from runtime import TeaCache
    cache = TeaCache.from_coefficients("qwen_image").apply(pipe)

Depends on torch and diffusers only. Names are imported on first use, so that ``runtime.errors`` and
``runtime.coefficients`` (and the command lines built on them) load without torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Every public name and the submodule that defines it.
_EXPORTS = {
    "ADAPTERS": "adapters",
    "BlockCall": "adapters",
    "ModelAdapter": "adapters",
    "adapter_for": "adapters",
    "register_adapter": "adapters",
    "supported_classes": "adapters",
    "TeaCache": "cache",
    "SCHEMA": "coefficients",
    "Coefficients": "coefficients",
    "DecisionDefaults": "coefficients",
    "ThresholdRow": "coefficients",
    "available_names": "coefficients",
    "coefficients_from_dict": "coefficients",
    "load_coefficients": "coefficients",
    "save_coefficients": "coefficients",
    "DecisionRule": "decision",
    "replay": "decision",
    "CoefficientsError": "errors",
    "ConfigError": "errors",
    "TeaCacheError": "errors",
    "UnsupportedModelError": "errors",
    "rel_l1": "hooks",
    "BranchStats": "stats",
    "StepRecord": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
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
