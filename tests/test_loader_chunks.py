"""The CPU loader's chunked transfer (issue 13 item 5): runs of consecutive stream positions per DataLoader
item come back in stream order, and the resize written into a slot equals the allocating one."""
from __future__ import annotations

import numpy as np

from largeloss.shards.jpeg import resize_planes
from largeloss.shards.loader import MAX_CHUNK, _chunk
from largeloss.shards.schedule import interleave, plan_epoch


def test_chunked_dealing_comes_back_in_stream_order():
    for n in range(0, 40):
        plan = plan_epoch(np.arange(100, 100 + n), rank=0, world_size=1, batch_size=4, seed=1, epoch=0,
                          shuffle=True) if n else None
        for workers in range(1, 5):
            for chunk in (1, 2, 3, 8):
                runs = [[list(range(c * chunk, min(n, (c + 1) * chunk)))
                         for c in range(w, -(-n // chunk), workers)] for w in range(workers)]
                # the DataLoader's round robin over the workers' items (one run each) restores 0..n-1
                flat = [p for w, k in interleave([len(r) for r in runs]) for p in runs[w][k]]
                assert flat == list(range(n))
                if plan is not None:
                    mine = [plan.worker(w, workers, chunk)[0].tolist() for w in range(workers)]
                    assert mine == [[int(plan.ids[p]) for run in runs[w] for p in run] for w in range(workers)]
    plan = plan_epoch(np.arange(10, 20), rank=0, world_size=1, batch_size=4, seed=0, epoch=0, shuffle=False)
    assert plan.worker(1, 2, 3)[0].tolist() == [13, 14, 15, 19]
    assert plan.worker(0, 2, 3)[0].tolist() == [10, 11, 12, 16, 17, 18]


def test_chunk_size():
    assert _chunk(16, 0) == 1  # in-process: one sample per item
    # half a worker's share of a batch, rounded up: 16 / (2 * 2) = 4, 16 / (2 * 4) = 2, 5 / 4 -> 2, 1 / 16 -> 1;
    # 72 / (2 * 2) = 18 is capped
    assert (_chunk(16, 2), _chunk(16, 4), _chunk(5, 2), _chunk(1, 8), _chunk(72, 2)) == (4, 2, 2, 1, MAX_CHUNK)


def test_resize_into_a_slot_equals_the_allocating_resize():
    rng = np.random.default_rng(0)
    for h, w, size in ((192, 256, 224), (375, 500, 64), (30, 20, 48)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        slot = np.full((3, size, size), 7, np.uint8)
        assert resize_planes(img, size, slot) is slot
        assert np.array_equal(slot, resize_planes(img, size))
