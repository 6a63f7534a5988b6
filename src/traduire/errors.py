"""Errors a user can cause and fix. The CLI prints them as one line and exits non-zero;
anything else is a bug and keeps its traceback."""


class TraduireError(Exception):
    """A problem with the user's input, files or settings, stated in one line."""


class ConfigError(TraduireError):
    """A config file or `--set` override names an unknown key or holds a bad value."""


class DataError(TraduireError):
    """A corpus file is missing, misaligned, unreadable or empty after cleaning."""


class CheckpointError(TraduireError):
    """A checkpoint or run directory cannot be used (corrupt, foreign, or from a newer version)."""
