"""Post-training: supervised fine-tuning on chat data (SFT) with one chat template for every model.

GRPO (reinforcement on verifiable tasks) is planned here next (issue 11)."""

from archifactory.posttrain.chat import ChatTemplate, add_chat_tokens, chat_reply, resize_vocab
from archifactory.posttrain.formats import load_records, to_messages
from archifactory.posttrain.sft import SFTRunConfig, SFTTrainer, load_sft_config, sft

__all__ = [
    "ChatTemplate",
    "SFTRunConfig",
    "SFTTrainer",
    "add_chat_tokens",
    "chat_reply",
    "load_records",
    "load_sft_config",
    "resize_vocab",
    "sft",
    "to_messages",
]
