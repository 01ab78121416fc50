"""Data: corpora -> tokenizer -> token shards -> packed, deterministic, resumable batches."""

from archifactory.data.corpora import CorpusConfig
from archifactory.data.loader import PackedLoader
from archifactory.data.shards import ShardSet, build_shards
from archifactory.data.tokenizer import Tokenizer, TokenizerConfig

__all__ = ["CorpusConfig", "PackedLoader", "ShardSet", "Tokenizer", "TokenizerConfig", "build_shards"]
