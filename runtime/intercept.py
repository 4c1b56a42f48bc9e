"""Run code around a module's call *outside* any region that ``torch.compile`` made of that module.

Why not a forward wrapper: diffusers' ``HookRegistry`` (and ``register_forward_pre_hook``) put their
code inside ``Module._call_impl``, and regional compilation (``compile_repeated_blocks``) compiles
exactly ``_call_impl``. A cache's host read then becomes a graph break inside every compiled block
(an error with ``fullgraph=True``), and a ``torch.compiler.disable`` around it runs the whole block
eagerly. Python looks ``__call__`` up on the type, so the one place that is outside a block's compiled
region yet inside its parent's forward is the class's ``__call__``.

:func:`intercept` gives the module a subclass of its own class (same name, module and qualified name,
so ``compile_repeated_blocks``, ``TransformerBlockRegistry`` and ``isinstance`` still recognise it)
whose ``__call__`` runs the registered interceptors and then the original call. The parameters,
buffers, state dict and any compiled ``_compiled_call_impl`` are untouched; :func:`release` restores
the original class when the module's last interceptor goes.

An interceptor is ``fn(module, call_next, args, kwargs) -> output``; the one registered last runs
outermost. Under ``torch.compile`` of a whole model, dynamo inlines ``__call__`` and traces them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

Interceptor = Callable[[nn.Module, Callable[..., Any], tuple, dict], Any]

_ATTR = "_teacache_interceptors"
_SUBCLASSES: dict[type, type] = {}


def _call_chain(module: nn.Module, chain: tuple[Interceptor, ...], base_call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    if len(chain) == 1:
        return chain[0](module, functools.partial(base_call, module), args, kwargs)
    *inner, outer = chain

    def call_next(*a: Any, **k: Any) -> Any:
        return _call_chain(module, tuple(inner), base_call, a, k)

    return outer(module, call_next, args, kwargs)


def _intercepted_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is not None:
        return sub
    base_call = cls.__call__

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        interceptors = self.__dict__.get(_ATTR)
        if not interceptors:
            return base_call(self, *args, **kwargs)
        return _call_chain(self, tuple(interceptors.values()), base_call, args, kwargs)

    sub = type(cls)(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_intercepted_from": cls},
    )
    _register_block_metadata(cls, sub)
    _SUBCLASSES[cls] = sub
    return sub


def _register_block_metadata(cls: type, sub: type) -> None:
    # diffusers' caches look blocks up by exact class; give the subclass the original's record.
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        meta = TransformerBlockRegistry.get(cls)
    except ValueError:
        return
    TransformerBlockRegistry.register(sub, meta)


def original_class(module: nn.Module) -> type:
    """The module's class as its library defined it (not our intercepting subclass)."""
    return type(module).__dict__.get("_intercepted_from", type(module))


def intercept(module: nn.Module, name: str, fn: Interceptor) -> None:
    """Run ``fn`` around every call of ``module``, outside its compiled region; ``name`` must be new."""
    interceptors = module.__dict__.get(_ATTR)
    if interceptors is None:
        interceptors = {}
        object.__setattr__(module, _ATTR, interceptors)
    if name in interceptors:
        raise ValueError(f"{type(module).__name__} already has an interceptor named {name!r}")
    interceptors[name] = fn
    module.__class__ = _intercepted_class(original_class(module))


def release(module: nn.Module, name: str) -> None:
    """Remove the interceptor ``name``; the last one out restores the module's original class."""
    interceptors = module.__dict__.get(_ATTR)
    if not interceptors or name not in interceptors:
        return
    del interceptors[name]
    if not interceptors:
        del module.__dict__[_ATTR]
        module.__class__ = original_class(module)


def has_interceptor(module: nn.Module, name: str) -> bool:
    return name in (module.__dict__.get(_ATTR) or {})
