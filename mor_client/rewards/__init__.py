"""Client reward models: a zoo of architectures behind one interface, a DP-SGD (Opacus) trainer, a model
folder with a model card, and :class:`RewardModelScorer` to plug a trained model into FederationClient."""

from .features import Vocab, default_vocab, encode_batch, encode_pairs
from .models import (ARCHITECTURES, CNNRewardModel, LoRARewardModel, RewardModule, ViTRewardModel, build_model,
                     make_dp_compatible, register_architecture)
from .scorer import RewardModelScorer
from .store import from_pretrained, load_model_dir, read_card, save_model_dir, save_pretrained
from .config import DEMO_PRESETS, TrainConfig, demo_config
from .pretrain import public_pretrain
from .trainer import TrainResult, pairwise_accuracy, train_reward_model

__all__ = [
    "Vocab", "default_vocab", "encode_batch", "encode_pairs", "ARCHITECTURES", "CNNRewardModel",
    "LoRARewardModel", "RewardModule", "ViTRewardModel", "build_model", "make_dp_compatible",
    "register_architecture", "RewardModelScorer", "load_model_dir", "read_card", "save_model_dir",
    "from_pretrained", "save_pretrained",
    "DEMO_PRESETS", "TrainConfig", "TrainResult", "demo_config", "pairwise_accuracy", "public_pretrain",
    "train_reward_model",
]
