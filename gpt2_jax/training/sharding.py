"""Device mesh and partition rules: the same training code on 1 device, N devices or N hosts.

The mesh has two axes, ``("data", "model")``. Two strategies decide what the ``model`` axis does:

``"fsdp"`` (default; ZeRO-3 style fully-sharded data parallelism)
    Every matrix (ndim >= 2: kernels and embeddings) is split over ``model`` along its largest dimension that the
    axis size divides; vectors (biases, layer norms) are replicated. The batch is split over *both* axes
    (``P(("data", "model"))``), so every device computes on its own rows and XLA all-gathers each weight where it
    is used and reduce-scatters its gradient. Params and optimizer state take ``1 / model`` of the memory.

``"tp"`` (Megatron tensor parallelism)
    ``c_attn`` and ``c_fc`` kernels are split column-wise (``P(None, "model")``, their biases ``P("model")``),
    ``c_proj`` kernels row-wise (``P("model", None)``), the embeddings along ``n_embd``; the batch is split over
    ``data`` only (devices of one ``model`` group see the same rows). ``c_attn``'s output columns are q|k|v, so a
    column split does not fall on head boundaries and XLA inserts the needed collectives: correct, but FSDP is
    the better choice for GPT-2 sizes.

A leaf whose dimensions the axis size does not divide is replicated (e.g. ``wte``'s 50257 rows). With
``model=1`` both strategies are plain data parallelism (everything replicated, the batch split over ``data``).

Multi-process: every process joins first (:func:`gpt2_jax.training.distributed.join`), then builds the same mesh
over ``jax.devices()`` (all processes' devices). Each process loads only the rows of the global batch its own
devices hold (:func:`local_batch_rows`) and :func:`global_batch` assembles the global array; checkpoints (orbax)
are written cooperatively by all processes; only process 0 writes logs and the final HF directory.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..stacking import params_are_stacked

DATA, MODEL = "data", "model"
STRATEGIES = ("fsdp", "tp")


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ``("data", "model")`` mesh of ``data * model`` devices (``data`` defaults to ``len(devices) // model``).

    Raises:
        ValueError: the axis sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"model axis size {model} does not divide the {n} devices")
    data = n // model if data is None else data
    if data * model != n:
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, there are {n}")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, model), devices)  # topology-aware order on TPU / GPU
    except Exception:  # noqa: BLE001 - CPU / unusual platforms: plain order
        grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def _fsdp_spec(shape: tuple[int, ...], size: int) -> P:
    if len(shape) < 2 or size == 1:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] % size == 0:
            return P(*[MODEL if d == dim else None for d in range(len(shape))])
    return P()


def _tp_spec(path: tuple[str, ...], shape: tuple[int, ...], size: int) -> P:
    module, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    if module in ("c_attn", "c_fc"):
        spec = P(None, MODEL) if leaf == "kernel" else P(MODEL)  # column-parallel
    elif module == "c_proj" and leaf == "kernel":
        spec = P(MODEL, None)  # row-parallel (its bias is added after the all-reduce: replicated)
    elif leaf == "embedding":
        spec = P(None, MODEL)  # along n_embd
    else:
        return P()
    for dim, axis in enumerate(spec):
        if axis is not None and shape[dim] % size:
            return P()
    return spec


def param_specs(params, mesh: Mesh, strategy: str = "fsdp"):
    """A pytree of ``PartitionSpec`` like ``params`` (leaves may be arrays or ``ShapeDtypeStruct``s)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    size = mesh.shape[MODEL]
    stacked = params_are_stacked(params)

    def spec(key_path, leaf):
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        shape = tuple(leaf.shape)
        if stacked and path[0] == "h":  # scan_layers: [n_layer, ...]; the layer axis is never split
            inner = _fsdp_spec(shape[1:], size) if strategy == "fsdp" else _tp_spec(path, shape[1:], size)
            return P(None, *inner)
        return _fsdp_spec(shape, size) if strategy == "fsdp" else _tp_spec(path, shape, size)

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, mesh: Mesh, strategy: str = "fsdp"):
    """``NamedSharding`` per param leaf (see :func:`param_specs`)."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, strategy),
                                  is_leaf=lambda x: isinstance(x, P))


def batch_axes(mesh: Mesh, strategy: str = "fsdp") -> tuple[str, ...]:
    """Mesh axes the batch rows are split over: both for FSDP, ``data`` for tensor parallelism."""
    return (DATA, MODEL) if strategy == "fsdp" else (DATA,)


def batch_shards(mesh: Mesh, strategy: str = "fsdp") -> int:
    """Number of pieces the batch is split into."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh, strategy)]))


def batch_sharding(mesh: Mesh, strategy: str = "fsdp") -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array: rows over :func:`batch_axes`."""
    return NamedSharding(mesh, P(batch_axes(mesh, strategy)))


def check_batch_size(batch_size: int, mesh: Mesh, strategy: str = "fsdp", accum_steps: int = 1) -> None:
    """Raise ``ValueError`` unless each micro-batch splits evenly over the batch axes of the mesh."""
    shards = batch_shards(mesh, strategy)
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(mesh, strategy))
    if batch_size % accum_steps:
        raise ValueError(f"batch size {batch_size} is not divisible by accum_steps={accum_steps}")
    micro = batch_size // accum_steps
    if micro % shards:
        what = f"micro-batch size {micro} (batch {batch_size} / accum {accum_steps})" if accum_steps > 1 else \
            f"batch size {batch_size}"
        raise ValueError(f"{what} is not divisible by the {shards} batch shards of the mesh ({axes})")


def state_shardings(state_shape, optimizer, mesh: Mesh, strategy: str = "fsdp", lora: bool = False):
    """Shardings for a :class:`~gpt2_jax.training.step.TrainState` (shape-only is fine, e.g. ``jax.eval_shape``):
    params per :func:`param_specs`; optimizer moments like their params; counters replicated. ``lora``: the state
    of a LoRA run (params ``{"params": base, "lora": adapters}``): the base sharded as params are, the small
    adapters and their optimizer moments replicated."""
    replicated = NamedSharding(mesh, P())
    if lora:
        base = param_shardings(state_shape.params["params"], mesh, strategy)
        adapters = jax.tree_util.tree_map(lambda _: replicated, state_shape.params["lora"])
        p_shardings = {"params": base, "lora": adapters}
        opt = _mirror_params(optimizer, state_shape.opt_state, adapters, replicated)
    else:
        p_shardings = param_shardings(state_shape.params, mesh, strategy)
        opt = _mirror_params(optimizer, state_shape.opt_state, p_shardings, replicated)
    return state_shape.replace(step=replicated, params=p_shardings, opt_state=opt, skipped=replicated)


def _mirror_params(optimizer, opt_state, p_shardings, replicated):
    import optax

    return optax.tree_map_params(
        optimizer,
        lambda _leaf, sharding: sharding,
        opt_state,
        p_shardings,
        transform_non_params=lambda _leaf: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def shard(tree, shardings):
    """``jax.device_put`` each leaf with its sharding."""
    return jax.tree_util.tree_map(jax.device_put, tree, shardings)


def local_batch_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a ``[global_rows, ...]`` batch that this process's devices hold under
    ``sharding`` (all rows in a single process; a contiguous block per process on a mesh built by
    :func:`make_mesh`, whose devices are ordered process by process).

    Raises:
        ValueError: this process's rows are not one contiguous block (a hand-made mesh interleaving processes).
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_rows,)).values():
        rows.update(range(*index[0].indices(global_rows)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(f"this process's devices hold rows {sorted(rows)} of the batch: not one contiguous block; "
                         "order the mesh's devices process by process")
    return start, stop


def global_batch(local_rows: np.ndarray, sharding: NamedSharding, global_rows: int) -> jax.Array:
    """The global ``[global_rows, ...]`` batch from this process's rows (:func:`local_batch_rows`; all rows in a
    single process)."""
    shape = (global_rows, *local_rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local_rows, shape)
