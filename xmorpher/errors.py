"""The one exception type for problems a user can fix (bad files, shapes, configs, checkpoints).

The command line prints these as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class XMorpherError(Exception):
    """A user-facing error whose message says what is wrong and, where possible, what to do."""
