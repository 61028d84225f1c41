"""One device mesh ``("data", "fsdp", "tensor")``, logical axis rules and batch placement.

Model parameters that carry flax logical axis names (``nn.with_logical_partitioning``)
are placed by :data:`LOGICAL_RULES`; parameters without names (most mixer
parameters) follow an FSDP rule by shape: the largest dimension divisible by
the ``fsdp`` size is sharded over it, else the parameter is replicated. A mesh
axis that does not divide the dimension it would shard is dropped for that
parameter (replicated along it), so any preset runs on any mesh. Batches are
sharded over ``data`` and ``fsdp`` together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effarch.train.config import MESH_AXES

# Mesh axes the batch dimension is split over.
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Experts are replicated over "data" (no expert
# parallelism); their embed and mlp dimensions shard like any MLP's. The
# stacked "layers" axis of scanned parameters is never sharded.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("expert", None),
    ("layers", None),
    ("length", None),
)


def parse_mesh(spec: str) -> tuple[int, ...]:
    """``"data=2,fsdp=-1,tensor=1"`` or ``"2,-1,1"`` -> ``(2, -1, 1)``; missing named axes are 1."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    form = f"'data=D,fsdp=F,tensor=T' or 'D,F,T' (sizes for {MESH_AXES}, one may be -1)"
    try:
        if all("=" in p for p in parts):
            sizes = dict.fromkeys(MESH_AXES, 1)
            for part in parts:
                name, value = (s.strip() for s in part.split("="))
                if name not in sizes:
                    raise ValueError(f"unknown mesh axis {name!r}")
                sizes[name] = int(value)
            return tuple(sizes[a] for a in MESH_AXES)
        if len(parts) == len(MESH_AXES):
            return tuple(int(p) for p in parts)
    except ValueError as e:
        raise ValueError(f"mesh {spec!r} is not {form}: {e}.") from e
    raise ValueError(f"mesh {spec!r} is not {form}.")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a -1 in ``shape`` by the remaining devices; the product must equal ``num_devices``."""
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh {tuple(shape)} over {MESH_AXES}: {num_devices} devices are not divisible by {known}.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {tuple(shape)} over {MESH_AXES} has {math.prod(shape)} devices but {num_devices} are "
            "available; make the sizes multiply to that, or put -1 on one axis."
        )
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (all devices of all processes by default) with axes ``MESH_AXES``."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def _drop_indivisible(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """``spec`` with every mesh axis that does not divide its dimension removed."""
    entries = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, size = [], 1
        for name in names:
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*entries)


def fsdp_spec(shape: Sequence[int], mesh: Mesh) -> P:
    """Shards the largest dimension divisible by the ``fsdp`` size over it; else replicates."""
    fsdp = mesh.shape["fsdp"]
    candidates = [i for i, d in enumerate(shape) if fsdp > 1 and d % fsdp == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda i: shape[i])
    return P(*(("fsdp" if i == dim else None) for i in range(len(shape))))


def param_specs(boxed_params, mesh: Mesh, rules=LOGICAL_RULES):
    """Mesh ``PartitionSpec`` per parameter of a (possibly abstract) boxed parameter tree.

    Args:
      boxed_params: parameters as ``model.init`` returns them (``nn.LogicallyPartitioned``
        boxes where the model named axes), arrays or ``ShapeDtypeStruct``s.
      mesh: the device mesh.
      rules: logical name -> mesh axes.

    Returns:
      A tree of ``PartitionSpec`` with the structure of the unboxed parameters.
    """

    def spec(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            mesh_axes = nn.logical_to_mesh_axes(leaf.names, rules)
            return _drop_indivisible(mesh_axes, leaf.value.shape, mesh)
        if isinstance(leaf, nn.Partitioned):
            return _drop_indivisible(P(*leaf.names), leaf.value.shape, mesh)
        return fsdp_spec(leaf.shape, mesh)

    return jax.tree.map(spec, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over ``data`` x ``fsdp``, time replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_divisible(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    """Each microbatch of ``batch_size / grad_accum`` rows must split evenly over data x fsdp."""
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    micro = batch_size // grad_accum
    if micro % ways:
        raise ValueError(
            f"batch_size={batch_size} / grad_accum={grad_accum} = {micro} rows per microbatch is not "
            f"divisible by data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {ways} devices; "
            f"use a batch size that is a multiple of {ways * grad_accum}."
        )


def shard_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Places a global numpy batch; each process copies only the rows its devices hold."""
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        for k, v in batch.items()
    }


def state_shardings(abstract_state, param_shardings, mesh: Mesh):
    """Shardings for a train state whose optimiser state mirrors the parameters.

    A leaf whose key path ends with a parameter's key path and has its shape
    (Adam moments, accumulators) takes that parameter's sharding; every other
    leaf (step counters, scalars) is replicated.
    """
    by_path = {
        tuple(path): (sharding, leaf.shape)
        for (path, sharding), leaf in zip(
            jax.tree_util.tree_flatten_with_path(param_shardings)[0], jax.tree.leaves(abstract_state.params)
        )
    }
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        for start in range(len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and match[1] == leaf.shape:
                return match[0]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)
