"""One exception type for user-facing errors, so the CLI prints one clear line and exits non-zero."""


class PflmError(Exception):
    """A problem with the user's input or environment. The message names the problem and the fix."""


class ConfigError(PflmError):
    """Invalid recipe / config value."""


class DataError(PflmError):
    """Invalid or missing data."""


class AggregationFailed(PflmError):
    """A round's aggregation could not complete safely; the global model and accountant stay untouched."""
