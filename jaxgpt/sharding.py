"""Device meshes, logical-axis rules, and multi-host start-up.

The model names its axes ('embed', 'heads', 'act_batch', ...); the rules below
map each name to mesh axes. Changing parallelism is changing the mesh shape in
config: data parallel is (data=N), FSDP is (fsdp=N), Megatron-style tensor
parallel is (tensor=N), and any product of them. One device runs the same code
on a 1x1x1 mesh.
"""

import contextlib
import math

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.config import JaxgptError

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axes. Parameters are sharded over 'fsdp' along their
# embed dimension (ZeRO-3 style) and over 'tensor' along heads / mlp / vocab;
# activations are sharded over the batch by both data-parallel axes. A config
# may override any entry with mesh.rules (see logical_rules).
LOGICAL_RULES = (
    ('act_batch', ('data', 'fsdp')),
    ('act_tokens', ('data', 'fsdp')),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv', None),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('length', None),
    ('layers', None),
)

BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves the configured (data, fsdp, tensor) sizes, one of which may be -1."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  described = ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise JaxgptError(f'mesh ({described}) is invalid: sizes must be positive, with at most one -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise JaxgptError(
          f'mesh ({described}) does not divide the {num_devices} devices: the fixed axes '
          f'multiply to {known}. Choose sizes whose product divides {num_devices}.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise JaxgptError(
        f'mesh ({described}) needs {math.prod(sizes)} devices but {num_devices} are available. '
        f'Make the product of mesh.data, mesh.fsdp and mesh.tensor equal {num_devices}, '
        'or set one of them to -1.')
  return tuple(sizes)


def logical_rules(mesh_cfg) -> tuple:
  """The default rules with the config's `mesh.rules` entries replacing theirs."""
  overrides = {name: (tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in mesh_cfg.get('rules', ())}
  unknown = set(overrides) - {name for name, _ in LOGICAL_RULES}
  if unknown:
    raise JaxgptError(f'mesh.rules names unknown logical axes {sorted(unknown)}; '
                      f'known: {[name for name, _ in LOGICAL_RULES]}.')
  return tuple((name, overrides.get(name, axes)) for name, axes in LOGICAL_RULES)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: the logical-rule constraints in the model need them (Explicit is jax.make_mesh's default).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh_sizes) -> int:
  """How many ways the batch is split. `mesh_sizes`: axis -> size (a Mesh's .shape, or a dict)."""
  return math.prod(mesh_sizes[a] for a in BATCH_AXES)


def check_divisibility(config, mesh_sizes) -> None:
  """Catches the shapes that would otherwise fail deep inside XLA. `mesh_sizes`: axis -> size."""
  dp = data_parallel_size(mesh_sizes)
  micro = config.batch_size // config.optim.grad_accum_steps
  if micro % dp:
    raise JaxgptError(
        f'batch_size={config.batch_size} with optim.grad_accum_steps={config.optim.grad_accum_steps} '
        f'gives microbatches of {micro}, not divisible by the data-parallel size {dp} '
        f'(mesh.data x mesh.fsdp). Use a batch size that is a multiple of {dp * config.optim.grad_accum_steps}, '
        'or fewer accumulation steps.')
  if config.batch_size % jax.process_count():
    raise JaxgptError(f'batch_size={config.batch_size} is not divisible by the {jax.process_count()} processes.')
  tp = mesh_sizes['tensor']
  m = config.model
  kv_heads = m.num_kv_heads or m.num_heads
  if m.num_heads % tp or kv_heads % tp or m.mlp_dim % tp:
    raise JaxgptError(
        f'mesh.tensor={tp} must divide model.num_heads={m.num_heads}, the kv heads ({kv_heads}) '
        f'and model.mlp_dim={m.mlp_dim}: tensor parallelism splits heads and MLP units.')


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_RULES):
  """Makes the model's logical activation constraints resolve against `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def initialize_distributed(dist_cfg) -> None:
  """Starts jax.distributed when the config asks for several processes.

  Must run before anything touches a device. On CPU, cross-process
  collectives need gloo (the default CPU backend has none).
  """
  explicit = bool(dist_cfg.coordinator_address)
  if not (explicit or dist_cfg.auto):
    return
  if explicit and (dist_cfg.num_processes < 1 or not 0 <= dist_cfg.process_id < dist_cfg.num_processes):
    raise JaxgptError(
        f'distributed.coordinator_address is set, so distributed.num_processes '
        f'({dist_cfg.num_processes}) must be positive and distributed.process_id '
        f'({dist_cfg.process_id}) in [0, num_processes).')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    if explicit:
      jax.distributed.initialize(dist_cfg.coordinator_address, num_processes=dist_cfg.num_processes,
                                 process_id=dist_cfg.process_id)
    else:
      jax.distributed.initialize()  # TPU VM metadata, SLURM or Open MPI environment
  except (RuntimeError, ValueError) as e:
    raise JaxgptError(f'jax.distributed could not start ({str(e).splitlines()[0]}). Check that every '
                      'process uses the same coordinator address and process count, and that process 0 '
                      'is reachable.') from None
