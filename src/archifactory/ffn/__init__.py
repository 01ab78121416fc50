"""Feed-forward layers. Importing this package registers every built-in FFN."""

from archifactory.ffn import mlp, moe  # noqa: F401  (registers mlp, glu, swiglu, geglu, moe)
from archifactory.ffn.base import FFN, FFNConfig

__all__ = ["FFN", "FFNConfig"]
