"""Sequence mixers. Importing this package registers every built-in mixer."""

from archifactory.mixers import attention  # noqa: F401  (registers `attention`)
from archifactory.mixers.base import Mixer, MixerConfig

__all__ = ["Mixer", "MixerConfig"]
