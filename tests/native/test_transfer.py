"""TransferEngine: fetches land in slots, the table follows, prefetches queue and cancel.

On CPU (arena in host memory) copies are memcpy and events complete at once; the `gpu` tests check
ordering against real CUDA streams.
"""
import pytest
import torch

from moerun.native import ExpertArena, HostPool, TransferEngine, slot_elems

L, E, H, I = 2, 5, 32, 16


def make(device="cpu", num_slots=3, dtype=torch.float32, **kw):
    pool = HostPool(L, E, H, I, dtype)
    g = torch.Generator().manual_seed(0)
    for l in range(L):
        for e in range(E):
            pool.write_expert(l, e, *(torch.randn(s, generator=g) for s in ((I, H), (I, H), (H, I))))
    arena = ExpertArena(num_slots, slot_elems(H, I), dtype, device, L, E)
    return arena, pool, TransferEngine(arena, pool, **kw)


def test_demand_fetch_copies_the_expert_and_updates_the_table():
    arena, pool, xfer = make()
    xfer.fetch(1, 3, 2)
    xfer.wait_slots([2])
    assert torch.equal(arena.weights[2], pool.view(1, 3))
    assert arena.lookup(1, 3) == 2 and arena.slot_table[1, 3].item() == 2
    xfer.fetch(0, 4, 2)  # replaces the occupant
    assert arena.lookup(1, 3) == -1 and torch.equal(arena.weights[2], pool.view(0, 4))
    s = xfer.stats()
    assert s["demand_fetches"] == 2 and s["demand_bytes"] == 2 * arena.slot_bytes


def test_prefetch_lands_and_is_counted_separately():
    arena, pool, xfer = make()
    xfer.fetch(0, 1, 0, demand=False)
    xfer.synchronize()
    assert torch.equal(arena.weights[0], pool.view(0, 1)) and arena.lookup(0, 1) == 0
    s = xfer.stats()
    assert s["prefetches"] == 1 and s["demand_fetches"] == 0 and s["prefetch_bytes"] == arena.slot_bytes


def test_arena_and_pool_must_agree_on_layout():
    pool = HostPool(L, E, H, I, torch.float32)
    arena = ExpertArena(2, slot_elems(H, I), torch.bfloat16, "cpu", L, E)
    with pytest.raises(ValueError, match="disagree on the slot layout"):
        TransferEngine(arena, pool)
    with pytest.raises(ValueError, match="num_streams >= 2"):
        TransferEngine(ExpertArena(2, slot_elems(H, I), torch.float32, "cpu", L, E), pool, num_streams=1)


def test_cancel_with_nothing_queued_returns_nothing():
    arena, pool, xfer = make()
    xfer.fetch(0, 0, 0, demand=False)
    xfer.synchronize()
    assert xfer.cancel_prefetches() == [] and arena.lookup(0, 0) == 0


@pytest.mark.gpu
def test_gpu_fetches_order_against_the_compute_stream():
    arena, pool, xfer = make("cuda", num_slots=4, dtype=torch.bfloat16, num_streams=3)
    for e in range(4):
        xfer.fetch(1, e, e, demand=e % 2 == 0)
    xfer.wait_slots([0, 1, 2, 3])
    got = arena.weights.clone()  # on the current stream, after the waits
    for e in range(4):
        assert torch.equal(got[e].cpu(), pool.view(1, e))
        assert arena.slot_table[1, e].item() == e
    xfer.synchronize()
    xfer.poll()  # reads back the copies' timings
    s = xfer.stats()
    # Bandwidth estimates divide the timed copies' bytes by their time: both count the same copies.
    assert 0 < s["timed_copies"] <= 4 and s["timed_bytes"] == s["timed_copies"] * arena.slot_bytes
    assert s["copy_time_us"] > 0


@pytest.mark.gpu
def test_gpu_copy_into_a_slot_waits_for_its_release():
    arena, pool, xfer = make("cuda", num_slots=1)
    xfer.fetch(0, 0, 0)
    xfer.wait_slots([0])
    reader = torch.cuda.current_stream()
    torch.cuda._sleep(50_000_000)  # a long kernel "reading" the slot
    snapshot = arena.weights[0].clone()
    xfer.release_slots([0])
    xfer.fetch(0, 1, 0)  # must not overwrite before the clone above ran
    xfer.wait_slots([0])
    torch.cuda.synchronize()
    assert torch.equal(snapshot.cpu(), pool.view(0, 0))
    assert torch.equal(arena.weights[0].cpu(), pool.view(0, 1))
    assert reader is not None


@pytest.mark.gpu
def test_gpu_prefetches_beyond_the_limit_queue_and_can_be_cancelled():
    arena, pool, xfer = make("cuda", num_slots=5, max_inflight_prefetches=1)
    xfer.release_slots(list(range(5)))
    torch.cuda._sleep(100_000_000)  # keep the first prefetch waiting on its slot's release
    xfer.release_slots([0])
    for e in range(5):
        xfer.fetch(0, e, e, demand=False)
    assert xfer.queued_prefetches == 4
    cancelled = xfer.cancel_prefetches()
    assert sorted(cancelled) == [(0, e, e) for e in range(1, 5)]
    assert [arena.lookup(0, e) for e in range(5)] == [0, -1, -1, -1, -1]
    xfer.synchronize()
    assert torch.equal(arena.weights[0].cpu(), pool.view(0, 0))
    assert xfer.stats()["cancelled_prefetches"] == 4


@pytest.mark.gpu
def test_gpu_waiting_on_a_queued_prefetch_issues_it():
    arena, pool, xfer = make("cuda", num_slots=4, max_inflight_prefetches=1)
    torch.cuda._sleep(50_000_000)
    xfer.release_slots([0])
    for e in range(3):
        xfer.fetch(1, e, e, demand=False)
    xfer.wait_slots([2])
    assert torch.equal(arena.weights[2].cpu(), pool.view(1, 2))
    s = xfer.stats()
    assert s["prefetches"] + s["demand_fetches"] >= 2
