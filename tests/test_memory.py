"""Per-unit peak memory from the kernel's high-water mark."""

import numpy as np

from layertime import memory


def test_the_peak_covers_a_unit_and_resets_for_the_next():
    assert memory.reset_peak()
    base = memory.peak_gb()
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    assert block.sum() > 0
    del block
    peak = memory.peak_gb()
    assert peak - base > 0.25  # the freed array still counts in this unit's peak
    memory.reset_peak()
    assert memory.peak_gb() < peak - 0.25  # the next unit starts from what is resident now
