"""The adaptive codec choice in a real save: rates injected, bytes checked bit for bit."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import treeckpt
from treeckpt.core.codec_policy import ClassRate
from treeckpt.shell import codec_choice
from treeckpt.store.backends import LocalBackend, RateLimiter, ThrottledBackend

MB = 1_000_000


@pytest.fixture(autouse=True)
def fresh_rates(monkeypatch: pytest.MonkeyPatch) -> codec_choice.StorageRates:
    rates = codec_choice.StorageRates()
    monkeypatch.setattr(codec_choice, "RATES", rates)
    monkeypatch.setattr(codec_choice, "ENCODE_RATES", codec_choice.StorageRates())
    return rates


def _state(dtype: torch.dtype, n: int = 5 << 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, generator=g) * 0.02).to(dtype)
    return {"w": w, "ids": torch.arange(1 << 16, dtype=torch.int64)}


def _options(**kw: object) -> treeckpt.SaveOptions:
    return treeckpt.SaveOptions(chunk_bytes=1 << 20, io_threads=2, sync=False, **kw)  # type: ignore[arg-type]


def _codecs(path: Path) -> dict[str, dict[str, int]]:
    return {fqn: dict(t.codecs) for fqn, t in treeckpt.metadata(str(path)).tensors.items()}


def _round_trip(state: dict[str, torch.Tensor], path: Path) -> None:
    template = {k: torch.zeros_like(v) for k, v in state.items()}
    loaded = treeckpt.load(template, str(path))
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)), k


def _inject(monkeypatch: pytest.MonkeyPatch, rates: dict[str, ClassRate]) -> None:
    monkeypatch.setattr(codec_choice, "probe_classes", lambda chunks, compression: rates)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_slow_storage_compresses_every_chunk_that_shrinks(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_rates: codec_choice.StorageRates,
    dtype: torch.dtype,
) -> None:
    name = str(dtype).removeprefix("torch.")
    _inject(monkeypatch, {name: ClassRate(1.5, 1e9)})
    backend = ThrottledBackend(LocalBackend(str(tmp_path / "ck")), write_bps=4000 * MB)
    fresh_rates.set(backend.storage_key(), 50 * MB)  # what earlier saves measured
    state = _state(dtype)
    treeckpt.save(state, backend, options=_options())
    codecs = _codecs(tmp_path / "ck")
    assert codecs["w"] == {"planes": state["w"].nbytes >> 20}
    assert codecs["ids"] == {"raw": 1}  # its class was not probed as shrinking
    _round_trip(state, tmp_path / "ck")
    assert backend.written > 0


def test_fast_storage_with_a_slow_codec_writes_raw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_rates: codec_choice.StorageRates
) -> None:
    _inject(monkeypatch, {"bfloat16": ClassRate(1.5, 100 * MB)})
    path = tmp_path / "ck"
    fresh_rates.set(LocalBackend(str(path)).storage_key(), 2000 * MB)
    state = _state(torch.bfloat16)
    treeckpt.save(state, str(path), options=_options())
    assert _codecs(path) == {"w": {"raw": 10}, "ids": {"raw": 1}}
    _round_trip(state, path)


def test_the_mode_overrides_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_rates: codec_choice.StorageRates
) -> None:
    _inject(monkeypatch, {"bfloat16": ClassRate(1.5, 100 * MB)})
    path = tmp_path / "ck"
    fresh_rates.set(LocalBackend(str(path)).storage_key(), 2000 * MB)
    state = _state(torch.bfloat16)
    treeckpt.save(state, str(path), options=_options(compression=treeckpt.Compression(mode="auto")))
    assert _codecs(path)["w"] == {"planes": 10}
    _round_trip(state, path)


def test_a_small_save_is_stored_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _inject(monkeypatch, {"bfloat16": ClassRate(4.0, 1e12)})
    state = _state(torch.bfloat16, n=1 << 20)  # 2 MiB
    backend = ThrottledBackend(LocalBackend(str(tmp_path / "ck")), write_bps=4000 * MB)
    treeckpt.save(state, backend, options=_options())
    assert _codecs(tmp_path / "ck") == {"w": {"raw": 2}, "ids": {"raw": 1}}


def test_first_save_to_slow_storage_measures_then_compresses(
    tmp_path: Path, fresh_rates: codec_choice.StorageRates
) -> None:
    """No rate known: the first chunks go raw while the writers measure the storage
    (20 MB/s here against a codec that encodes hundreds of MB/s), the rest compress."""
    backend = ThrottledBackend(LocalBackend(str(tmp_path / "ck")), write_bps=20 * MB)
    state = _state(torch.bfloat16)
    treeckpt.save(state, backend, options=_options())
    codecs = _codecs(tmp_path / "ck")["w"]
    assert codecs.get("raw", 0) >= 1 and codecs.get("planes", 0) >= 6, codecs
    learned = fresh_rates.get(backend.storage_key())
    assert learned is not None and learned < 30 * MB
    _round_trip(state, tmp_path / "ck")
    # the next save knows the rate: every bf16 chunk compresses
    backend2 = ThrottledBackend(LocalBackend(str(tmp_path / "ck2")), write_bps=20 * MB)
    treeckpt.save(state, backend2, options=_options())
    assert _codecs(tmp_path / "ck2")["w"] == {"planes": 10}
    _round_trip(state, tmp_path / "ck2")


def test_throttled_backend_counts_every_byte(tmp_path: Path) -> None:
    backend = ThrottledBackend(LocalBackend(str(tmp_path)), write_bps=1e12, read_bps=1e12)
    backend.makedirs("d")
    w = backend.open_writer("d/a.bin")
    w.write(b"x" * 1000)
    w.write(memoryview(np.arange(10, dtype=np.int32)).cast("B"))
    w.close(sync=True)
    backend.commit_file("d/m.json", b"{}", sync=True)
    assert backend.written == 1042
    out = bytearray(1040)
    assert backend.readinto("d/a.bin", 0, memoryview(out)) == 1040
    assert backend.read_file("d/m.json", 10) == b"{}"
    assert backend.read == 1042
    assert backend.size("d/a.bin") == 1040  # metadata calls are not counted


def test_rate_limiter_makes_transfers_wait_their_turn() -> None:
    link = RateLimiter(40 * MB)
    t0 = time.monotonic()
    for _ in range(4):
        link.take(1 * MB)
    assert time.monotonic() - t0 >= 0.1  # 4 MB at 40 MB/s, at least
    assert link.total == 4 * MB
    with pytest.raises(ValueError, match="bytes_per_s must be positive"):
        RateLimiter(0)


@pytest.mark.slow
def test_rate_limiter_shared_by_threads_stays_near_its_rate() -> None:
    import threading

    link = RateLimiter(100 * MB)
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=lambda: [link.take(MB) for _ in range(25)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 3.0, elapsed  # 100 MB at 100 MB/s


def test_encode_rates_measured_in_a_save_override_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_rates: codec_choice.StorageRates
) -> None:
    _inject(monkeypatch, {"bfloat16": ClassRate(1.5, 1e12)})  # the probe: a very fast codec
    backend = ThrottledBackend(LocalBackend(str(tmp_path / "a")), write_bps=4000 * MB)
    fresh_rates.set(backend.storage_key(), 50 * MB)
    state = _state(torch.bfloat16)
    treeckpt.save(state, backend, options=_options())
    assert _codecs(tmp_path / "a")["w"] == {"planes": 10}
    measured = codec_choice.ENCODE_RATES.get("bfloat16")
    assert measured is not None and measured < 1e12  # what encoding 10 MiB really took
    # a machine so busy that the codec crawls: the next save writes raw
    codec_choice.ENCODE_RATES.set("bfloat16", 1 * MB)
    backend = ThrottledBackend(LocalBackend(str(tmp_path / "b")), write_bps=4000 * MB)
    treeckpt.save(state, backend, options=_options())
    assert _codecs(tmp_path / "b")["w"] == {"raw": 10}
    _round_trip(state, tmp_path / "b")
    # unmeasured (written raw), the class drifts a quarter of the way back to the probe's half
    assert codec_choice.ENCODE_RATES.get("bfloat16") == 0.75 * 1e6 + 0.25 * (1e12 * 0.5)
