"""Errors a user can cause and fix: bad checkpoints, bad flags, unwritable outputs.

The CLIs print these as one line and exit 2; anything else is a bug and keeps its traceback.
"""
import argparse
import sys


class BuildError(Exception):
    """A problem with the user's input to a build, worded as what is wrong and how to fix it."""


class CLIParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2, like every other user error
    of the llama-aot CLIs (argparse's own prints the whole usage block first)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
