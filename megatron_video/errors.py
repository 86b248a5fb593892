"""Exceptions shared across the package (kept free of imports to avoid cycles)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""
