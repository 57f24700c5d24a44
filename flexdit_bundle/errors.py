"""The errors a user can cause, one hierarchy for the library and every command line.

Each is one line that names what to fix; a CLI prints it as ``PROG CMD: error: MESSAGE`` and
exits with status 2, so scripts and the C++ runtime's tests can match the wording. The library
names its own parameter (``ArgumentError.param``, a keyword of the Python API); a command line
whose flag is spelled differently maps it with ``ArgumentError.message``. Torch-free, like the
rest of the contract package, because both the compiler and the runtimes raise these.
"""

from __future__ import annotations

from collections.abc import Mapping


class FlexditError(Exception):
    """Base of every failure the user can fix (input, flag, file, bundle), as opposed to a bug."""


class BundleError(FlexditError):
    """The bundle cannot be trusted or used, or a request cannot run on it; the message says why
    and what to do."""


class ArgumentError(BundleError):
    """A value passed to a library call is refused. ``param`` is the keyword as the library
    spells it (``cfg_scale``); ``problem`` is the rest of the sentence. A BundleError, so callers
    that catch the runtime's documented error keep catching it."""

    def __init__(self, param: str, problem: str):
        self.param = param
        self.problem = problem
        super().__init__(self.message())

    def __reduce__(self):  # pickled across processes (the server's workers): rebuilt from both parts
        return type(self), (self.param, self.problem)

    @staticmethod
    def flag(param: str) -> str:
        """The flag both CLIs spell a keyword as unless they say otherwise (``cfg_scale`` -> ``--cfg-scale``)."""
        return "--" + param.replace("_", "-")

    def message(self, flags: Mapping[str, str] | None = None) -> str:
        """The one-line message with the parameter spelled as the caller's flag (``flags``:
        library keyword -> flag; absent keywords use ``flag``)."""
        name = (flags or {}).get(self.param) or self.flag(self.param)
        return f"{name}{'' if self.problem.startswith(':') else ' '}{self.problem}"


class PromptError(FlexditError, ValueError):
    """A prompt (class name or id, prompt file line) that the bundle's classes cannot answer."""


__all__ = ["FlexditError", "BundleError", "ArgumentError", "PromptError"]
