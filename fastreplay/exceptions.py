"""Every error fastreplay raises on purpose. The CLI turns these into one-line messages."""


class FastReplayError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(FastReplayError):
    """A configuration value is missing, malformed or inconsistent."""


class DataError(FastReplayError):
    """The data set is missing, malformed or does not match the configuration."""


class StoreError(FastReplayError):
    """The run store is missing, belongs to another config, is damaged, is locked by another
    process, or cannot be written (read-only directory, full disk)."""


class DiskFullError(StoreError):
    """The disk filled up while writing the run store; everything committed before stays valid."""


class TrainingError(FastReplayError):
    """Training diverged (NaN/inf) or could not proceed."""


class ReplayError(FastReplayError):
    """The reverse pass cannot be carried out exactly (e.g. non-reproducible forward steps)."""


class KernelError(FastReplayError):
    """The compiled extension was asked for but is unavailable or got bad arguments."""


class PeerStopped(FastReplayError):
    """Under torchrun, another process of the job stopped (its own error says why), so this one
    cannot finish the collective step it was waiting in."""


class OutputError(FastReplayError):
    """The command's output could not be written to stdout (closed, a full disk, a closed pipe):
    reported with a non-zero exit instead of lost in silence."""


class TaskExited(FastReplayError):
    """The user's task code called sys.exit while a command ran."""
