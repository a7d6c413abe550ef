"""Exceptions raised by osscar-opt.

Every error a user can cause carries a one-line message that names the
problem and the fix.
"""


class OsscarError(Exception):
    """Base class of every error raised on purpose by osscar-opt."""


class InstanceError(OsscarError, ValueError):
    """The data of an instance is invalid (shapes, NaN, not PD, keep, groups)."""


class InstanceFileError(OsscarError, ValueError):
    """An instance file is corrupt, truncated, of another format or mismatched."""


class SolverError(OsscarError):
    """A solver was asked for something it cannot do, or failed numerically."""


class PruneError(OsscarError, ValueError):
    """apply() was asked for something it cannot do; the model is untouched."""


class CliError(OsscarError, ValueError):
    """A command-line argument is invalid (checked before any long work starts)."""


class MissingPackageError(OsscarError, ImportError):
    """An optional package is needed for this feature and is not installed."""


def require(module: str, extra: str, feature: str):
    """Import an optional `module` or raise a one-line error naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingPackageError(
            f"{feature} needs the package '{module}', which is not installed: "
            f"pip install 'osscar-opt[{extra}]'"
        ) from exc
