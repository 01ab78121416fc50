"""Name -> config class registries.

Every component config (a mixer, an FFN, a norm, a positional encoding) registers itself under its
``kind``. Configs that hold a component use :func:`archifactory.config.component_field`, which looks the
kind up here when the config is validated, so a component registered after import (a user's own mixer)
is accepted everywhere a built-in one is.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """A named table of component config classes, keyed by their ``kind`` literal."""

    def __init__(self, name: str, key: str = "kind") -> None:
        self.name = name
        self.key = key
        """The field whose value names the class (``kind``; ``name`` for optimizers, as in their YAML)."""
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: register ``cls`` under the default value of its ``kind`` (or ``key``) field."""
        kind = cls.model_fields[self.key].default
        if not isinstance(kind, str):
            raise TypeError(f"{cls.__name__} needs a string default for its `{self.key}` field")
        if kind in self._classes and self._classes[kind] is not cls:
            raise ValueError(f"{self.name} kind {kind!r} is already registered to {self._classes[kind].__name__}")
        self._classes[kind] = cls
        return cls

    def get(self, kind: str) -> T:
        try:
            return self._classes[kind]
        except KeyError:
            raise KeyError(f"unknown {self.name} kind {kind!r}; valid kinds: {', '.join(self.kinds())}") from None

    def kinds(self) -> list[str]:
        return sorted(self._classes)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._classes.items())

    def __contains__(self, kind: object) -> bool:
        return kind in self._classes

    def __iter__(self):
        return iter(self.kinds())

    def __len__(self) -> int:
        return len(self._classes)


MIXERS: Registry = Registry("mixer")
FFNS: Registry = Registry("ffn")
NORMS: Registry = Registry("norm")
POSITIONS: Registry = Registry("position")
CORPORA: Registry = Registry("corpus")
TOKENIZERS: Registry = Registry("tokenizer")
OPTIMIZERS: Registry = Registry("optimizer", key="name")
SCHEDULES: Registry = Registry("schedule")
MODELS: Registry = Registry("model")
"""Model kinds: ``transformer`` (:class:`~archifactory.model.lm.CausalLM`), and hierarchical models
(``megabyte``, ``hourglass``) whose configs extend :class:`~archifactory.model.config.ModelConfig`."""

register_mixer: Callable = MIXERS.register
register_ffn: Callable = FFNS.register
register_norm: Callable = NORMS.register
register_position: Callable = POSITIONS.register
register_corpus: Callable = CORPORA.register
register_tokenizer: Callable = TOKENIZERS.register
register_optimizer: Callable = OPTIMIZERS.register
register_schedule: Callable = SCHEDULES.register
register_model: Callable = MODELS.register
