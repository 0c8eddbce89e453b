"""`python -m fate_cli` and the `fate` console script (pyproject: fate_cli.__main__:main).

Ctrl-C is caught from the first instant, while the CLI still imports: importing it (typer, rich, torch on
most commands) takes a noticeable fraction of a second, and a KeyboardInterrupt then would escape any
handler inside it as a traceback. This module imports nothing heavy itself, so its handler exists first.
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


if __name__ == "__main__":
    main()
