"""gpufleet's streaming batcher: the first chunk goes out at once, later chunks are batched."""

import asyncio
import time

import pytest

from gpufleet.serve_apps.server import FirstChunkBatcher


async def _engine(n: int, gap_s: float, fail_after: int | None = None):
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("engine died")
        yield i
        await asyncio.sleep(gap_s)


def _collect(engine, interval_ms: int) -> list[tuple[float, list[int]]]:
    """(seconds since start, batch) for every batch the batcher yields."""

    async def run():
        batcher = FirstChunkBatcher(engine, interval_ms=interval_ms)  # needs a running loop
        t0 = time.perf_counter()
        return [(time.perf_counter() - t0, list(batch)) async for batch in batcher.stream()]

    return asyncio.run(run())


def test_first_chunk_is_not_held_for_the_interval():
    batches = _collect(_engine(10, 0.01), 300)
    first_at, first = batches[0]
    assert first == [0] and first_at < 0.15


def test_later_chunks_are_batched_in_order():
    batches = _collect(_engine(10, 0.01), 300)
    assert [x for _, b in batches for x in b] == list(range(10))
    assert len(batches) <= 3  # 10 items ~100 ms apart in all: one at once, the rest in one or two batches


def test_interval_zero_streams_every_item():
    batches = _collect(_engine(5, 0.0), 0)
    assert [b for _, b in batches] == [[0], [1], [2], [3], [4]]


def test_engine_error_reaches_the_caller():
    with pytest.raises(RuntimeError, match="engine died"):
        _collect(_engine(5, 0.01, fail_after=2), 50)


def test_empty_stream_ends():
    assert _collect(_engine(0, 0.0), 50) == []
