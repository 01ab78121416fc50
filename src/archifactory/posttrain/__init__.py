"""Post-training with one recipe for every architecture: supervised fine-tuning on chat data (SFT) with
one chat template, then GRPO on tasks with exact checkers."""

from archifactory.posttrain.chat import ChatTemplate, add_chat_tokens, chat_reply, resize_vocab
from archifactory.posttrain.formats import load_records, to_messages
from archifactory.posttrain.grpo import GRPORunConfig, GRPOTrainer, grpo, load_grpo_config
from archifactory.posttrain.grpo_loss import group_advantages, grpo_loss
from archifactory.posttrain.tasks import build_task
from archifactory.posttrain.sft import SFTRunConfig, SFTTrainer, load_sft_config, sft

__all__ = [
    "ChatTemplate",
    "GRPORunConfig",
    "GRPOTrainer",
    "SFTRunConfig",
    "SFTTrainer",
    "add_chat_tokens",
    "build_task",
    "chat_reply",
    "grpo",
    "grpo_loss",
    "group_advantages",
    "load_grpo_config",
    "load_records",
    "load_sft_config",
    "resize_vocab",
    "sft",
    "to_messages",
]
