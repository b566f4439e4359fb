"""The project's exceptions, one tree, so callers catch what they can act on.

    PanoramaError
     ├── RecordError      a signal file is missing, unreadable, too short or has no known leads
     ├── CheckpointError  a model file is unknown, truncated, corrupted or incompatible
     ├── ConfigError      a configuration file fails validation
     ├── BackendError     an inference or transport backend is missing or failed
     └── UpdateError      a fleet update is refused: signature, version, expiry, target,
                          artifact or dry-run (deploy/)

Errors raised by wfdb, ONNX Runtime, TensorRT or paho are translated at the boundary with
``raise ... from exc``. Bad arguments are plain ``ValueError`` with an actionable message.
"""


class PanoramaError(Exception):
    """Base of every error this project raises on purpose."""


class RecordError(PanoramaError):
    """A record cannot be used: missing, unreadable, too short, or no known leads."""


class CheckpointError(PanoramaError):
    """A checkpoint is unknown, truncated, corrupted or incompatible."""


class ConfigError(PanoramaError):
    """A configuration failed validation."""


class BackendError(PanoramaError):
    """An inference or transport backend is unavailable or failed."""


class UpdateError(PanoramaError):
    """A fleet update is refused: bad signature, not newer, expired, for another device,
    an artifact that does not match its manifest, or a model that fails its dry-run."""
