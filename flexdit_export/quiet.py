"""Silence libraries that narrate on stdout and through logging/warnings while they work (the
torch.onnx exporter, ONNX Runtime's quantisation tools): the CLIs print their own progress."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet(*logger_names: str):
    """Loggers ``logger_names`` (default: the root logger) at ERROR, warnings ignored and stdout
    discarded for the duration; everything restored afterwards."""
    loggers = [logging.getLogger(n) for n in logger_names] if logger_names else [logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
