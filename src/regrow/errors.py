"""One exception family for every user-facing failure.

Everything regrow raises on bad input derives from :class:`RegrowError`, so a caller (and the CLI) can catch
the family and show the message without a traceback.
"""


class RegrowError(Exception):
    """Base of all errors regrow raises on bad input or unusable state."""


class ConfigError(RegrowError, ValueError):
    """An option is out of range or names something unknown (model, method, distribution, ...)."""


class DataError(RegrowError):
    """A dataset is missing, unreadable or too small for the request."""


class CheckpointError(RegrowError):
    """A checkpoint is missing, corrupt, or belongs to another architecture or configuration."""


class ExportError(RegrowError):
    """A physical export would not compute what the masked model computes; nothing is saved."""


class DistributedError(RegrowError):
    """Processes of one data-parallel run disagree (masks differ between ranks), or cannot run together."""


class TrainingDivergedError(RegrowError):
    """The loss became NaN or infinite; nothing was saved from the broken state."""


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float, or raise if it is not in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1) (fraction of weights set to zero), got {value}")
    return value


def unknown(kind: str, name: str, known) -> ConfigError:
    """The error for a name that is not in a registry, listing the names that are."""
    return ConfigError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
