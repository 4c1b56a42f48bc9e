"""The reference model's prompt encoder: a word tokenizer and a tiny embedding network.

It stands in for Qwen-Image's Qwen2.5-VL text encoder. The tokenizer reduces a prompt to the one thing the
reference model knows, the digit it names, so that "the digit 7", "a handwritten 7", "digit 7" and "the number
seven" are the same prompt. Any other prompt ("", " ", "a cat", "3 or 4") is the unconditional prompt.

The encoder's output has the format ``QwenImagePipeline`` takes through ``prompt_embeds=`` /
``prompt_embeds_mask=`` (and the ``negative_*`` pair): ``prompt_embeds`` float [B, L, D] and
``prompt_embeds_mask`` int64 [B, L] with 1 on real tokens and 0 on padding. A digit prompt has L = 2 tokens
(BOS, digit); the unconditional prompt has one (BOS), so a batch that mixes them is right-padded and masked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

#: English names of the ten digits.
DIGIT_WORDS: dict[str, int] = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
}

_WORD_RE = re.compile(r"[a-z]+|[0-9]+")


class DigitPromptTokenizer:
    """Deterministic word tokenizer of the reference model.

    Vocabulary: ``0`` padding, ``1`` BOS (begins every prompt), ``2 + d`` the digit ``d``. A prompt is split into
    lower-case words (runs of letters, runs of numerals); the words that name a digit are the numerals ``0``..``9``
    and the English words ``zero``..``nine``. A prompt that names exactly one digit (possibly several times) is
    ``[BOS, 2 + digit]``; every other prompt is ``[BOS]``, the unconditional prompt. A multi-digit numeral such as
    ``10`` names no digit.
    """

    pad_id: int = 0
    bos_id: int = 1
    digit_offset: int = 2
    vocab_size: int = 12
    max_length: int = 2

    @staticmethod
    def parse_digit(prompt: str) -> int | None:
        """The digit a prompt names, or None when it names none or more than one."""
        found: set[int] = set()
        for word in _WORD_RE.findall(prompt.lower()):
            if len(word) == 1 and word.isdigit():
                found.add(int(word))
            elif word in DIGIT_WORDS:
                found.add(DIGIT_WORDS[word])
        return found.pop() if len(found) == 1 else None

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of one prompt, without padding."""
        digit = self.parse_digit(prompt)
        return [self.bos_id] if digit is None else [self.bos_id, self.digit_offset + digit]

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a prompt or a batch of prompts.

        Returns:
            ``(input_ids, attention_mask)``, both int64 [B, L] with L the longest prompt of the batch; shorter
            prompts are right-padded with ``pad_id`` and mask 0.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.token_ids(p) for p in prompts]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def from_labels(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the prompts "the digit {label}" without going through text (used in training).

        Args:
            labels: int64 [B] digit classes.
            drop: optional bool [B]; where True the prompt is the unconditional one (label dropout).

        Returns:
            ``(input_ids, attention_mask)`` int64 [B, 2], the same tensors ``__call__`` gives for those prompts
            padded to length 2.
        """
        batch = labels.shape[0]
        input_ids = torch.empty((batch, self.max_length), dtype=torch.long)
        input_ids[:, 0] = self.bos_id
        input_ids[:, 1] = labels + self.digit_offset
        attention_mask = torch.ones((batch, self.max_length), dtype=torch.long)
        if drop is not None:
            input_ids[drop, 1] = self.pad_id
            attention_mask[drop, 1] = 0
        return input_ids, attention_mask


class PromptEncoder(ModelMixin, ConfigMixin):
    """Token embedding + position embedding + a residual MLP, giving Qwen-Image ``prompt_embeds``.

    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` (a ``config.json`` and a safetensors file).

    Args:
        embed_dim: D, the width of ``prompt_embeds``; the transformer's ``joint_attention_dim`` must equal it.
        vocab_size: number of token ids (see :class:`DigitPromptTokenizer`).
        max_length: longest token sequence.
        mlp_ratio: hidden width of the MLP as a multiple of ``embed_dim``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 64,
        vocab_size: int = DigitPromptTokenizer.vocab_size,
        max_length: int = DigitPromptTokenizer.max_length,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.position_embedding = nn.Embedding(max_length, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_ratio * embed_dim),
            nn.GELU(),
            nn.Linear(mlp_ratio * embed_dim, embed_dim),
        )
        self.tokenizer = DigitPromptTokenizer()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed token ids [B, L] into ``prompt_embeds`` [B, L, D]; padded positions are zero."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        h = h + self.mlp(self.norm(h))
        return h * attention_mask[..., None].to(h.dtype)

    @torch.no_grad()
    def encode(
        self,
        prompts: str | Sequence[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts to ``(prompt_embeds [B, L, D], prompt_embeds_mask [B, L] int64)`` for ``QwenImagePipeline``."""
        input_ids, attention_mask = self.tokenizer(prompts)
        param = next(self.parameters())
        input_ids = input_ids.to(param.device)
        attention_mask = attention_mask.to(param.device)
        embeds = self(input_ids, attention_mask)
        device = device if device is not None else param.device
        dtype = dtype if dtype is not None else embeds.dtype
        return embeds.to(device=device, dtype=dtype), attention_mask.to(device)
