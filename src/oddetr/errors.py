"""User-facing errors: one line naming the file, key or image; the CLI prints them without a traceback."""


class OddetrError(Exception):
    """Base class for errors caused by user input (data, config, checkpoint)."""


class ConfigError(OddetrError):
    """A bad config key or value."""


class DataError(OddetrError):
    """A missing, corrupt or malformed data file, image or annotation."""


class CheckpointError(OddetrError):
    """A missing, corrupt or unsafe checkpoint."""


class TrainingError(OddetrError):
    """Training cannot go on (non-finite costs or losses, ...)."""
