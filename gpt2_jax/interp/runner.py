"""The hook runner the model's hook points call, and how a list of hooks splits into static code and traced data.

A hook is ``(name, fn)`` with ``fn(activation, ctx) -> activation`` a pure function. ``fn`` may be a plain function
or a pytree whose array leaves are its data (:class:`jax.tree_util.Partial`, or the ready-made interventions of
:mod:`gpt2_jax.interp.interventions`): :func:`split_hooks` separates the array leaves (traced arguments of the
compiled program, so one program serves every value) from everything else (the static identity of the program: a
different hook function never reuses a program compiled for another).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPT2Config
from .names import check_name

HookFn = Callable[[jax.Array, "HookContext"], jax.Array]


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a hook function is told besides the activation.

    Attributes:
        name: the full hook name (``blocks.3.attn.hook_z``).
        layer: the block index (None outside the blocks).
        positions: ``[batch, T]`` int32 position of each token of this forward pass (during generation: the
            prompt at prefill, the new token at each decode step).
        token_mask: ``[batch, T]`` bool, True at real tokens (False at padding).
    """

    name: str
    layer: int | None
    positions: jax.Array | None
    token_mask: jax.Array | None


def _is_data(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


@dataclasses.dataclass(frozen=True)
class HookSpec:
    """The static part of a list of hooks: names, code and non-array leaves (hashable; a jit static argument)."""

    names: tuple[str, ...]
    treedef: Any
    static_leaves: tuple[tuple[int, Any], ...]
    n_leaves: int

    def build(self, data: Iterable[jax.Array]) -> tuple[tuple[str, HookFn], ...]:
        """The hooks again, with ``data`` (traced or concrete) at the array leaves."""
        static, data = dict(self.static_leaves), iter(data)
        leaves = [static[i] if i in static else next(data) for i in range(self.n_leaves)]
        fns = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return tuple(zip(self.names, fns))


def split_hooks(hooks: Iterable | None, config: GPT2Config) -> tuple[HookSpec, tuple[jax.Array, ...]]:
    """``(static spec, array data)`` of ``hooks`` (``[(name, fn), ...]`` or a ``{name: fn}`` mapping), names
    checked against ``config``'s hook points."""
    if hooks is None:
        hooks = ()
    if isinstance(hooks, Mapping):
        hooks = list(hooks.items())
    pairs = []
    for entry in hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"a hook is a (name, fn) pair, got {entry!r}")
        name, fn = entry
        check_name(name, config)
        if not callable(fn):
            raise TypeError(f"the hook on {name!r} is not callable: {fn!r}")
        pairs.append((name, fn))
    names = tuple(n for n, _ in pairs)
    leaves, treedef = jax.tree_util.tree_flatten([fn for _, fn in pairs])
    static, data = [], []
    for i, leaf in enumerate(leaves):
        if _is_data(leaf) or isinstance(leaf, jax.core.Tracer):
            data.append(jnp.asarray(leaf))
        else:
            try:
                hash(leaf)
            except TypeError:
                raise TypeError(f"hook data {leaf!r} is neither an array nor hashable; pass data as arrays "
                                "(e.g. jax.tree_util.Partial(fn, array))") from None
            static.append((i, leaf))
    return HookSpec(names, treedef, tuple(static), len(leaves)), tuple(data)


class HookRunner:
    """What the model's hook points call (``hooks`` of :class:`gpt2_jax.model.GPT2LMHeadModel`), one per trace.

    Applies the hook functions of a name in order, then adds the zero ``perturbation`` of that name (so the
    gradient with respect to it is the gradient with respect to the activation), then records the activation if
    its name is in ``record``. ``scoped`` views share the state and prefix the names.
    """

    def __init__(self, hooks: Iterable[tuple[str, HookFn]] = (), record: Iterable[str] = (),
                 perturbations: Mapping[str, jax.Array] | None = None):
        self.fns: dict[str, list[HookFn]] = {}
        for name, fn in hooks:
            self.fns.setdefault(name, []).append(fn)
        self.record = frozenset(record)
        self.perturbations = dict(perturbations or {})
        self.store: dict[str, jax.Array] = {}
        self.seen: set[str] = set()
        self.context: dict[str, Any] = {}
        self._wanted = frozenset(self.fns) | self.record | frozenset(self.perturbations)

    def bind(self, **context) -> None:
        """Set the per-forward context (positions, token mask) that :class:`HookContext` reports."""
        self.context.update(context)

    def scoped(self, prefix: str, layer: int | None = None) -> "_Scoped":
        return _Scoped(self, prefix, layer)

    def wants(self, name: str) -> bool:
        return name in self._wanted

    def __call__(self, name: str, x: jax.Array, layer: int | None = None) -> jax.Array:
        self.seen.add(name)
        if name not in self._wanted:
            return x
        ctx = HookContext(name, layer, self.context.get("positions"), self.context.get("token_mask"))
        for fn in self.fns.get(name, ()):
            y = fn(x, ctx)
            shape, dtype = getattr(y, "shape", None), getattr(y, "dtype", None)
            if shape != x.shape or dtype != x.dtype:
                raise ValueError(f"the hook {_describe(fn)} on {name!r} returned shape {_shape(shape)} dtype "
                                 f"{dtype}; the activation has shape {list(x.shape)} dtype {x.dtype}")
            x = y
        if name in self.perturbations:
            x = x + self.perturbations[name].astype(x.dtype)
        if name in self.record:
            self.store[name] = x
        return x


class _Scoped:
    """A view of a :class:`HookRunner` whose names are relative to ``prefix``."""

    def __init__(self, root: HookRunner, prefix: str, layer: int | None):
        self.root, self.prefix, self.layer = root, prefix, layer

    def _full(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def scoped(self, prefix: str, layer: int | None = None) -> "_Scoped":
        return _Scoped(self.root, self._full(prefix), self.layer if layer is None else layer)

    def wants(self, name: str) -> bool:
        return self.root.wants(self._full(name))

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        return self.root(self._full(name), x, self.layer)


def _shape(shape) -> str:
    return "None (not an array)" if shape is None else str(list(shape))


def _describe(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
