"""``QuantizedHuggingFaceStorageReader``, as in ``torch.distributed.checkpoint.quantized_hf_storage``.

FP8 weights with ``weight_scale_inv`` block scales (DeepSeek-V3) and MXFP4
``_blocks``/``_scales`` (gpt-oss) are dequantized to ``target_dtype`` on
load; see :mod:`treeckpt.formats.hf_safetensors.quantized`.
"""

from __future__ import annotations

import torch

from treeckpt.dcp.hf_storage import HuggingFaceStorageReader
from treeckpt.formats.hf_safetensors import QuantizedSafetensorsReader

__all__ = ["QuantizedHuggingFaceStorageReader"]


class QuantizedHuggingFaceStorageReader(QuantizedSafetensorsReader, HuggingFaceStorageReader):
    """Reads a quantized safetensors folder, dequantizing to ``target_dtype``.

    Args:
        path: the folder.
        thread_count: files read at a time.
        target_dtype: the dtype quantized tensors load as.
        block_size: the side of an FP8 scale block.
    """

    def __init__(
        self,
        path: str,
        thread_count: int = 1,
        target_dtype: torch.dtype = torch.float32,
        block_size: int = 128,
    ):
        QuantizedSafetensorsReader.__init__(self, path, thread_count, target_dtype, block_size)
