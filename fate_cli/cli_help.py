"""How the command line reads in --help and in usage errors.

Usage lines name arguments as most tools do (`fate run [OPTIONS] MODEL [PROMPT]`), flags carry no type,
and options show their metavar (N, SIZE, POLICY) instead of a Python type. A usage error (unknown option,
missing argument, value out of range) is one line, `error: <what>; <what to do>`, like every other error.
"""

from __future__ import annotations

import typer.core
from typer import Abort

# typer carries its own copy of click; its exceptions and parameter classes are these, not the click package's
from typer._click import core as click
from typer._click.exceptions import ClickException, NoArgsIsHelpError, NoSuchOption, UsageError

__all__ = ["Abort", "ClickException", "FateCommand", "FateGroup", "NoArgsIsHelpError", "usage_error_line"]


def _plain(command: click.Command) -> None:
    for param in command.params:
        if isinstance(param, typer.core.TyperArgument):
            param.display_type_rich = lambda ctx: None  # the help column says what MODEL is; no "<str>"
        elif isinstance(param, typer.core.TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""  # a flag takes no value: nothing after it


class _HelpFlag:
    def get_help_option(self, ctx: click.Context):  # noqa: ANN201 - click's Option
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""  # --help is a flag too
        return option


class FateCommand(_HelpFlag, typer.core.TyperCommand):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - click's signature
        super().__init__(*args, **kwargs)
        _plain(self)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class FateGroup(_HelpFlag, typer.core.TyperGroup):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - click's signature
        super().__init__(*args, **kwargs)
        _plain(self)


def usage_error_line(err: ClickException, prog: str = "fate") -> str:
    """click's usage error -> `error: <what>; <what to do>` on one line."""
    ctx = getattr(err, "ctx", None)
    path = ctx.command_path if ctx is not None else prog
    what = " ".join(err.format_message().split()).rstrip(".")
    what = (what[:1].lower() + what[1:]).replace("' / '", "/")
    if isinstance(err, NoSuchOption) and err.possibilities:
        what = f"no such option {err.option_name}; did you mean {' or '.join(sorted(err.possibilities))}?"
        return f"error: {what} (`{path} -h` lists the options)"
    if isinstance(err, UsageError):
        return f"error: {what}; see `{path} -h`"
    return f"error: {what}"
