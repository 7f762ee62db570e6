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
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.config import JaxgptError

MESH_AXES = ('data', 'fsdp', 'tensor')
DCN_AXES = ('data', 'fsdp')  # the axes that may also span slices (mesh.dcn_data, mesh.dcn_fsdp)
DCN_DEFAULTS = {'data': -1, 'fsdp': 1}  # base_config's: data parallel across every slice

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


def _fill(sizes: list[int], total: int, names: tuple[str, ...], unit: str, where: str = '') -> tuple[int, ...]:
  """`sizes` with its -1 (at most one) taking what the others leave of `total`; their product must be `total`."""
  described = ', '.join(f'{n}={s}' for n, s in zip(names, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise JaxgptError(f'mesh ({described}) is invalid: sizes must be positive, with at most one -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise JaxgptError(f'mesh ({described}) does not divide the {total} {unit}{where}: the fixed axes multiply '
                        f'to {known}. Choose sizes whose product divides {total}.')
    sizes = [total // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != total:
    raise JaxgptError(f'mesh ({described}) needs {math.prod(sizes)} {unit} but {total} are available{where}. '
                      f'Make the product of {", ".join(f"mesh.{n}" for n in names)} equal {total}, '
                      'or set one of them to -1.')
  return tuple(sizes)


def slice_shapes(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(sizes within a slice, sizes across slices) of the (data, fsdp, tensor) axes.

  A slice is a set of devices on fast links (ICI on a TPU slice, NVLink in a GPU host);
  slices talk over the data-centre network (DCN). mesh.data, mesh.fsdp and mesh.tensor shape
  one slice; mesh.dcn_data and mesh.dcn_fsdp (MaxText's dcn_*_parallelism) repeat that shape
  across slices, so the mesh's data axis has mesh.data x mesh.dcn_data devices. The default
  dcn_data=-1 makes the batch data parallel across however many slices there are.
  """
  if num_devices % num_slices:
    raise JaxgptError(f'{num_devices} devices cannot form {num_slices} equal slices.')
  across = _fill([int(mesh_cfg.get(f'dcn_{a}', DCN_DEFAULTS[a])) for a in DCN_AXES], num_slices,
                 tuple(f'dcn_{a}' for a in DCN_AXES), 'slices', ' (TPU slices, or GPU hosts)')
  within = _fill([int(mesh_cfg[a]) for a in MESH_AXES], num_devices // num_slices,
                 MESH_AXES, 'devices', ' in each slice' if num_slices > 1 else '')
  return within, across + (1,)


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[int, ...]:
  """The (data, fsdp, tensor) sizes of the whole mesh: within a slice times across slices."""
  within, across = slice_shapes(mesh_cfg, num_devices, num_slices)
  return tuple(w * a for w, a in zip(within, across))


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
  """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out along the network's topology."""
  devices = jax.devices() if devices is None else list(devices)
  slices = {getattr(d, 'slice_index', 0) for d in devices}  # CPU devices have none: one slice
  within, across = slice_shapes(mesh_cfg, len(devices), len(slices))
  auto = (AxisType.Auto,) * len(MESH_AXES)  # the model's logical-rule constraints need Auto axes
  if len(slices) == 1:
    return jax.make_mesh(within, MESH_AXES, axis_types=auto, devices=devices)
  # jax.make_mesh refuses devices on several slices: each slice gets the `within` mesh on its
  # fast links, and the slices are tiled `across` along the slow network.
  try:
    # Splitting a physical torus axis between two mesh axes (jax.make_mesh does on v5e) beats
    # failing on a slice shape that does not map whole axes.
    grid = mesh_utils.create_hybrid_device_mesh(within, across, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError) as e:
    raise JaxgptError(f'no mesh with {within} within each slice and {across} across the {len(slices)} slices: '
                      f'{str(e).splitlines()[0]}. Check mesh.* against the slices.') from None
  return Mesh(grid, MESH_AXES, axis_types=auto)


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


def put_global(tree, shardings):
  """Host values that every process holds alike, as global arrays placed by `shardings` (a matching tree)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def to_host(tree):
  """NumPy copies of arrays, gathered from the other processes where this one holds only a part."""
  return jax.tree.map(lambda x: np.asarray(x) if x.is_fully_addressable
                      else multihost_utils.process_allgather(x, tiled=True), tree)


def check_shardable(abstract, fix: str) -> None:
  """Refuses arrays (ShapeDtypeStructs with NamedShardings) whose dimensions their mesh axes do not divide:
  XLA would fail deep inside. `fix` says what to change."""
  problems = []
  for path, leaf in jax.tree.flatten_with_path(abstract)[0]:
    for size, axes in zip(leaf.shape, leaf.sharding.spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(leaf.sharding.mesh.shape[name] for name in names)
      if size % ways:
        name = '/'.join(str(getattr(key, 'key', key)) for key in path)
        problems.append(f'{name} has a dimension of {size}, split {ways} ways over {" x ".join(names)}')
  if problems:
    raise JaxgptError(f'the mesh does not divide the model: {"; ".join(problems[:4])}'
                      f'{f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""}. {fix}')


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
