"""The one error type that blames the user.

`InvalidInput` is raised where a problem with what the user gave is detected: the config
(`ConfigError`), the data (`DatasetError`), the model (`ModelNotFound`) or the reward
(`RewardErrorRateExceeded`). It fails a job at once as `invalid_input`, because retrying cannot
help. Anything else that goes wrong, a `ValueError` from deep inside a library included, is ours
or the machine's: a `training_error`, retried within the attempt limit.
"""

from __future__ import annotations


class InvalidInput(Exception):
    """Something the user must fix; the message says what and where."""
