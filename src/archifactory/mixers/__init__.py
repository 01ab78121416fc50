"""Sequence mixers. Importing this package imports every module in it, and each registers its mixers,
so a new family is one new file here."""

import importlib
import pkgutil

from archifactory.mixers.base import Mixer, MixerConfig

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Mixer", "MixerConfig"]
