"""Feed-forward layers. Importing this package imports every module in it, and each registers its FFNs
(mlp, glu, swiglu, geglu, moe, ...)."""

import importlib
import pkgutil

from archifactory.ffn.base import FFN, FFNConfig

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FFN", "FFNConfig"]
