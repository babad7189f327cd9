"""Tiny random checkpoints with the fixture's SentencePiece tokenizer, written by ds-model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ds_model
import torch

CHAT_TEMPLATE = (
    # SentencePiece does not parse "<s>" in text, so the template writes no BOS string.
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def write_checkpoint(
    directory: Path, tokenizer_model: Path, seed: int = 0, config=None, **overrides
) -> Path:
    """A tiny DeepSeek-V3-shaped fp32 model (MLA + MoE; or ``config``'s model) with
    random weights, saved as a checkpoint directory a server can load: config.json,
    model.safetensors, tokenizer.model, tokenizer_config.json (with a chat template)."""
    if config is None:
        config = ds_model.ModelConfig.from_preset(
            "tiny", vocab_size=512, bos_token_id=1, eos_token_id=2, **overrides
        )
    model = ds_model.from_config(config, dtype=torch.float32, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    ds_model.save_pretrained(model, directory)
    shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    return directory
