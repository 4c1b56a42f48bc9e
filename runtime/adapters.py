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
import re
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
        """The argument called ``name`` in the block's forward signature, positional or keyword.

        Where the signature has no ``name``, its other spelling in diffusers (:data:`ALIASES`): Z-Image
        calls its image stream ``x`` and its timestep ``t``, HiDream its timestep ``timesteps``.
        """
        indices = _parameter_indices(type(self.block))
        if name not in indices:
            name = next((alias for alias in ALIASES.get(name, ()) if alias in indices), name)
        if name in self.kwargs:
            return self.kwargs[name]
        index = indices.get(name)
        if index is not None and index < len(self.args):
            return self.args[index]
        return default


ALIASES: dict[str, tuple[str, ...]] = {"hidden_states": ("x",), "timestep": ("timesteps", "t")}


_PARAMETER_INDICES: dict[type, dict[str, int]] = {}


def _parameter_indices(cls: type) -> dict[str, int]:
    indices = _PARAMETER_INDICES.get(cls)
    if indices is None:
        names = list(inspect.signature(cls.forward).parameters)[1:]  # drop `self`
        indices = _PARAMETER_INDICES[cls] = {name: i for i, name in enumerate(names)}
    return indices


IMAGE_TOKENS = ("all", "first", "last")


@dataclass(frozen=True)
class BlockLayout:
    """Where a block class returns its image (hidden) stream and, if any, its text (encoder) stream.

    ``image_tokens`` says where the image tokens sit in the returned hidden stream: ``"all"`` when it
    is the image stream itself; ``"first"``/``"last"`` when the model concatenated text and image
    tokens into one stream between block lists (Flux2 and Chroma single blocks run on
    ``[text; image]``, HiDream's on ``[image; text]``), so that the stack residual is taken on the
    image tokens only, the part of the stream the model keeps after its last block.
    """

    hidden_states_index: int
    encoder_hidden_states_index: int | None
    image_tokens: str = "all"

    def __post_init__(self) -> None:
        if self.image_tokens not in IMAGE_TOKENS:
            raise UnsupportedModelError(
                f"a block layout's image_tokens is {self.image_tokens!r}; use one of {', '.join(IMAGE_TOKENS)}."
            )

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

    def residual(self, output: Any, stack_input: torch.Tensor) -> torch.Tensor:
        """The block-stack residual: this (tail) block's image tokens minus the head block's input."""
        hidden = self.hidden_states(output)
        if self.image_tokens != "all":
            tokens = stack_input.shape[1]
            hidden = hidden[:, :tokens] if self.image_tokens == "first" else hidden[:, hidden.shape[1] - tokens :]
        return hidden - stack_input


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
    - ``layouts``: block class name -> ``(hidden index, encoder index or None[, image_tokens])`` of
      what a block returns (see :class:`BlockLayout`), for block classes diffusers'
      ``TransformerBlockRegistry`` does not know or where the image stream is part of a joint one; or
      a callable ``block -> tuple`` where one wrapper class serves several kinds of block (HiDream).
    - ``control_arguments``: the transformer's forward arguments that carry ControlNet residuals the
      forward adds to the hidden states *between* blocks (after or before a block, outside it). A
      skipped call passes its blocks through while the forward still adds this call's residuals, on
      top of a cached residual that already holds the computed call's: they would count twice, so the
      runtime refuses such calls (:mod:`runtime.controlnet`). Residuals a model hands *into* its blocks
      (Cosmos' ``block_controlnet_hidden_states``) are skipped with the blocks and need no entry.
    """

    transformer_class: str
    block_lists: tuple[str, ...]
    modulated_input: Callable[[BlockCall], torch.Tensor]
    timestep_embedding: str
    timestep_embedding_index: int | None = None
    modulated_input_module: str | None = None
    layouts: Mapping[str, tuple | Callable[[nn.Module], tuple]] = field(default_factory=dict)
    control_arguments: tuple[str, ...] = ()

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
        if callable(known):
            known = known(block)
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


def sequential_cfg_without_context(pipe: Any) -> bool:
    """Whether ``pipe``'s ``__call__`` calls its transformer more than once per step outside any cache context.

    Such a pipeline (diffusers 0.42.1: Chroma's three, Lumina2, the Cosmos ones, Flux img2img/inpaint/
    Kontext/ControlNet with true CFG, HunyuanVideo I2V, Wan video2video, CogView4 Control, SD3's
    skip-layer guidance call) makes its cond and uncond (or skip-layer) calls one after the other with
    no ``cache_context``, so a runtime keyed on the context alone gives both calls one state and
    compares each call's signal with the *other* branch's. Read from the source of the pipeline
    class's ``__call__``: at least two ``self.transformer(`` call sites and no ``cache_context``.
    False for a bare transformer or a pipeline whose source cannot be read.
    """
    if isinstance(pipe, nn.Module):
        return False
    call = getattr(type(pipe), "__call__", None)
    try:
        source = inspect.getsource(call)
    except (OSError, TypeError):
        return False
    return len(_TRANSFORMER_CALL.findall(source)) >= 2 and "cache_context" not in source


_TRANSFORMER_CALL = re.compile(r"\bself\.transformer\s*\(")


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
        control_arguments=("controlnet_block_samples",),  # added after each block
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="FluxTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        modulated_input=_norm1_modulated_input,
        timestep_embedding="time_text_embed",
        control_arguments=("controlnet_block_samples", "controlnet_single_block_samples"),  # after each block
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


# ---------------------------------------------------------------------- more families (diffusers 0.42)
#
# Each entry below was checked on a tiny random-init config of the real class: the modulated input
# equals the tensor the first block's attention receives, threshold 0 is bit-identical to no cache,
# and the recorder reads the same x as the runtime (tests/test_families.py).


def _hunyuan_video_modulated_input(call: BlockCall) -> torch.Tensor:
    # The token-replace (I2V) blocks' norm1 also takes the clean-frame embedding and its token count.
    token_replace_emb = call.get("token_replace_emb")
    if token_replace_emb is None:
        return _norm1_modulated_input(call)
    return call.block.norm1(call.get("hidden_states"), call.get("temb"), token_replace_emb, call.get("num_tokens"))[0]


def _ltx_modulated_input(call: BlockCall) -> torch.Tensor:
    block, temb, hidden_states = call.block, call.get("temb"), call.get("hidden_states")
    table = block.scale_shift_table
    ada = table[None, None].to(temb.device) + temb.reshape(hidden_states.size(0), temb.size(1), table.shape[0], -1)
    shift, scale = ada.unbind(dim=2)[:2]
    return block.norm1(hidden_states) * (1 + scale) + shift


def _cogvideox_modulated_input(call: BlockCall) -> torch.Tensor:
    # CogVideoXLayerNormZero modulates the image and text streams together; [0] is the image one.
    return call.block.norm1(call.get("hidden_states"), call.get("encoder_hidden_states"), call.get("temb"))[0]


def _temb_positional_norm1_modulated_input(call: BlockCall) -> torch.Tensor:
    # norm1(hidden_states, temb) -> (modulated, gates...): Mochi, Lumina2's refiner blocks.
    return call.block.norm1(call.get("hidden_states"), call.get("temb"))[0]


def _flux2_modulated_input(call: BlockCall) -> torch.Tensor:
    # The modulation is computed once per call outside the blocks and handed to each as `temb_mod_img`.
    block = call.block
    mod = call.get("temb_mod_img")
    if mod.ndim == 2:
        mod = mod.unsqueeze(1)
    shift, scale = mod.chunk(6, dim=-1)[:2]  # Flux2Modulation.split(mod, 2)[0][:2]
    return (1 + scale) * block.norm1(call.get("hidden_states")) + shift


def _z_image_modulated_input(call: BlockCall) -> torch.Tensor:
    # Z-Image modulates by scale only: attention_norm1(x) * (1 + scale_msa).
    block, adaln_input = call.block, call.get("adaln_input")
    if adaln_input is None:
        raise UnsupportedModelError(
            "Z-Image's omni mode (per-token modulation with siglip features) has no TeaCache adapter yet; "
            "call the transformer without siglip_feats/image_noise_mask."
        )
    scale_msa = 1.0 + block.adaLN_modulation(adaln_input).unsqueeze(1).chunk(4, dim=2)[0]
    return block.attention_norm1(call.get("hidden_states")) * scale_msa


def _chroma_modulated_input(call: BlockCall) -> torch.Tensor:
    # A double block's temb is its own slice of the precomputed modulation: 6 image rows, then 6 text rows.
    return call.block.norm1(call.get("hidden_states"), emb=call.get("temb")[:, :6])[0]


def _hidream_modulated_input(call: BlockCall) -> torch.Tensor:
    block = call.block.block  # HiDreamBlock wraps the double- or single-stream block
    hidden_states = call.get("hidden_states")
    mod = block.adaLN_modulation(call.get("temb"))[:, None]
    shift, scale = mod.chunk(mod.shape[-1] // hidden_states.shape[-1], dim=-1)[:2]
    return block.norm1_i(hidden_states).to(dtype=hidden_states.dtype) * (1 + scale) + shift


def _hidream_layout(block: nn.Module) -> tuple:
    # Double-stream blocks return (image, text); single-stream ones the joint [image; text] stream.
    if type(block.block).__name__ == "HiDreamImageSingleTransformerBlock":
        return (0, None, "first")
    return (0, 1)


register_adapter(
    ModelAdapter(
        transformer_class="HunyuanVideoTransformer3DModel",
        # The token refiner (context_embedder.token_refiner) runs on the text tokens, a different
        # sequence: it stays outside the cached stack and runs on every call.
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        modulated_input=_hunyuan_video_modulated_input,
        timestep_embedding="time_text_embed",  # (temb, token_replace_emb)
        timestep_embedding_index=0,
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="HunyuanImageTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),  # token refiner excluded, as above
        modulated_input=_norm1_modulated_input,
        timestep_embedding="time_guidance_embed",
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="SD3Transformer2DModel",
        block_lists=("transformer_blocks",),
        modulated_input=_norm1_modulated_input,
        timestep_embedding="time_text_embed",
        control_arguments=("block_controlnet_hidden_states",),  # after each block
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="LTXVideoTransformer3DModel",
        block_lists=("transformer_blocks",),
        modulated_input=_ltx_modulated_input,
        timestep_embedding="time_embed",  # (temb, embedded_timestep): the embedding before its 6-way projection
        timestep_embedding_index=1,
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="CogVideoXTransformer3DModel",
        block_lists=("transformer_blocks",),
        modulated_input=_cogvideox_modulated_input,
        timestep_embedding="time_embedding",
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="MochiTransformer3DModel",
        block_lists=("transformer_blocks",),
        modulated_input=_temb_positional_norm1_modulated_input,
        timestep_embedding="time_embed",  # (temb, caption tokens)
        timestep_embedding_index=0,
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="Flux2Transformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        modulated_input=_flux2_modulated_input,
        timestep_embedding="time_guidance_embed",
        # Single blocks run on the joint [text; image] stream the model concatenates after the double ones.
        layouts={"Flux2SingleTransformerBlock": (0, None, "last")},
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="ZImageTransformer2DModel",
        # The refiners run on the image and caption tokens apart; `layers` on the unified sequence.
        # Only `layers` is cached (head input and tail output are the same stream); the modulated
        # input is read where the image tokens are first modulated, in noise_refiner.0.
        block_lists=("layers",),
        modulated_input=_z_image_modulated_input,
        modulated_input_module="noise_refiner.0",
        timestep_embedding="t_embedder",
        control_arguments=("controlnet_block_samples",),  # a dict: after the `layers` it names
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="Lumina2Transformer2DModel",
        block_lists=("layers",),  # refiners excluded, as for Z-Image
        modulated_input=_temb_positional_norm1_modulated_input,
        modulated_input_module="noise_refiner.0",
        timestep_embedding="time_caption_embed",  # (temb, caption tokens)
        timestep_embedding_index=0,
        layouts={"Lumina2TransformerBlock": (0, None)},
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="ChromaTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        modulated_input=_chroma_modulated_input,
        # The approximator's output, from which every block's modulation is sliced.
        timestep_embedding="distilled_guidance_layer",
        layouts={
            "ChromaTransformerBlock": (1, 0),
            "ChromaSingleTransformerBlock": (0, None, "last"),  # the joint [text; image] stream
        },
        control_arguments=("controlnet_block_samples", "controlnet_single_block_samples"),  # as Flux
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="HiDreamImageTransformer2DModel",
        block_lists=("double_stream_blocks", "single_stream_blocks"),
        modulated_input=_hidream_modulated_input,
        timestep_embedding="t_embedder",
        layouts={"HiDreamBlock": _hidream_layout},
    )
)


def _sana_modulated_input(call: BlockCall) -> torch.Tensor:
    # Sana hands each block the 6-way projected timestep as `timestep`.
    block, hidden_states = call.block, call.get("hidden_states")
    shift, scale = (block.scale_shift_table[None] + call.get("timestep").reshape(hidden_states.shape[0], 6, -1)).chunk(
        6, dim=1
    )[:2]
    return (block.norm1(hidden_states) * (1 + scale) + shift).to(hidden_states.dtype)


def _cosmos_modulated_input(call: BlockCall) -> torch.Tensor:
    block, hidden_states = call.block, call.get("hidden_states")
    if block.before_proj is not None:
        raise UnsupportedModelError(
            "Cosmos ControlNet blocks (before_proj) have no TeaCache adapter; apply TeaCache to the base transformer."
        )
    extra_pos_emb = call.get("extra_pos_emb")
    if extra_pos_emb is not None:  # each block adds the learnable positional embedding before its norm
        hidden_states = hidden_states + extra_pos_emb
    return block.norm1(hidden_states, call.get("embedded_timestep"), call.get("temb"))[0]


def _skyreels_v2_modulated_input(call: BlockCall) -> torch.Tensor:
    block, temb = call.block, call.get("temb")
    if temb.dim() == 4:  # diffusion forcing: a per-token modulation, [batch, 6, tokens, dim]
        shift, scale = [e.squeeze(1) for e in (block.scale_shift_table.unsqueeze(2) + temb.float()).chunk(6, dim=1)[:2]]
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    hidden_states = call.get("hidden_states")
    return (block.norm1(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)


register_adapter(
    ModelAdapter(
        transformer_class="SanaTransformer2DModel",
        block_lists=("transformer_blocks",),
        modulated_input=_sana_modulated_input,
        timestep_embedding="time_embed",  # (6-way projection, embedded timestep)
        timestep_embedding_index=1,
        layouts={"SanaTransformerBlock": (0, None)},
        control_arguments=("controlnet_block_samples",),  # before blocks 1..n
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="CogView4Transformer2DModel",
        block_lists=("transformer_blocks",),
        # CogView4AdaLayerNormZero modulates image and text together; [0] is the image stream.
        modulated_input=_cogvideox_modulated_input,
        timestep_embedding="time_condition_embed",
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="CosmosTransformer3DModel",
        block_lists=("transformer_blocks",),
        modulated_input=_cosmos_modulated_input,
        timestep_embedding="time_embed",  # (temb, embedded_timestep)
        timestep_embedding_index=1,
        layouts={"CosmosTransformerBlock": (0, None)},
        # No control_arguments: block_controlnet_hidden_states are handed into the blocks (added inside
        # them), so a skipped call skips them with the blocks and the cached residual holds the computed call's.
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="SkyReelsV2Transformer3DModel",
        block_lists=("blocks",),
        modulated_input=_skyreels_v2_modulated_input,
        timestep_embedding="condition_embedder",  # (temb, timestep_proj, text, image), as for Wan
        timestep_embedding_index=0,
        layouts={"SkyReelsV2TransformerBlock": (0, None)},
    )
)
register_adapter(
    ModelAdapter(
        transformer_class="HunyuanVideo15Transformer3DModel",
        block_lists=("transformer_blocks",),  # the token refiner runs on the text tokens: not cached
        modulated_input=_norm1_modulated_input,
        timestep_embedding="time_embed",
        layouts={"HunyuanVideo15TransformerBlock": (0, 1)},
    )
)
