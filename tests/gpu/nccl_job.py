"""A one-process job under torchrun with NCCL as the default group: save, load, async-save CUDA state.

    python -m torch.distributed.run --standalone --nproc_per_node=1 tests/gpu/nccl_job.py OUT_DIR

Writes ``OUT_DIR/result.json`` with what it checked; exits non-zero on any mismatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import treeckpt


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def main(out: Path) -> int:
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    backend = dist.get_backend()
    g = torch.Generator(device="cuda").manual_seed(5)
    state = {
        "w": torch.randn(512, 300, device="cuda", generator=g).to(torch.bfloat16),
        "b": torch.randn(300, device="cuda", generator=g),
        "step": 11,
    }
    expected = {k: _bits(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    opts = treeckpt.SaveOptions(chunk_bytes=64 << 10)
    treeckpt.save(state, out / "sync", options=opts)
    template = {"w": torch.zeros_like(state["w"]), "b": torch.zeros_like(state["b"]), "step": 0}
    treeckpt.load(template, out / "sync")
    sync_ok = all(_bits(template[k]) == v for k, v in expected.items()) and template["step"] == 11
    fut = treeckpt.async_save(state, out / "async", options=opts)
    for v in state.values():
        if isinstance(v, torch.Tensor):
            v.add_(1)  # training goes on: the checkpoint keeps the values staged
    fut.result(timeout=120)
    back = treeckpt.restore(out / "async")
    async_ok = all(_bits(back[k]) == v for k, v in expected.items())
    dist.barrier()
    dist.destroy_process_group()
    result = {"backend": backend, "sync_ok": sync_ok, "async_ok": async_ok}
    (out / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))
    return 0 if sync_ok and async_ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
