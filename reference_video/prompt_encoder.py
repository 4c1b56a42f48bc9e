"""The video reference model's prompt encoder: a word tokenizer and a one-layer transformer encoder.

It stands in for Wan's umT5. Prompts become ``prompt_embeds`` float [B, MAX_LENGTH, D] in the format
``WanPipeline`` takes through ``prompt_embeds=`` / ``negative_prompt_embeds=``: a fixed length, zero beyond the
prompt's last token (as Wan zero-pads umT5's output). Words outside the vocabulary are skipped, so "" and "a cat"
are both the unconditional prompt ([BOS] alone).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from reference_video.data import COLORS, MOTIONS, SHAPES, SIZES

#: Vocabulary after padding (0) and BOS (1).
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(["a", "and", *SIZES, *COLORS, *SHAPES, *(w for m in MOTIONS for w in m.split())])
)
MAX_LENGTH = 16
_WORD_RE = re.compile(r"[a-z]+")


class ShapesTokenizer:
    """Lower-case words -> ids; ``0`` padding, ``1`` BOS, ``2 + i`` the word ``WORDS[i]``; unknown words dropped."""

    pad_id, bos_id = 0, 1
    vocab_size = 2 + len(WORDS)
    max_length = MAX_LENGTH
    _ids = {w: 2 + i for i, w in enumerate(WORDS)}

    def token_ids(self, prompt: str) -> list[int]:
        ids = [self.bos_id] + [self._ids[w] for w in _WORD_RE.findall(prompt.lower()) if w in self._ids]
        return ids[: self.max_length]

    def __call__(self, prompts: str | Sequence[str], drop: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` int64 [B, MAX_LENGTH]; where ``drop`` is True the prompt is ""."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.zeros((len(prompts), self.max_length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            row = [self.bos_id] if drop is not None and drop[i] else self.token_ids(p)
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask


class ShapesPromptEncoder(ModelMixin, ConfigMixin):
    """Token + position embedding, one pre-norm transformer encoder layer; padded positions output zero."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, embed_dim: int = 64, num_heads: int = 4, vocab_size: int = ShapesTokenizer.vocab_size,
                 max_length: int = MAX_LENGTH) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.position_embedding = nn.Embedding(max_length, embed_dim)
        self.layer = nn.TransformerEncoderLayer(embed_dim, num_heads, 2 * embed_dim, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.tokenizer = ShapesTokenizer()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        h = self.layer(h, src_key_padding_mask=attention_mask == 0)
        return h * attention_mask[..., None].to(h.dtype)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Prompts -> ``prompt_embeds`` [B, MAX_LENGTH, D] for ``WanPipeline``."""
        param = next(self.parameters())
        ids, mask = self.tokenizer(prompts)
        embeds = self(ids.to(param.device), mask.to(param.device))
        return embeds.to(device=device or param.device, dtype=dtype or embeds.dtype)
