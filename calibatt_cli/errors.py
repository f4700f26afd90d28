"""The one user-facing error type. `cli.main` turns it into a single line and a non-zero exit."""


class CalibattError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 2


class ConfigError(CalibattError):
    pass


class BundleError(CalibattError):
    pass


class CacheError(CalibattError):
    pass


class ModelError(CalibattError):
    pass
