"""Exceptions shared across the package (kept free of imports to avoid cycles)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


class CheckpointMismatch(KeyError):
    """Keys or shapes of a checkpoint that do not fit the model, listed by name."""

    def __str__(self) -> str:
        return str(self.args[0])
