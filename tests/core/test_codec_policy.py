"""The adaptive codec policy: exact choices for given rates (no I/O, no clocks)."""

from __future__ import annotations

import pytest

from treeckpt.core.codec_policy import ClassRate, SaveCost, choose_codecs, save_seconds, update_rate

# Sizes and rates are powers of two, so every estimate below is exact in binary.


def test_slow_storage_compresses_every_chunk() -> None:
    chunks = [(128, "bf16")] * 4
    picked, chosen, raw = choose_codecs(
        chunks, {"bf16": ClassRate(2.0, 1024.0)}, write_bps=128.0, lanes=2, cores=2
    )
    assert picked == (True, True, True, True)
    assert chosen == SaveCost(encode_s=0.5, write_s=2.0, total_s=2.0)
    assert raw == SaveCost(encode_s=0.0, write_s=4.0, total_s=4.0)


def test_fast_storage_with_a_slow_codec_writes_raw() -> None:
    chunks = [(128, "bf16")] * 4
    picked, chosen, raw = choose_codecs(
        chunks, {"bf16": ClassRate(2.0, 128.0)}, write_bps=1024.0, lanes=2, cores=2
    )
    assert picked == (False,) * 4
    assert chosen == raw == SaveCost(encode_s=0.0, write_s=0.5, total_s=0.5)


def test_compresses_until_the_cores_become_the_bottleneck() -> None:
    # each chunk: 1 s of encoding, 0.25 s less writing; after 3 chunks the
    # lanes (encode then write, in sequence) bound the save: 3.25 s, then 3.5 s;
    # the 3 chunks are spread over the 8, so encoding overlaps writing
    chunks = [(128, "bf16")] * 8
    picked, chosen, raw = choose_codecs(
        chunks, {"bf16": ClassRate(2.0, 128.0)}, write_bps=256.0, lanes=2, cores=2
    )
    assert picked == (False, True, False, False, True, False, True, False)
    assert chosen == SaveCost(encode_s=3.0, write_s=3.25, total_s=3.25)
    assert raw.total_s == 4.0


def test_a_gain_inside_min_gain_is_not_taken() -> None:
    chunks = [(128, "bf16")] * 8
    rates = {"bf16": ClassRate(2.0, 128.0)}
    picked, chosen, raw = choose_codecs(
        chunks, rates, write_bps=256.0, lanes=2, cores=2, min_gain=0.2
    )
    assert picked == (False,) * 8  # 3.25 s against 4 s: 18.75 % < 20 %
    assert chosen == raw


def test_the_class_that_saves_most_per_cpu_second_goes_first() -> None:
    # bf16 saves 0.5 * 256 = 128 B per encode second, f32 0.25 * 256 = 64
    chunks = [(128, "f32"), (128, "bf16"), (128, "f32"), (128, "bf16")]
    rates = {"f32": ClassRate(4 / 3, 256.0), "bf16": ClassRate(2.0, 256.0)}
    picked, chosen, raw = choose_codecs(chunks, rates, write_bps=256.0, lanes=2, cores=2)
    assert picked == (False, True, True, True)  # both bf16 chunks, the middle f32 one
    assert chosen == SaveCost(encode_s=1.5, write_s=1.375, total_s=1.4375)
    assert raw.total_s == 2.0


def test_classes_that_do_not_shrink_or_were_not_probed_stay_raw() -> None:
    chunks = [(128, "u8"), (128, "i64"), (0, "bf16"), (128, "bf16")]
    rates = {"u8": ClassRate(1.0, 1024.0), "bf16": ClassRate(2.0, 1024.0)}
    picked, _, _ = choose_codecs(chunks, rates, write_bps=64.0, lanes=2, cores=2)
    assert picked == (False, False, False, True)


def test_one_lane_encodes_on_one_core() -> None:
    assert save_seconds(4.0, 1.0, lanes=1, cores=8) == 5.0
    assert save_seconds(4.0, 1.0, lanes=4, cores=2) == 2.0
    assert save_seconds(1.0, 3.0, lanes=2, cores=2) == 3.0


def test_bad_rates_are_refused() -> None:
    with pytest.raises(ValueError, match="write_bps must be positive"):
        choose_codecs([(1, "x")], {}, write_bps=0.0, lanes=1, cores=1)
    with pytest.raises(ValueError, match="ratio must be positive"):
        ClassRate(float("nan"), 1.0)
    with pytest.raises(ValueError, match="encode_bps must be positive"):
        ClassRate(2.0, 0.0)


def test_update_rate_is_a_moving_average() -> None:
    assert update_rate(None, 5.0) == 5.0
    assert update_rate(4.0, 8.0) == 6.0
    assert update_rate(4.0, 8.0, weight=0.25) == 5.0
