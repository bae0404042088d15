"""Reading quantized safetensors folders, dequantizing on load.

Two layouts, the ones torch's ``QuantizedHuggingFaceStorageReader`` handles:

- **FP8 with block scales** (DeepSeek-V3): a 2-D ``<name>.weight``
  (``float8_e4m3fn``) beside ``<name>.weight_scale_inv``, one scale per
  ``block_size x block_size`` block (the last blocks may be partial). An
  element is ``float32(weight) * scale`` of its block, then cast to
  ``target_dtype``.
- **MXFP4** (gpt-oss): ``<name>_blocks`` (``uint8``, shape ``[..., G, B]``,
  two 4-bit E2M1 codes per byte, low nibble first) beside ``<name>_scales``
  (``uint8``, ``[..., G]``, a power-of-two exponent biased by 127). The
  tensor ``<name>_blocks`` loads as ``[..., G * B * 2]`` of ``target_dtype``:
  each code's value times ``2 ** (scale - 127)``.

The quantized tensor is described to the planner with ``target_dtype`` and
its dequantized shape. A region is read as the byte ranges of the codes
it covers and of the scales of the blocks it meets, never more. Quantized
tensors are whole-tensor entries (not pieces of a distributed save).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from treeckpt.core.box import Box
from treeckpt.errors import ManifestError, OptionsError
from treeckpt.formats.hf_safetensors.files import Folder, read_region
from treeckpt.formats.hf_safetensors.layout import Entry
from treeckpt.formats.hf_safetensors.reader import SafetensorsReader, folder_metadata
from treeckpt.formats.torch_dcp.protocol import stored_box
from treeckpt.store.backends import Backend

__all__ = [
    "FP4_VALUES",
    "QuantizedSafetensorsReader",
    "dequantize_fp8_blocks",
    "dequantize_mxfp4",
]

#: The 16 values of an E2M1 (FP4) code, by code.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)

_FP8_SCALE = ".weight_scale_inv"
_MX_SCALES = "_scales"
_MX_BLOCKS = "_blocks"


def dequantize_fp8_blocks(
    weight: torch.Tensor,
    scale: torch.Tensor,
    origin: tuple[int, int],
    block_origin: tuple[int, int],
    block_size: int,
    target_dtype: torch.dtype,
) -> torch.Tensor:
    """``float32(weight) * scale`` of each element's block, cast to ``target_dtype``.

    ``weight`` is the region at ``origin`` of the whole weight; ``scale``
    holds the scales of the blocks it meets, the first being block
    ``block_origin``.
    """
    rows = torch.arange(origin[0], origin[0] + weight.shape[0]) // block_size - block_origin[0]
    cols = torch.arange(origin[1], origin[1] + weight.shape[1]) // block_size - block_origin[1]
    per_element = scale[rows][:, cols]
    return (weight.to(torch.float32) * per_element).to(target_dtype)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, target_dtype: torch.dtype
) -> torch.Tensor:
    """``[..., G, B]`` codes and ``[..., G]`` exponents to ``[..., G * B * 2]`` values."""
    lut = torch.tensor(FP4_VALUES, dtype=target_dtype)
    *prefix, g, b = blocks.shape
    vals = torch.empty((*prefix, g, b * 2), dtype=target_dtype)
    vals[..., 0::2] = lut[(blocks & 0x0F).long()]
    vals[..., 1::2] = lut[(blocks >> 4).long()]
    exp = scales.to(torch.int32).unsqueeze(-1) - 127
    return torch.ldexp(vals, exp).to(target_dtype).reshape(*prefix, g * b * 2)


class QuantizedSafetensorsReader(SafetensorsReader):
    """A :class:`SafetensorsReader` that dequantizes FP8 block-scaled and MXFP4 tensors."""

    def __init__(
        self,
        path: str,
        thread_count: int = 1,
        target_dtype: torch.dtype = torch.float32,
        block_size: int = 128,
    ):
        if block_size < 1:
            raise OptionsError(f"block_size must be positive, got {block_size}")
        super().__init__(path, thread_count)
        self.target_dtype = target_dtype
        self.block_size = block_size
        #: quantized tensor -> (its layout, its scale tensor)
        self.quantized: dict[str, tuple[str, str]] = {}
        self._whole: dict[str, tuple[str, Entry]] = {}

    def _use(self, folder: Folder) -> None:
        super()._use(folder)
        whole: dict[str, tuple[str, Entry]] = {}
        counts: dict[str, int] = {}
        for file, e in folder.pieces():
            whole[e.name] = (file, e)
            counts[e.name] = counts.get(e.name, 0) + 1
        quantized: dict[str, tuple[str, str]] = {}
        for name in whole:
            if name.endswith(_FP8_SCALE):
                target = name[: -len(_FP8_SCALE)] + ".weight"
                kind = "fp8"
            elif name.endswith(_MX_SCALES):
                target = name[: -len(_MX_SCALES)] + _MX_BLOCKS
                kind = "mxfp4"
            else:
                continue
            if target not in whole:
                continue
            for n in (target, name):
                if counts[n] != 1 or any(whole[n][1].offsets):
                    raise ManifestError(
                        f"{n!r} in {folder.root}: a quantized tensor or scale stored in pieces"
                    )
            self._check(kind, whole[target][1], whole[name][1], folder.root)
            quantized[target] = (kind, name)
        self.quantized = quantized
        self._whole = whole

    def _check(self, kind: str, q: Entry, s: Entry, root: str) -> None:
        if kind == "fp8":
            want = tuple(math.ceil(n / self.block_size) for n in q.shape)
            if len(q.shape) != 2 or s.shape != want:
                raise ManifestError(
                    f"{q.name!r} in {root}: weight {list(q.shape)} with scales {list(s.shape)}; "
                    f"block size {self.block_size} needs a 2-D weight and scales {list(want)}"
                )
        elif len(q.shape) < 2 or q.dtype != torch.uint8 or s.shape != q.shape[:-1]:
            raise ManifestError(
                f"{q.name!r} in {root}: MXFP4 blocks {q.dtype}{list(q.shape)} with scales "
                f"{list(s.shape)} (want uint8 [..., G, B] and [..., G])"
            )

    def _describe(self, folder: Folder) -> dict[str, TensorStorageMetadata]:
        md = folder_metadata(folder)
        for name, (kind, _) in self.quantized.items():
            shape = self._whole[name][1].shape
            if kind == "mxfp4":
                shape = (*shape[:-2], shape[-2] * shape[-1] * 2)
            md[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=self.target_dtype),
                size=torch.Size(shape),
                chunks=[
                    ChunkStorageMetadata(
                        offsets=torch.Size([0] * len(shape)), sizes=torch.Size(shape)
                    )
                ],
            )
        return md

    def _piece(self, item: ReadItem) -> tuple[str, Entry]:
        if item.storage_index.fqn in self.quantized:  # one whole entry, of another shape
            return self._whole[item.storage_index.fqn]
        return super()._piece(item)

    def _read(self, backend: Backend, file: str, entry: Entry, item: ReadItem) -> torch.Tensor:
        got = self.quantized.get(entry.name)
        if got is None:
            return super()._read(backend, file, entry, item)
        kind, scale_name = got
        scale_file, scale = self._whole[scale_name]
        region = stored_box(item)
        if kind == "fp8":
            return self._read_fp8(backend, file, entry, scale_file, scale, region)
        return self._read_mxfp4(backend, file, entry, scale_file, scale, region)

    def _read_fp8(
        self, backend: Backend, file: str, q: Entry, scale_file: str, s: Entry, region: Box
    ) -> torch.Tensor:
        bs = self.block_size
        (r0, c0), (nr, nc) = region.offsets, region.sizes
        if region.is_empty():
            return torch.empty(region.sizes, dtype=self.target_dtype)
        b0 = (r0 // bs, c0 // bs)
        b1 = ((r0 + nr - 1) // bs + 1, (c0 + nc - 1) // bs + 1)
        weight = read_region(backend, file, q, region, self.counter)
        scales = read_region(
            backend,
            scale_file,
            s,
            Box(offsets=b0, sizes=(b1[0] - b0[0], b1[1] - b0[1])),
            self.counter,
        )
        return dequantize_fp8_blocks(weight, scales, (r0, c0), b0, bs, self.target_dtype)

    def _read_mxfp4(
        self, backend: Backend, file: str, q: Entry, scale_file: str, s: Entry, region: Box
    ) -> torch.Tensor:
        per_group = q.shape[-1] * 2
        if region.is_empty():
            return torch.empty(region.sizes, dtype=self.target_dtype)
        d0, width = region.offsets[-1], region.sizes[-1]
        g0, g1 = d0 // per_group, (d0 + width + per_group - 1) // per_group
        head_off, head_size = region.offsets[:-1], region.sizes[:-1]
        blocks = read_region(
            backend,
            file,
            q,
            Box(offsets=(*head_off, g0, 0), sizes=(*head_size, g1 - g0, q.shape[-1])),
            self.counter,
        )
        scales = read_region(
            backend,
            scale_file,
            s,
            Box(offsets=(*head_off, g0), sizes=(*head_size, g1 - g0)),
            self.counter,
        )
        values = dequantize_mxfp4(blocks, scales, self.target_dtype)
        skip = d0 - g0 * per_group
        return values[..., skip : skip + width]
