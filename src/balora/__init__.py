"""balora: BA-LoRA (Bias-Alleviating Low-Rank Adaptation, arXiv 2408.04556) for Hugging Face models.

from balora import BALoRAConfig, BALoRATrainer, get_balora_model, pretrained_teacher
"""

from balora.adapter import get_balora_model
from balora.config import BALoRAConfig
from balora.teacher import pretrained_teacher
from balora.trainer import BALoRATrainer

__version__ = "0.1.0"

__all__ = ["BALoRAConfig", "BALoRATrainer", "__version__", "get_balora_model", "pretrained_teacher"]
