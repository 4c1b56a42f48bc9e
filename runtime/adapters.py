"""Model families: where each transformer class keeps what TeaCache needs, one small entry per class.

An adapter says which ``ModuleList`` attributes hold the block stack (in call order), how to compute
the first block's modulated input from that block's own call arguments, and which submodule's output
is the timestep embedding. Where a block returns its hidden states comes from diffusers'
``TransformerBlockRegistry``. The runtime hooks and the calibration recorder both read signals
through these entries, so a fitted file means exactly what the runtime sees.

Adding a family is one :func:`register_adapter` call; see the three entries at the bottom.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockCall:
    """One call of a transformer block: the block and the arguments it was called with."""

    block: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        """The argument called ``name`` in the block's forward signature, positional or keyword."""
        if name in self.kwargs:
            return self.kwargs[name]
        index = _parameter_indices(type(self.block)).get(name)
        if index is not None and index < len(self.args):
            return self.args[index]
        return default


_PARAMETER_INDICES: dict[type, dict[str, int]] = {}


def _parameter_indices(cls: type) -> dict[str, int]:
    indices = _PARAMETER_INDICES.get(cls)
    if indices is None:
        names = list(inspect.signature(cls.forward).parameters)[1:]  # drop `self`
        indices = _PARAMETER_INDICES[cls] = {name: i for i, name in enumerate(names)}
    return indices


@dataclass(frozen=True)
class BlockLayout:
    """Where a block class returns its image (hidden) stream and, if any, its text (encoder) stream."""

    hidden_states_index: int
    encoder_hidden_states_index: int | None

    @classmethod
    def of(cls, block: nn.Module) -> "BlockLayout":
        from diffusers.hooks._helpers import TransformerBlockRegistry

        try:
            meta = TransformerBlockRegistry.get(type(block))
        except ValueError:
            raise UnsupportedModelError(
                f"diffusers' TransformerBlockRegistry does not know block class {type(block).__name__}; "
                "give its adapter in runtime/adapters.py a `layouts` entry for it."
            ) from None
        return cls(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index)

    def pack(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> Any:
        """Build a block's return value from its two streams."""
        if self.encoder_hidden_states_index is None:
            return hidden_states
        out: list[Any] = [None] * (max(self.hidden_states_index, self.encoder_hidden_states_index) + 1)
        out[self.hidden_states_index] = hidden_states
        out[self.encoder_hidden_states_index] = encoder_hidden_states
        return tuple(out)

    def hidden_states(self, output: Any) -> torch.Tensor:
        """The image stream out of a block's return value."""
        return output if self.encoder_hidden_states_index is None else output[self.hidden_states_index]


@dataclass(frozen=True)
class SignalSource:
    """Where a signal is read: on ``module``'s call, from its arguments (``before``) or its output.

    ``read(call, output)`` returns the signal; ``output`` is None when reading before the call.
    """

    module: nn.Module
    before: bool
    read: Callable[[BlockCall, Any], torch.Tensor]


@dataclass(frozen=True)
class ModelAdapter:
    """What TeaCache needs to know about one transformer class.

    - ``block_lists``: attribute names of the ``ModuleList`` block stacks, in the order they run.
    - ``modulated_input``: the modulated input (norm1 output after the timestep-dependent
      shift/scale) computed from a block's call, without running the block;
      ``modulated_input_module`` names the module whose call it reads when that is not the first
      block of the stack (Z-Image and Lumina2 modulate first in ``noise_refiner.0``).
    - ``timestep_embedding``: dotted path of the submodule whose output is the timestep embedding,
      and ``timestep_embedding_index`` the position in that output when it is a tuple.
    - ``layouts``: block class name -> (hidden index, encoder index or None) of what a block returns,
      for block classes diffusers' ``TransformerBlockRegistry`` does not know.
    """

    transformer_class: str
    block_lists: tuple[str, ...]
    modulated_input: Callable[[BlockCall], torch.Tensor]
    timestep_embedding: str
    timestep_embedding_index: int | None = None
    modulated_input_module: str | None = None
    layouts: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)

    def blocks(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(qualified name, block)`` for every block of the stack, in call order."""
        found = []
        for list_name in self.block_lists:
            blocks = getattr(transformer, list_name, None)
            if not isinstance(blocks, nn.ModuleList):
                raise UnsupportedModelError(
                    f"{type(transformer).__name__} has no block list '{list_name}' that its TeaCache adapter expects; "
                    "check that the installed diffusers version matches the one the adapter was written for (0.42)."
                )
            found.extend((f"{list_name}.{i}", block) for i, block in enumerate(blocks))
        if not found:
            raise UnsupportedModelError(f"{type(transformer).__name__} has no transformer blocks to cache.")
        return found

    def layout(self, block: nn.Module) -> BlockLayout:
        """Where ``block`` returns its streams: this adapter's ``layouts``, else diffusers' registry."""
        known = self.layouts.get(type(block).__name__)
        return BlockLayout(*known) if known is not None else BlockLayout.of(block)

    def signal_source(self, transformer: nn.Module, signal: str) -> SignalSource:
        """Where ``signal`` (``modulated_input`` or ``timestep_embedding``) is read in this transformer."""
        if signal == "timestep_embedding":
            module = self._submodule(transformer, self.timestep_embedding, "the timestep embedding")
            index = self.timestep_embedding_index
            return SignalSource(module, False, lambda call, out: out if index is None else out[index])
        if self.modulated_input_module is not None:
            module = self._submodule(transformer, self.modulated_input_module, "the modulated input")
        else:
            module = self.blocks(transformer)[0][1]
        return SignalSource(module, True, lambda call, out: self.modulated_input(call))

    @staticmethod
    def _submodule(transformer: nn.Module, path: str, what: str) -> nn.Module:
        try:
            return transformer.get_submodule(path)
        except AttributeError:
            raise UnsupportedModelError(
                f"{type(transformer).__name__} has no submodule '{path}' for {what} that its TeaCache adapter expects."
            ) from None


ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make a transformer class usable by the runtime and the recorder."""
    ADAPTERS[adapter.transformer_class] = adapter
    return adapter


def supported_classes() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(transformer: nn.Module) -> ModelAdapter:
    """The adapter of ``transformer``'s class (or of the nearest registered base class)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise UnsupportedModelError(
        f"TeaCache has no adapter for {type(transformer).__name__}; supported transformer classes: "
        f"{', '.join(supported_classes())} (a new family is one `register_adapter` entry in runtime/adapters.py)."
    )


# --------------------------------------------------------------------------------- the families


def _qwen_image_modulated_input(call: BlockCall) -> torch.Tensor:
    block = call.block
    img_mod1 = block.img_mod(call.get("temb")).chunk(2, dim=-1)[0]
    normed = block.img_norm1(call.get("hidden_states"))
    return block._modulate(normed, img_mod1, call.get("modulate_index"))[0]


def _norm1_modulated_input(call: BlockCall) -> torch.Tensor:
    # AdaLayerNormZero-style norm1(hidden_states, emb=temb) -> (modulated, gates...): Flux, HunyuanVideo, SD3.
    return call.block.norm1(call.get("hidden_states"), emb=call.get("temb"))[0]


def _wan_modulated_input(call: BlockCall) -> torch.Tensor:
    block, temb = call.block, call.get("temb")
    if temb.ndim == 4:  # Wan 2.2 TI2V: a per-token modulation, [batch, tokens, 6, dim]
        shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return block.norm1(call.get("hidden_states").float()) * (1 + scale) + shift


register_adapter(
    ModelAdapter(
        transformer_class="QwenImageTransformer2DModel",
        block_lists=("transformer_blocks",),
        modulated_input=_qwen_image_modulated_input,
        timestep_embedding="time_text_embed",
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="FluxTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        modulated_input=_norm1_modulated_input,
        timestep_embedding="time_text_embed",
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="WanTransformer3DModel",
        block_lists=("blocks",),
        modulated_input=_wan_modulated_input,
        # (temb, timestep_proj, text, image): temb is the time embedding before its projection, the
        # signal upstream TeaCache4Wan2.1 fitted its published coefficients on.
        timestep_embedding="condition_embedder",
        timestep_embedding_index=0,
    )
)
