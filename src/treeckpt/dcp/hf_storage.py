"""``HuggingFaceStorageWriter`` and ``HuggingFaceStorageReader``, as in
``torch.distributed.checkpoint.hf_storage``.

Same parameters and defaults as torch's; the folders they write are what
``transformers``' ``from_pretrained`` and ``safetensors.torch.load_file``
read. The implementation is :mod:`treeckpt.formats.hf_safetensors`: reads
fetch only the byte ranges each rank needs, and with
``enable_consolidation=True`` the whole-tensor files are assembled by every
rank, each writing a disjoint share of them.
"""

from __future__ import annotations

from treeckpt.dcp.staging import BlockingAsyncStager
from treeckpt.formats.hf_safetensors import SafetensorsReader, SafetensorsWriter

__all__ = ["HuggingFaceStorageReader", "HuggingFaceStorageWriter"]


class HuggingFaceStorageWriter(SafetensorsWriter, BlockingAsyncStager):
    """Writes a Hugging Face safetensors folder (see :class:`SafetensorsWriter`).

    Args:
        path: the folder.
        fqn_to_index_mapping: tensor FQN to file index (1 to N); ``None``: one file.
        thread_count: files written at a time per rank.
        save_distributed: each rank writes its own pieces (``shard-...`` files).
        enable_consolidation: with ``save_distributed``, pieces go to
            ``path/sharded`` and whole-tensor files to ``path``, assembled by
            every rank after the save.
        thread_count_consolidation: output files each rank assembles at a time.
    """

    def __init__(
        self,
        path: str,
        fqn_to_index_mapping: dict[str, int] | None = None,
        thread_count: int = 1,
        save_distributed: bool = False,
        enable_consolidation: bool = False,
        thread_count_consolidation: int = 1,
    ) -> None:
        SafetensorsWriter.__init__(
            self,
            path,
            fqn_to_index_mapping,
            thread_count,
            save_distributed,
            enable_consolidation,
            thread_count_consolidation,
        )
        BlockingAsyncStager.__init__(self)


class HuggingFaceStorageReader(SafetensorsReader):
    """Reads a Hugging Face safetensors folder into any sharding (see :class:`SafetensorsReader`).

    Args:
        path: the folder.
        thread_count: files read at a time.
    """

    def __init__(self, path: str, thread_count: int = 1) -> None:
        super().__init__(path, thread_count)
