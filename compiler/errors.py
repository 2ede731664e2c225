"""Errors a user can cause and fix: bad checkpoints, bad flags, unwritable outputs.

The CLIs print these as one line and exit 2; anything else is a bug and keeps its traceback.
"""


class BuildError(Exception):
    """A problem with the user's input to a build, worded as what is wrong and how to fix it."""
