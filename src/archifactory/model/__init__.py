"""The model: configs, blocks, ``CausalLM``, presets and Hugging Face conversion."""

from archifactory.model.config import BlockConfig, LayerOverride, ModelConfig, load_model_config
from archifactory.model.lm import CausalLM, LMOutput, ModelCache

__all__ = ["BlockConfig", "CausalLM", "LMOutput", "LayerOverride", "ModelCache", "ModelConfig", "load_model_config"]
