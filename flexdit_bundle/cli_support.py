"""What the command lines (``flexdit-run``, ``flexdit-serve``, ``flexdit-export``) share on top of click: parameter
types and one-line usage errors in the wording scripts and the C++ runtime's tests already
match (``argument --steps: invalid int value: 'x'``), exit codes (2 for every user error, 130
for Ctrl-C), and the ``--json`` / ``-q`` pair declared once. click gives shell completion:
``eval "$(_FLEXDIT_RUN_COMPLETE=bash_source flexdit-run)"`` (likewise ``_FLEXDIT_EXPORT_COMPLETE``).

It lives in the contract package, beside the errors it reports, because the compiler and the
runtimes each install it and neither may import the other."""

from __future__ import annotations

import sys

import click


class Int(click.ParamType):
    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"invalid int value: {value!r}", param, ctx)


class Float(click.ParamType):
    name = "number"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            self.fail(f"invalid float value: {value!r}", param, ctx)


class Choice(click.Choice):
    """click's Choice with argparse's refusal text."""

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        self.fail(f"invalid choice: {value!r} (choose from {', '.join(repr(c) for c in self.choices)})", param, ctx)


INT, FLOAT = Int(), Float()


def output_options(f):
    """``--json`` and ``-q``, the same on every command: --json puts the result on stdout as JSON,
    -q leaves nothing but errors."""
    f = click.option("-q", "--quiet", is_flag=True, help="print nothing but errors")(f)
    return click.option("--json", "json_out", is_flag=True, help="print the result as JSON on stdout")(f)


def _name(param) -> str:
    if param is None:
        return "argument"
    if isinstance(param, click.Argument):
        return param.name
    return "/".join(param.opts)


def usage_text(e: click.UsageError) -> str:
    """click's refusal in argparse's words (the one-line form every failure has)."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
    if no_args and isinstance(e, no_args):
        return "the following arguments are required: command"
    if isinstance(e, click.MissingParameter):
        return f"the following arguments are required: {_name(e.param)}"
    if isinstance(e, click.NoSuchOption):
        return f"unrecognized arguments: {e.option_name}"
    if isinstance(e, click.BadParameter):
        return f"argument {_name(e.param)}: {e.message}"
    if isinstance(e, click.BadOptionUsage):
        if "requires an argument" in e.message:
            return f"argument {e.option_name}: expected one argument"
        return e.message
    msg = e.message
    if msg.startswith("Got unexpected extra argument"):
        return "unrecognized arguments: " + msg[msg.find("(") + 1:msg.rfind(")")]
    if msg.startswith("Missing command"):
        return "the following arguments are required: command"
    if msg.startswith("No such command"):
        return "argument command: invalid choice: " + msg[len("No such command "):].rstrip(".")
    return msg


def run(command: click.Command, prog: str, argv=None, error_prefix=None) -> int:
    """Run a click command with the project's exit rules; -> the exit status."""
    try:
        rv = command.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.UsageError as e:
        where = prog
        if isinstance(command, click.Group):  # name the subcommand, as its own errors do
            tokens = sys.argv[1:] if argv is None else list(argv)
            sub = next((t for t in tokens if not t.startswith("-")), None)
            if sub in command.commands:
                where = f"{prog} {sub}"
        print(f"{where}: error: {usage_text(e)} (see --help)", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        print(f"{error_prefix or prog}: error: interrupted", file=sys.stderr)
        return 130
    return rv if isinstance(rv, int) else 0
