"""One split of a TFDS dataset prepared as array_record, read without TensorFlow, keyed by index."""

from collections.abc import Iterator

from jaxgpt.config import JaxgptError
from jaxgpt.data.sources.base import Record, Source

_INDICES_PER_UNIT = 4096  # examples per unit a Beam worker reads


class TfdsDataset(Source):

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    import tensorflow_datasets as tfds  # slow to import: only for this source
    data_dir = self.root or None
    try:
      self._builder = tfds.builder(data_cfg.tfds_name, data_dir=data_dir)
      self._examples = self._builder.as_data_source(split=data_cfg.tfds_split)
    except Exception as e:  # TFDS raises many kinds: not found, not prepared, wrong format
      raise JaxgptError(
          f'cannot read TFDS dataset data.tfds_name={data_cfg.tfds_name!r} split {data_cfg.tfds_split!r} '
          f'from data.path={self.root or "(TFDS default)"!r} ({type(e).__name__}: {str(e)[:300]}). It must be '
          'prepared in array_record format, e.g. `tfds build NAME --file_format=array_record`.') from None
    if data_cfg.text_field not in self._builder.info.features:
      raise JaxgptError(f'the TFDS dataset {data_cfg.tfds_name!r} has no feature {data_cfg.text_field!r} '
                        f'(it has {", ".join(self._builder.info.features)}); set data.text_field.')
    self._count = min(len(self._examples), data_cfg.max_docs or len(self._examples))

  def units(self) -> list[tuple[int, int]]:
    return [(start, min(start + _INDICES_PER_UNIT, self._count)) for start in range(0, self._count, _INDICES_PER_UNIT)]

  def read_unit(self, indices: tuple[int, int]) -> Iterator[Record]:
    name = f'{self.cfg.tfds_name}/{self.cfg.tfds_split}'
    for index in range(*indices):
      value = self._examples[index][self.cfg.text_field]
      payload = value if isinstance(value, bytes) else str(value).encode('utf-8')
      yield Record(str(index), f'{name}[{index}]', len(payload), payload)

  def identity(self) -> list:
    return [self._builder.info.full_name, self._builder.data_dir, self.cfg.tfds_split, self._count]
