"""The errors a user can cause and fix, shared by every CLI: a refused config, a refused artifact,
and the one-line usage error.

The CLIs print these as one line and exit 2; anything else is a bug and keeps its traceback.
"""
import argparse
import sys


class ConfigError(ValueError):
    """A model, build or runtime setting that cannot be honoured, worded as what is wrong and how
    to fix it. Raised where the value enters (a config.json, a flag, a manifest)."""


class ArtifactError(Exception):
    """An artifact that cannot be used here, worded with what to rebuild or fix."""


class CLIParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2, like every other user error
    of the llama-aot CLIs (argparse's own prints the whole usage block first)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
