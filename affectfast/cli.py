"""The ``affectfast`` command line. Commands are thin: build a config, call a library function.

Bad input (``DataError``) prints one line naming file and line and exits with code 2.
"""

from __future__ import annotations

import functools
import sys

import click

from affectfast.errors import DataError


def exits_2_on_data_error(command):
    """Turn a DataError into a one-line message on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DataError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """affectfast: train facial-affect models on the whole of Aff-Wild2, fast.

    \b
    Typical flow:
      affectfast synth demo/tree --videos 40 --frames 200     # or use the real Aff-Wild2 tree
      affectfast pack demo/tree --out shards/demo
      affectfast verify shards/demo
      affectfast train shards/demo --tasks va,expr,au --out runs/demo
    """


# --- commands (each block is owned by one module; keep them thin) -------------------------------
