"""Split-KV decode attention (kernels.attention_decode_times_s): a hand-checked case and its laws on the fitted GPUs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.catalog.loader import default_catalog
from service.planning.kernels import (
    DEFAULT_DECODE_HEAD_DIM,
    KernelCalibration,
    attention_decode_time_s,
    attention_decode_times_s,
)
from service.planning.specs import DType
from tests.specs_for_tests import gpu_spec

# 1 TB/s, 1 PFLOP/s bf16, 100 SMs.
GPU = gpu_spec()
CAL = KernelCalibration(
    attention_decode_launch_s=1.0e-5,
    attention_decode_memory_ramp_s=1.0e-6,
    attention_decode_per_sequence_bytes=1.0e5,
    attention_decode_bandwidth_efficiency={DType.BF16: 0.5, DType.FP8: 0.5},
    attention_decode_compute_efficiency=0.5,
    attention_decode_cta_fixed_s=2.0e-6,
    attention_decode_cta_stream_cost=0.5,
    attention_decode_cta_mma_cost=2.0,
    attention_decode_fp8_mma_factor=3.0,
    attention_decode_ctas_per_sm=2.0,
)


def _decode(sequences: float, context: float, kv_dtype: DType = DType.BF16) -> float:
    # 8 KV heads of 128 dims, 4 query heads per KV head: 8 x 2 x 128 x bytes per token.
    per_token = 8 * 2 * 128 * kv_dtype.bytes_per_element
    return attention_decode_time_s(
        sequences=sequences,
        context_tokens=context,
        kv_bytes_per_token=per_token,
        kv_dtype=kv_dtype,
        flops=4.0 * 32 * 128 * context,
        kv_heads=8.0,
        head_dim=128.0,
        gpu=GPU,
        calibration=CAL,
    )


def test_one_long_sequence_splits_its_ctas_and_is_bound_by_the_kv_stream() -> None:
    # 1 sequence of 64k keys: 8 KV heads x 1 m-block (4 rows <= tile_m 64) = 8 CTAs before splitting;
    # 8 x 65536 / 128 = 4096 key tiles, capped at 2 x 100 CTA slots that stream at once.
    # Per key: stream 512 B x 0.5 x 100 / 1e12 = 25.6 ns; MMA 4 x 64 x 128 x 2 x 100 / 1e15 = 6.5536 ns.
    # CTA chain 65536 x 8 x 25.6 ns / 200 = 67.108864 us plus one 2 us prologue; the whole-GPU KV stream binds:
    # 65536 x 4096 B / (1e12 x 0.5) = 536.870912 us plus its 1 us ramp.
    expected = 1.0e-5 + 1.0e5 / 1e12 + 1.0e-6 + 65536 * 4096 / 0.5e12
    assert _decode(1, 65536) == pytest.approx(expected, rel=1e-12)


def test_short_contexts_are_bound_by_the_kv_stream_until_hbm_is_fast() -> None:
    # 4 sequences of 256 keys (1024 in all): 4 x 8 = 32 CTAs; key tiles 8 x 1024 / 128 = 64 stream at once.
    # CTA chain: 1024 x 8 x 25.6 ns / 64 = 3.2768 us + 2 us prologue; KV stream 1024 x 4096 / 0.5e12 = 8.388608 us
    # + 1 us ramp binds. fp8 cache: 256 B per key per head streams in 12.8 ns, MMA 3 x 6.5536 = 19.6608 ns binds the
    # chain: 1024 x 8 x 19.6608 ns / 64 = 2.5165824 us + 2 us, below the fp8 stream 4.194304 us + 1 us.
    assert _decode(4, 1024) == pytest.approx(1.0e-5 + 4 * 1.0e5 / 1e12 + 1.0e-6 + 1024 * 4096 / 0.5e12, rel=1e-12)
    assert _decode(4, 1024, DType.FP8) == pytest.approx(
        1.0e-5 + 4 * 1.0e5 / 1e12 + 1.0e-6 + 1024 * 2048 / 0.5e12, rel=1e-12
    )
    # With a fast HBM (100 TB/s) the chain binds: stream 8.4e-8 s + 1 us < chain; per-sequence bytes 4e5 / 1e14.
    fast = gpu_spec(hbm_bandwidth_bytes_per_s=1.0e14)
    got = attention_decode_time_s(
        sequences=4,
        context_tokens=1024,
        kv_bytes_per_token=4096.0,
        kv_dtype=DType.BF16,
        flops=4.0 * 32 * 128 * 1024,
        kv_heads=8.0,
        head_dim=128.0,
        gpu=fast,
        calibration=CAL,
    )
    # Stream per key at 100 TB/s: 512 x 0.5 x 100 / 1e14 = 0.256 ns < MMA 6.5536 ns: 1024 x 8 x 6.5536 ns / 64.
    assert got == pytest.approx(1.0e-5 + 4 * 1.0e5 / 1e14 + 2.0e-6 + 1024 * 8 * 6.5536e-9 / 64, rel=1e-12)


def test_many_sequences_queue_their_ctas() -> None:
    # 100 sequences x 8 KV heads = 800 CTAs over 200 slots: the fixed cost is paid 4 times. Parallel work is
    # counted in key tiles (8 x 100 / 128 = 6.25), so that more sequences over the same keys never cost less:
    # chain 100 x 8 x 25.6 ns / 6.25 = 3.2768 us beats the KV stream 100 x 4096 / 0.5e12 = 0.8192 us.
    t = _decode(100, 100.0)
    assert t == pytest.approx(1.0e-5 + 100 * 1.0e5 / 1e12 + 4 * 2.0e-6 + 100 * 8 * 25.6e-9 / 6.25, rel=1e-12)


def test_thousands_of_ctas_hide_their_prologues_under_the_kv_stream() -> None:
    # 2000 sequences x 8 KV heads = 16,000 CTAs: 80 waves of 2 us prologues (160 us) and a chain of
    # 4,096,000 x 8 x 25.6 ns / 200 = 4.194304 ms, while the KV stream takes 4,096,000 x 4096 / 0.5e12 =
    # 33.554432 ms: one roof binds, and the prologues run while the other SMs stream.
    t = _decode(2000, 2000 * 2048.0)
    assert t == pytest.approx(1.0e-5 + 2000 * 1.0e5 / 1e12 + 1.0e-6 + 2000 * 2048 * 4096 / 0.5e12, rel=1e-12)


def test_without_head_shape_heads_are_taken_128_wide() -> None:
    derived = attention_decode_time_s(
        sequences=3.0,
        context_tokens=3000.0,
        kv_bytes_per_token=4096.0,
        kv_dtype=DType.BF16,
        flops=4.0 * 32 * 128 * 3000,
        gpu=GPU,
        calibration=CAL,
    )
    assert DEFAULT_DECODE_HEAD_DIM == 128.0
    assert derived == _decode(3, 3000)


CATALOG = default_catalog()


@pytest.mark.parametrize("name", ["h100-sxm", "b200"])
@settings(max_examples=300, deadline=None)
@given(
    seqs=st.integers(1, 3000),
    more=st.integers(1, 600),
    ctx=st.floats(1.0, 2.0e7),
    kv_heads=st.sampled_from([1.0, 2.0, 4.0, 8.0]),
    group=st.sampled_from([1.0, 4.0, 8.0, 16.0, 64.0]),
    head_dim=st.sampled_from([64.0, 128.0, 256.0]),
    fp8=st.booleans(),
    extra=st.floats(0.0, 1.0e6),
)
def test_fitted_decode_laws(
    name: str,
    seqs: int,
    more: int,
    ctx: float,
    kv_heads: float,
    group: float,
    head_dim: float,
    fp8: bool,
    extra: float,
) -> None:
    # With the shipped constants: more sequences over the same context, or more context, never cost less.
    spec = CATALOG.gpu(name)
    cal = CATALOG.calibration_for(spec)
    dtype = DType.FP8 if fp8 else DType.BF16

    def t(n: float, keys: float) -> float:
        return attention_decode_time_s(
            sequences=n,
            context_tokens=keys,
            kv_bytes_per_token=2 * kv_heads * head_dim * dtype.bytes_per_element,
            kv_dtype=dtype,
            flops=4.0 * kv_heads * group * head_dim * keys,
            kv_heads=kv_heads,
            head_dim=head_dim,
            gpu=spec,
            calibration=cal,
        )

    base = t(seqs, ctx)
    assert t(seqs + more, ctx) >= base
    assert t(seqs, ctx + extra) >= base


@pytest.mark.parametrize("name", ["h100-sxm", "b200"])
def test_scalar_decode_equals_the_vectorised_kernel_table_path(name: str) -> None:
    # The step model's scalar arithmetic and the kernel tables' arrays are one formula.
    spec = CATALOG.gpu(name)
    cal = CATALOG.calibration_for(spec)
    for seqs, ctx, kv_heads, group, head_dim, dtype in [
        (1, 131072.0, 1.0, 8.0, 128.0, DType.FP8),
        (64, 64 * 2048.0, 8.0, 4.0, 64.0, DType.BF16),
        (2048, 2048 * 2.0, 4.0, 16.0, 256.0, DType.BF16),
        (3, 10.0, 2.0, 64.0, 192.0, DType.FP8),
    ]:
        per_token = 2 * kv_heads * head_dim * dtype.bytes_per_element
        flops = 4.0 * kv_heads * group * head_dim * ctx
        eff = cal.attention_decode_bandwidth_efficiency[dtype]
        vector = attention_decode_times_s(
            sequences=np.array([seqs], dtype=np.float64),
            context_tokens=np.array([ctx]),
            kv_bytes_per_token=np.array([per_token]),
            bandwidth_efficiency=np.array([eff]),
            flops=np.array([flops]),
            kv_heads=np.array([kv_heads]),
            head_dim=np.array([head_dim]),
            fp8_kv=np.array([dtype is DType.FP8]),
            gpu=spec,
            calibration=cal,
        )
        scalar = attention_decode_time_s(
            sequences=seqs,
            context_tokens=ctx,
            kv_bytes_per_token=per_token,
            kv_dtype=dtype,
            flops=flops,
            kv_heads=kv_heads,
            head_dim=head_dim,
            gpu=spec,
            calibration=cal,
        )
        assert scalar == pytest.approx(float(vector[0]), rel=1e-12)
