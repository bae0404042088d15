"""Lightning strategies whose sharded checkpoints are written and read by treeckpt.

Lightning's ``ModelParallelStrategy`` and ``FSDPStrategy`` save sharded
checkpoints themselves (they bypass ``CheckpointIO``), so the integration
point is the strategy: these subclasses override only ``save_checkpoint`` and
``load_checkpoint``. Everything else (launching, meshes, wrapping, training)
is Lightning's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy as _FSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy

from treeckpt.core.options import SaveOptions
from treeckpt.lightning._checkpoint import is_treeckpt_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["FSDPStrategy", "ModelParallelStrategy"]


class _TreeckptCheckpoints:
    """save_checkpoint / load_checkpoint through treeckpt, for a sharded strategy."""

    _save_options: SaveOptions | None
    _allow_pickle: bool

    def _sharded(self) -> bool:
        raise NotImplementedError

    # First in each strategy's bases: ``super()`` below is Lightning's strategy.
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if not self._treeckpt_save(checkpoint, filepath, storage_options):
            super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        loaded = self._treeckpt_load(checkpoint_path)
        if loaded is None:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)  # type: ignore[misc]
        return loaded

    def _treeckpt_save(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any
    ) -> bool:
        if not self._sharded():
            return False
        if storage_options is not None:
            raise TypeError(
                f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not "
                "supported: pass save_options=treeckpt.SaveOptions(...) to the strategy"
            )
        strategy: Any = self
        path = str(strategy.broadcast(str(filepath)))
        if Path(path).is_file():  # a full checkpoint file from an earlier run with that name
            if strategy.is_global_zero:
                Path(path).unlink()
            strategy.barrier("treeckpt_replace_file")
        save_checkpoint(
            checkpoint, path, options=self._save_options, allow_pickle=self._allow_pickle
        )
        return True

    def _treeckpt_load(self, checkpoint_path: Any) -> dict[str, Any] | None:
        strategy: Any = self
        path = str(strategy.broadcast(str(checkpoint_path)))
        if not is_treeckpt_checkpoint(path):
            return None  # a checkpoint Lightning wrote itself: Lightning loads it
        assert strategy.model is not None and strategy.lightning_module is not None
        return load_checkpoint(
            path,
            strategy.model,
            [getattr(o, "_optimizer", o) for o in strategy.optimizers],
            strict=strategy.lightning_module.strict_loading,
            allow_pickle=self._allow_pickle,
        )


class ModelParallelStrategy(_TreeckptCheckpoints, _ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, tensor parallel, DTensor), checkpointed by treeckpt.

    A drop-in: same arguments as Lightning's, plus ``save_options`` (a
    :class:`treeckpt.SaveOptions`) and ``allow_pickle`` (store metadata
    Lightning cannot give as plain values with pickle; off by default).
    ``trainer.fit(ckpt_path=...)`` also accepts checkpoints Lightning wrote
    itself (its distributed-checkpoint folders or single files).
    """

    def __init__(
        self,
        *args: Any,
        save_options: SaveOptions | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._save_options = save_options
        self._allow_pickle = allow_pickle

    def _sharded(self) -> bool:
        return bool(self._save_distributed_checkpoint)


class FSDPStrategy(_TreeckptCheckpoints, _FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with ``state_dict_type="sharded"`` (the default here), checkpointed by treeckpt.

    Same arguments as Lightning's, plus ``save_options`` and ``allow_pickle``
    (see :class:`ModelParallelStrategy`). With ``state_dict_type="full"``
    Lightning writes its single file as before. FSDP needs CUDA.
    """

    def __init__(
        self,
        *args: Any,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        save_options: SaveOptions | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs["state_dict_type"] = state_dict_type
        super().__init__(*args, **kwargs)
        self._save_options = save_options
        self._allow_pickle = allow_pickle

    def _sharded(self) -> bool:
        return bool(self._state_dict_type == "sharded")
