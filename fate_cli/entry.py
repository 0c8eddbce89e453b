"""The `fate` console script's entry point: Ctrl-C is caught from the first instant, while the CLI still imports.

Importing the CLI (typer, rich, torch on most commands) takes a noticeable fraction of a second; a
KeyboardInterrupt then would escape any handler inside it as a traceback. This module imports nothing
heavy itself, so its handler exists before that work starts.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from fate_cli.app import main as app_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    app_main()
