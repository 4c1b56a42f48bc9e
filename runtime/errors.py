"""Typed errors of the runtime. Each message is one sentence that names the thing and the fix."""


class TeaCacheError(Exception):
    """Base class of every error this project raises on purpose."""


class CoefficientsError(TeaCacheError, ValueError):
    """A coefficients file (or name) that cannot be used: missing, malformed, or of another version."""


class UnsupportedModelError(TeaCacheError, ValueError):
    """A transformer class the runtime has no adapter for, or one that does not match the coefficients."""


class ConfigError(TeaCacheError, ValueError):
    """A setting out of its valid range (negative threshold, zero cap on skips, ...)."""
