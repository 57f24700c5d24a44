"""The compiler's user error, in the hierarchy the runtimes share (``flexdit_bundle.errors``);
the CLIs print its message as a single line and exit non-zero."""

from flexdit_bundle.errors import ArgumentError, BundleError, FlexditError, PromptError


class UserError(FlexditError):
    """A problem with the user's input (file, flag, checkpoint, bundle), not a bug."""


class OptionError(UserError, ArgumentError):
    """A ``ConvertOptions`` value refused: ``param`` is the field; flexdit-export says it as the
    flag the field declares (``options.flag_names``)."""


__all__ = ["UserError", "OptionError", "ArgumentError", "BundleError", "FlexditError", "PromptError"]
