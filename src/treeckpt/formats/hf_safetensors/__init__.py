"""Hugging Face safetensors folders: read and written through DCP's storage protocol.

- :mod:`~treeckpt.formats.hf_safetensors.layout`: the file format and the
  folder layout (header, file names, the index, byte ranges of a region),
  pure;
- :mod:`~treeckpt.formats.hf_safetensors.files`: headers, regions and whole
  files through treeckpt's storage backends (local or any fsspec URL);
- :mod:`~treeckpt.formats.hf_safetensors.writer`: :class:`SafetensorsWriter`,
  the ``StorageWriter`` behind ``treeckpt.dcp.HuggingFaceStorageWriter``;
- :mod:`~treeckpt.formats.hf_safetensors.reader` and
  :mod:`~treeckpt.formats.hf_safetensors.quantized`: the ``StorageReader``\\ s
  behind ``HuggingFaceStorageReader`` and ``QuantizedHuggingFaceStorageReader``;
- :mod:`~treeckpt.formats.hf_safetensors.consolidate`: the ranks' pieces
  into whole-tensor files, spread over every rank in bounded memory;
- :mod:`~treeckpt.formats.hf_safetensors.folder`: a whole folder to and from
  a flat dict of tensors (``treeckpt convert``).
"""

from treeckpt.formats.hf_safetensors.consolidate import (
    ConsolidationPlan,
    consolidate_on_every_rank,
    plan_consolidation,
)
from treeckpt.formats.hf_safetensors.files import Folder, ReadCounter, read_folder, read_header
from treeckpt.formats.hf_safetensors.layout import INDEX_NAME, SHARDED_DIR, SUFFIX, file_name
from treeckpt.formats.hf_safetensors.quantized import QuantizedSafetensorsReader
from treeckpt.formats.hf_safetensors.reader import SafetensorsReader
from treeckpt.formats.hf_safetensors.writer import SafetensorsWriter

__all__ = [
    "INDEX_NAME",
    "SHARDED_DIR",
    "SUFFIX",
    "ConsolidationPlan",
    "Folder",
    "QuantizedSafetensorsReader",
    "ReadCounter",
    "SafetensorsReader",
    "SafetensorsWriter",
    "consolidate_on_every_rank",
    "file_name",
    "plan_consolidation",
    "read_folder",
    "read_header",
]
