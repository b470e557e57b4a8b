"""User-facing errors. The CLI prints these as one line (no traceback); any other exception is a bug."""






class TailforgeError(ValueError):
    """Bad input: the message names the file, field or value and says what to do."""


class ConfigError(TailforgeError):
    """An invalid setting (CLI flag or config field)."""


class NonFiniteError(TailforgeError):
    """A model produced NaN or Inf; the message names the step, the samples and (from the job) the shard."""


class CheckpointError(TailforgeError):
    """A model folder or checkpoint that cannot be read; the message names the file."""


class ShardError(TailforgeError):
    """A shard set or shard that cannot be written or read; the message names the file."""


class DatasetError(TailforgeError):
    """A dataset spec that cannot be resolved; the message names the spec, field or path."""


class StorageError(TailforgeError):
    """A storage URL that cannot be used; the message names the URL."""
