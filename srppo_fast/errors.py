"""User-facing errors: one sentence naming the problem and the fix, printed without a traceback."""


class SrppoError(Exception):
    """Base class for mistakes a user can fix (config, data, files). The CLI prints the message alone."""


class ConfigError(SrppoError):
    """A config key, value or combination of options is wrong."""


class DataError(SrppoError):
    """A data file is missing or one of its lines is malformed."""


class CheckpointError(SrppoError):
    """A checkpoint is missing, incomplete or does not match the run."""


class TrainingError(SrppoError):
    """Training diverged (non-finite losses, gradients or weights): the run stops before saving garbage."""


class StorageError(SrppoError):
    """A write failed for want of space or of a working disk: the message names the path; what was saved before
    stays intact."""


class SamplerError(SrppoError):
    """The rollout sampler (vLLM) failed, hung past its timeout, or serves weights other than the trainer's."""
