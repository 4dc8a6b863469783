"""The detectors and CLIP defenses fastbd offers, by name: what the ``fastbd`` command and the
demos look methods up in. A new one is a new package plus one line here
(docs/contributing.md)."""

from __future__ import annotations

from collections.abc import Callable

from fastbd.detection import Config, Detector

DETECTORS: dict[str, Callable[[Config | None], Detector]] = {}
"""Name → ``Detector`` factory taking a ``Config`` (e.g. ``fastbd.poisoncam.PoisonCAM``)."""


def register_detector(name: str, factory: Callable[[Config | None], Detector]) -> None:
    """Offer ``factory`` as detector ``name`` (refuses a name already taken)."""
    if name in DETECTORS:
        raise ValueError(f"a detector named {name!r} is already registered")
    DETECTORS[name] = factory


def detector(name: str, config: Config | None = None) -> Detector:
    """The registered detector ``name`` with ``config``; an unknown name raises ``ValueError``
    listing the known ones."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    return DETECTORS[name](config)


def _register_builtins() -> None:
    from fastbd.patchsearch import PatchSearch
    from fastbd.poisoncam import PoisonCAM

    register_detector("poisoncam", PoisonCAM)
    register_detector("patchsearch", PatchSearch)


_register_builtins()
