"""One exception type for every failure a user can cause; the CLIs print its message as a
single line and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input (file, flag, checkpoint, bundle), not a bug."""
