"""User-facing errors. The CLI prints these as one line (no traceback); any other exception is a bug."""


class TailforgeError(ValueError):
    """Bad input: the message names the file, field or value and says what to do."""


class ConfigError(TailforgeError):
    """An invalid setting (CLI flag or config field)."""


class NonFiniteError(TailforgeError):
    """A model produced NaN or Inf; the message names the step, the samples and (from the job) the shard."""
