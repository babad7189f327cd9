"""ds-model: the DeepSeek model family (LLM/Coder, V2, V3) for loading, generation and training."""

from ds_lora import LoraConfig

from ds_model.attention_pattern import ATTENTION_KINDS, AttentionPattern
from ds_model.auto import AutoModel, from_config, from_pretrained
from ds_model.cache import PagedKVCache, StaticKVCache
from ds_model.config import PRESETS, SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig, RopeScaling
from ds_model.default_model import DefaultModelNotFound, find_default_model
from ds_model.generation import generate, stream
from ds_model.loading import (
    CheckpointError,
    MissingShardError,
    ShapeMismatchError,
    load_adapter,
    parameter_counts,
    save_pretrained,
)
from ds_model.model import CausalLMOutput, DeepSeekForCausalLM
from ds_model.protocol import CausalLM, ModelRunnerProtocol
from ds_model.runner import ModelRunner, SequenceBatch, num_blocks_for_memory
from ds_model.sampling import Sampled, SamplingParams, sample
from ds_model.tensor_parallel import (
    allowed_tensor_parallel_sizes,
    check_tensor_parallel_size,
    shard_model,
)
from ds_model.tokenizer import Tokenizer, load_tokenizer
from ds_model.training import (
    DistillationTrainer,
    DPOTrainer,
    Trainer,
    TrainingConfig,
    TrainResult,
)

__version__ = "0.2.0"

__all__ = [
    "ATTENTION_KINDS",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionPattern",
    "AutoModel",
    "CausalLM",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "DPOTrainer",
    "DeepSeekForCausalLM",
    "DefaultModelNotFound",
    "DistillationTrainer",
    "LoraConfig",
    "MissingShardError",
    "ModelConfig",
    "ModelRunner",
    "ModelRunnerProtocol",
    "PagedKVCache",
    "RopeScaling",
    "Sampled",
    "SamplingParams",
    "SequenceBatch",
    "ShapeMismatchError",
    "StaticKVCache",
    "Tokenizer",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
    "__version__",
    "allowed_tensor_parallel_sizes",
    "check_tensor_parallel_size",
    "find_default_model",
    "from_config",
    "from_pretrained",
    "generate",
    "load_adapter",
    "load_tokenizer",
    "num_blocks_for_memory",
    "parameter_counts",
    "sample",
    "save_pretrained",
    "shard_model",
    "stream",
]
