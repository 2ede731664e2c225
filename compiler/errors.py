"""Errors in a build's input that the user can fix: bad checkpoints, unwritable outputs."""


class BuildError(Exception):
    """A problem with the user's input to a build, worded as what is wrong and how to fix it."""
