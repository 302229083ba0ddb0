"""One exception type for user-facing errors, so the CLI prints one clear line and exits non-zero."""


class PflmError(Exception):
    """A problem with the user's input or environment. The message names the problem and the fix."""


class ConfigError(PflmError):
    """Invalid recipe / config value."""


class DataError(PflmError):
    """Invalid or missing data."""


class AggregationFailed(PflmError):
    """A round's aggregation could not complete safely; the global model and accountant stay untouched."""


class NoContributions(AggregationFailed):
    """No device's update reached the aggregate this round: the sum is over an empty set. Without DP the round
    fails; a central-DP run releases noise on the zero sum instead (whether anyone contributed — e.g. every
    update was NaN — is a fact about the users' data, so it must not decide whether a release happens)."""
