"""End-to-end quality gates: plug-ins that ``convert`` runs on the finished bundle before it
is published. The compiler knows only this protocol; a gate lives with the model it judges
(the Fashion-MNIST gate in the optional ``flexdit_fashion`` package) and is imported lazily,
by name, only when a conversion asks for it."""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from .errors import UserError

# Gates the CLI can name; any other "module:attribute" reference also loads.
KNOWN_GATES = {"fashion-mnist": "flexdit_fashion.quality:FashionMnistGate"}


@runtime_checkable
class QualityGate(Protocol):
    name: str

    def check_model(self, cfg) -> None:
        """Refuse (UserError) a model the gate cannot judge, before anything is exported."""

    def run(self, bundle, *, seed: int, log) -> dict:
        """Judge the bundle about to be published (a ``flexdit_bundle.Bundle`` preview); -> a
        report with ``passed`` (bool) and ``verdict`` (one line), recorded in the manifest."""


def load_gate(name: str, **settings) -> QualityGate:
    """The gate called ``name`` (a KNOWN_GATES key or "module:attribute"), built with ``settings``."""
    ref = KNOWN_GATES.get(name, name)
    module, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name.split(".")[0]):
            raise UserError(f"the {name} quality gate needs the optional package {module.split('.')[0]} "
                            "(pip install 'flexdit-export[fashion]')") from None
        raise
    except AttributeError:
        raise UserError(f"quality gate {ref!r} not found") from None
    return factory(**settings)
