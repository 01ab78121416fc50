"""archifactory: fair, controlled ablation studies of small decoder language-model architectures."""

from archifactory.config import ConfigError, apply_overrides, dump_config, load_yaml, to_yaml
from archifactory.model import CausalLM, LMOutput, ModelConfig, load_model_config
from archifactory.registry import FFNS, MIXERS, NORMS, POSITIONS

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "ConfigError",
    "FFNS",
    "LMOutput",
    "MIXERS",
    "ModelConfig",
    "NORMS",
    "POSITIONS",
    "apply_overrides",
    "dump_config",
    "load_model_config",
    "load_yaml",
    "to_yaml",
]
