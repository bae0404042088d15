"""A drop-in for ``torch.distributed.checkpoint``: ``import treeckpt.dcp as dcp``.

Same module paths, names, signatures and defaults as DCP, with treeckpt's
format, speed and safety underneath (see the DCP migration guide in the docs).
"""

from treeckpt.dcp.api import CheckpointException
from treeckpt.dcp.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from treeckpt.dcp.filesystem import FileSystemReader, FileSystemWriter
from treeckpt.dcp.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from treeckpt.dcp.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from treeckpt.dcp.optimizer import load_sharded_optimizer_state_dict
from treeckpt.dcp.planner import LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner, WriteItem
from treeckpt.dcp.quantized_hf_storage import QuantizedHuggingFaceStorageReader
from treeckpt.dcp.state_dict_loader import load, load_state_dict
from treeckpt.dcp.state_dict_saver import async_save, save, save_state_dict
from treeckpt.dcp.stateful import Stateful
from treeckpt.dcp.storage import StorageReader, StorageWriter

__all__ = [
    "BytesStorageMetadata",
    "CheckpointException",
    "ChunkStorageMetadata",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "FileSystemReader",
    "FileSystemWriter",
    "HuggingFaceStorageReader",
    "HuggingFaceStorageWriter",
    "LoadPlan",
    "LoadPlanner",
    "Metadata",
    "QuantizedHuggingFaceStorageReader",
    "ReadItem",
    "SavePlan",
    "SavePlanner",
    "Stateful",
    "StorageReader",
    "StorageWriter",
    "TensorStorageMetadata",
    "WriteItem",
    "async_save",
    "load",
    "load_sharded_optimizer_state_dict",
    "load_state_dict",
    "save",
    "save_state_dict",
]
