"""The compiler's user error, in the hierarchy the runtimes share (``flexdit_bundle.errors``);
the CLIs print its message as a single line and exit non-zero."""

from flexdit_bundle.errors import ArgumentError, BundleError, FlexditError, PromptError


class UserError(FlexditError):
    """A problem with the user's input (file, flag, checkpoint, bundle), not a bug."""


__all__ = ["UserError", "ArgumentError", "BundleError", "FlexditError", "PromptError"]
