"""The decode-attention bins bench: each row lands in its KV-bytes x CTAs cell, per KV dtype, with the cell's median."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.decode_attention_bins import BYTES_EDGES, CTA_EDGES, bins, decode_overrides

DTYPE = [
    ("batch_size", "f8"),
    ("past_kv_len", "f8"),
    ("num_key_value_heads", "f8"),
    ("head_dim", "f8"),
    ("kv_cache_dtype", "U8"),
]


def test_rows_fall_in_their_bytes_and_cta_cells_with_the_median_ratio() -> None:
    rows = np.array(
        [
            # 256 x 1024 x 2 x 8 x 128 x 2 B = 1,073,741,824 B (> 1e9), 2048 CTAs (1024-2048).
            (256, 1023, 8, 128, "bf16"),
            (256, 1023, 8, 128, "bf16"),
            (256, 1023, 8, 128, "bf16"),
            # 1 x 100 x 2 x 1 x 64 x 1 B = 12,800 B (< 1e6), 1 CTA; fp8.
            (1, 99, 1, 64, "fp8"),
        ],
        dtype=DTYPE,
    )
    grid = bins(rows, np.array([1.1, 0.9, 1.3, 0.5]))
    assert len(grid["bf16"]) == len(BYTES_EDGES) - 1
    assert all(len(line) == len(CTA_EDGES) - 1 for line in grid["bf16"])
    assert grid["bf16"][-1][3] == (1.1, 3)
    assert grid["fp8"][0][0] == (0.5, 1)
    # Every other cell is empty (NaN median, no rows).
    filled = [(d, i, j) for d, g in grid.items() for i, line in enumerate(g) for j, (_, n) in enumerate(line) if n]
    assert sorted(filled) == [("bf16", len(BYTES_EDGES) - 2, 3), ("fp8", 0, 0)]
    assert math.isnan(grid["bf16"][0][0][0])


def test_a_calibration_file_gives_its_decode_constants_the_gpu_section_over_the_default(tmp_path: Path) -> None:
    path = tmp_path / "calibration.yaml"
    path.write_text(
        "default:\n  attention_decode_launch_s: 1.0e-5\n  attention_decode_memory_ramp_s: 2.0e-6\n  gemm_launch_s: 1\n"
        "b200:\n  attention_decode_launch_s: 3.0e-5\n"
    )
    assert decode_overrides(path, "b200") == {
        "attention_decode_launch_s": 3.0e-5,
        "attention_decode_memory_ramp_s": 2.0e-6,
    }
    assert decode_overrides(path, "h100-sxm") == {
        "attention_decode_launch_s": 1.0e-5,
        "attention_decode_memory_ramp_s": 2.0e-6,
    }
    path.write_text("- 1\n")
    with pytest.raises(ValueError, match="not a calibration file"):
        decode_overrides(path, "b200")
