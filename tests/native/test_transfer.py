"""TransferEngine: fetches land in slots, the table follows, prefetches queue and cancel.

On CPU (arena in host memory) copies are memcpy and events complete at once; the `gpu` tests check
ordering against real CUDA streams.
"""
import pytest
import torch

from moerun.native import ExpertArena, HostPool, TransferEngine, slot_elems
from moerun.policy.ir import CacheConfig, CompiledPolicy, PrefetchConfig
from moerun.policy_engine import PolicyEngine

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


def engine_for(arena, top_k=2, **policy):
    return PolicyEngine(CompiledPolicy(name="t", cache=CacheConfig(eviction="lru"), **policy), num_layers=L,
                        num_experts=E, top_k=top_k, num_slots=arena.num_slots, expert_bytes=arena.slot_bytes)


def table(arena):
    return [[arena.lookup(l, e) for e in range(E)] for l in range(L)]


def test_a_step_copies_its_misses_before_the_kernel_and_releases_after_it():
    arena, pool, xfer = make(num_slots=3)
    engine = engine_for(arena, top_k=3)
    plan = engine.step(0, [1, 2, 3], None)
    assert plan.num_fetches == 3
    xfer.begin_step(0, plan)
    assert xfer.step_open and not xfer.settled
    for expert, slot, _, _ in plan.fetches:
        assert torch.equal(arena.weights[slot], pool.view(0, expert)) and arena.slot_table[0, expert].item() == slot
    xfer.end_step()
    assert not xfer.step_open
    xfer.end_step()  # nothing open: nothing to do
    plan = engine.step(1, [4, 1, 1], None)  # the victims leave the table with the step's copies
    evicted = [(vl, ve) for _, _, vl, ve in plan.fetches]
    xfer.begin_step(1, plan)
    xfer.end_step()
    assert table(arena) == [[engine.lookup(l, e) for e in range(E)] for l in range(L)]
    assert all(arena.slot_table[vl, ve].item() == -1 for vl, ve in evicted)
    assert xfer.stats()["demand_fetches"] == 5
    xfer.synchronize()
    assert xfer.settled


def test_a_step_frees_the_slot_it_staged_an_expert_in_after_the_kernel():
    arena, pool, xfer = make(num_slots=3)
    engine = PolicyEngine(CompiledPolicy(name="t", cache=CacheConfig(capacity=2, eviction="lru")), num_layers=L,
                          num_experts=E, top_k=3, num_slots=3, expert_bytes=arena.slot_bytes)
    plan = engine.step(0, [1, 2, 3], None)
    (slot, layer, expert), = plan.releases  # capacity 2: the third expert is staged in the spare slot
    xfer.begin_step(0, plan)
    assert arena.lookup(layer, expert) == slot  # the kernel reads it
    xfer.end_step()
    assert arena.lookup(layer, expert) == -1
    assert table(arena) == [[engine.lookup(l, e) for e in range(E)] for l in range(L)]


def test_lookahead_prefetches_of_a_plan_land_in_their_slots():
    arena, pool, xfer = make(num_slots=4)
    engine = engine_for(arena, top_k=1, prefetch=PrefetchConfig(strategy="lookahead", budget=2))
    engine.step(0, [0], None)
    plan = engine.prefetch_ahead(1, [3, 4])
    assert plan.num_prefetches == 2
    xfer.prefetch(plan)
    xfer.synchronize()
    for layer, expert, slot, _, _ in plan.prefetches:
        assert arena.lookup(layer, expert) == slot and torch.equal(arena.weights[slot], pool.view(layer, expert))


def test_one_step_is_open_at_a_time():
    arena, pool, xfer = make()
    engine = engine_for(arena)
    xfer.begin_step(0, engine.step(0, [0, 1], None))
    with pytest.raises(RuntimeError, match="end_step closes it"):
        xfer.begin_step(0, engine.step(0, [2, 3], None))


def test_copy_timing_is_taken_once():
    arena, pool, xfer = make()
    xfer.fetch(0, 1, 0)
    assert xfer.take_copy_timing() == (0.0, 0)  # host memory: copies are memcpy, not timed


@pytest.mark.gpu
def test_gpu_each_kernel_reads_the_slot_table_as_it_was_when_queued():
    """Table writes are batched through pinned snapshots: a kernel queued before a write sees the old table,
    one after it the new one, however far the host runs ahead (more writes than the snapshot ring holds)."""
    arena, pool, xfer = make("cuda", num_slots=3)
    expected, seen = [], []
    torch.cuda._sleep(200_000_000)  # the host queues every write and read below before any runs
    for i in range(150):
        if i % 7 == 3:
            arena.evict(i % 3)
        else:
            xfer.fetch(i % L, (i * 3) % E, i % 3, demand=i % 2 == 0)
        expected.append(table(arena))
        seen.append(arena.slot_table.clone())  # a kernel reading the table, queued after this write
    xfer.synchronize()
    assert [t.tolist() for t in seen] == expected


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
