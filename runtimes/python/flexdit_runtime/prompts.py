"""prompts.txt -> class ids. One prompt per line: a class name (case-insensitive, any of its
comma-separated aliases) or a class id; '#' starts a comment; blank lines are ignored."""

from __future__ import annotations

import difflib
from pathlib import Path


from flexdit_bundle.errors import PromptError  # noqa: E402,F401  (re-exported: the API raises it from here)


ECHO_LIMIT = 60
# A prompt file is a list of class names or ids, one per line: 16 MiB is over a million prompts.
# Reading stops there, so /dev/zero or a mistaken multi-gigabyte file is one error, not all memory.
MAX_PROMPT_FILE_BYTES = 16 << 20


def shown(value, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, capped: a 10 MB prompt line must not come back
    whole in the one line that reports it."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    return repr(text[:limit]) [:-1] + f"...' ({len(text)} characters)"


class ClassIndex:
    def __init__(self, class_names: list | None, num_classes: int):
        self.names = class_names
        self.num_classes = num_classes
        self.lookup = {}
        for i, full in enumerate(class_names or []):
            for alias in [full] + [a.strip() for a in full.split(",")]:
                self.lookup.setdefault(alias.lower(), i)

    def resolve(self, text: str, where: str = "") -> int:
        """A class id (ASCII digits only: '٣' is a name, as in every runtime) or a class name."""
        key = text.strip()
        digits = key.lstrip("-")
        if digits.isascii() and digits.isdigit():
            one_sign = len(digits) >= len(key) - 1  # '--5' is no number
            i = int(key) if len(key) < 20 and one_sign else None  # int() refuses more than 4300 digits
            if i is None or not 0 <= i < self.num_classes:
                raise PromptError(f"{where}class id {i if i is not None else shown(key)} is outside "
                                  f"0..{self.num_classes - 1}")
            return i
        if key.lower() in self.lookup:
            return self.lookup[key.lower()]
        if not self.names:
            raise PromptError(f"{where}{shown(key)} is not a class id, and this bundle has no class names")
        close = difflib.get_close_matches(key.lower(), list(self.lookup), n=3, cutoff=0.6) if len(key) < 200 else []
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise PromptError(f"{where}unknown class {shown(key)}{hint}")

    def label(self, i: int) -> str:
        return self.names[i].split(",")[0].strip() if self.names else str(i)


def read_prompts(path) -> list[str]:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)
        if len(data) > MAX_PROMPT_FILE_BYTES:
            raise PromptError(f"prompt file {p} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB, more than a list "
                              "of prompts needs (split it into several runs)")
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not a prompt
    except FileNotFoundError:
        raise PromptError(f"prompt file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompt file {p}: {e}") from None
    prompts = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            prompts.append(line)
    if not prompts:
        raise PromptError(f"prompt file {p} has no prompts (only blank lines or comments)")
    return prompts
