"""ControlNet residuals: refused, with one sentence, where TeaCache cannot cache them correctly.

Flux, Chroma, QwenImage, SD3, Sana and Z-Image add ControlNet residuals to the hidden states in their
forward, *between* blocks (``hidden_states = block(...)`` then ``hidden_states + samples[i]``). On a
skipped call TeaCache returns ``stack input + cached residual`` from the head block and passes the
other blocks through, while the forward still adds this call's residuals after each of them: the
cached residual already holds the computed call's residuals, so the control counts twice (checked on
tiny real ControlNet models in tests/test_controlnet.py). Rather than return silently wrong output:

- :func:`refuse_controlnet_pipeline` at ``apply``: a pipeline with a ``controlnet`` whose transformer
  class adds residuals between blocks (``ModelAdapter.control_arguments``);
- :func:`guard` on the transformer: a call that carries residuals (a bare transformer, or a pipeline
  TeaCache was applied to through its transformer) raises before anything of TeaCache runs, so the
  cache's state is exactly what it was before the call.

Cosmos hands its residuals into the blocks; a skipped call skips them with the blocks and the cached
residual holds the computed call's, as for any other block input: no refusal there.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from . import intercept
from .adapters import BlockCall, ModelAdapter, adapter_for
from .errors import UnsupportedModelError

CONTROL = "teacache_control"

_WHY = (
    "ControlNet residuals (the model adds them between the blocks a skipped step passes through, on top of a "
    "cached residual that already holds them, so they would count twice)"
)


def refuse_controlnet_pipeline(pipe: Any) -> None:
    """Raise :class:`UnsupportedModelError` when ``pipe`` has a ControlNet its transformer adds between blocks."""
    if isinstance(pipe, nn.Module) or getattr(pipe, "controlnet", None) is None:
        return
    transformer = getattr(pipe, "transformer", None)
    if isinstance(transformer, nn.Module) and adapter_for(transformer).control_arguments:
        raise UnsupportedModelError(
            f"{type(pipe).__name__} has a ControlNet, and TeaCache cannot cache {type(transformer).__name__} "
            f"with {_WHY}; apply TeaCache to a pipeline without a ControlNet."
        )


def control_residuals_given(adapter: ModelAdapter, transformer: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The names of ``adapter.control_arguments`` that this call of ``transformer`` passes a residual in."""
    call = BlockCall(transformer, args, kwargs)  # an argument by name, positional or keyword
    given = []
    for name in adapter.control_arguments:
        value = call.get(name)
        if value is not None and not (hasattr(value, "__len__") and len(value) == 0):
            given.append(name)
    return given


def refuse_control_residuals(adapter: ModelAdapter) -> intercept.Interceptor:
    """An interceptor for the transformer: a call carrying control residuals raises before anything runs."""

    def check(module: nn.Module, call_next: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if control_residuals_given(adapter, module, args, kwargs):
            raise UnsupportedModelError(
                f"TeaCache cannot cache {intercept.original_class(module).__name__} with {_WHY}; remove TeaCache "
                "(cache.remove()) or stop passing the ControlNet's residuals."
            )
        return call_next(*args, **kwargs)

    return check


def guard(transformer: nn.Module) -> None:
    """Make ``transformer`` refuse calls with control residuals while TeaCache is on it (idempotent).

    A no-op for classes without ``control_arguments``. Undo with :func:`unguard`.
    """
    adapter = adapter_for(transformer)
    if adapter.control_arguments and not intercept.has_interceptor(transformer, CONTROL):
        intercept.intercept(transformer, CONTROL, refuse_control_residuals(adapter))


def unguard(transformer: nn.Module) -> None:
    intercept.release(transformer, CONTROL)
