"""Messages for the user: one line each on stderr, written through tqdm so progress bars survive.

Progress bars are tqdm everywhere (on stderr, only on the main rank); everything else the package
tells the user goes through :func:`say`. Results (tables, summaries) are the CLI's to print on
stdout.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def say(message: str) -> None:
    """Print one status line on stderr without breaking an active tqdm bar."""
    tqdm.write(message, file=sys.stderr)
