"""Other programs' checkpoint formats, read and written without running their pickles.

Each format is a subpackage with public modules, used by the DCP facade
(:mod:`treeckpt.dcp`) and the tools (:mod:`treeckpt.tools`), never the other
way round:

- :mod:`treeckpt.formats.torch_dcp`: directories torch's own
  ``torch.distributed.checkpoint`` wrote (``.metadata`` plus ``.distcp``
  files), and ``torch.save`` files written a tensor at a time.
- :mod:`treeckpt.formats.hf_safetensors`: Hugging Face safetensors folders
  (sharded files and their index, the pieces of a distributed save, FP8 and
  MXFP4 quantized weights), through DCP's storage protocol.

Importing this package loads no format; import the subpackage you need.
"""
