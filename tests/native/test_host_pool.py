"""HostPool: slot layout, chunked allocation, filling from safetensors files, clear errors; as a cache
in front of the files: eviction order against a Python oracle, holds that keep experts in use, reads
that match the files, and the transfer engine / CPU executor acquiring their experts through it."""
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from moerun.native import CpuExecutor, ExpertArena, HostPool, TransferEngine, slot_elems

H, I = 16, 8


def expert_weights(layer, expert, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 * layer + expert)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((I, H), (I, H), (H, I))]


def key(layer, expert, part):
    return f"model.layers.{layer}.mlp.experts.{expert}.{part}.weight"


def write_checkpoint(tmp_path, layers, experts, dtype):
    """Experts split over two files, one per layer parity, like a sharded checkpoint."""
    shards = {0: {}, 1: {}}
    for l in range(layers):
        for e in range(experts):
            for part, w in zip(("gate_proj", "up_proj", "down_proj"), expert_weights(l, e, dtype)):
                shards[l % 2][key(l, e, part)] = w
    files = {}
    for parity, tensors in shards.items():
        path = tmp_path / f"model-{parity}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        files[parity] = str(path)
    return [
        (l, e, [(files[l % 2], key(l, e, p)) for p in ("gate_proj", "up_proj", "down_proj")])
        for l in range(layers)
        for e in range(experts)
    ]


def expected_slot(layer, expert, dtype):
    gate, up, down = expert_weights(layer, expert)
    flat = torch.cat([gate.to(dtype).flatten(), up.to(dtype).flatten(), down.to(dtype).flatten()])
    return torch.cat([flat, torch.zeros(slot_elems(H, I) - flat.numel(), dtype=dtype)])


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fill_reads_every_expert_in_slot_layout_converting_dtype(tmp_path, src_dtype, pool_dtype):
    sources = write_checkpoint(tmp_path, layers=3, experts=4, dtype=src_dtype)
    # Chunks of 5 experts: 12 experts need 3 chunks, the last one partial.
    pool = HostPool(3, 4, H, I, pool_dtype, chunk_bytes=5 * slot_elems(H, I) * torch.finfo(pool_dtype).bits // 8)
    assert pool.num_chunks == 3 and pool.filled_count == 0
    pool.fill(sources, num_threads=3)
    assert pool.filled_count == 12
    for l in range(3):
        for e in range(4):
            gate, up, down = expert_weights(l, e)
            want = torch.cat([gate.to(src_dtype).flatten(), up.to(src_dtype).flatten(), down.to(src_dtype).flatten()])
            got = pool.view(l, e)
            assert got.shape == (slot_elems(H, I),) and got.dtype == pool_dtype
            torch.testing.assert_close(got[: want.numel()], want.to(pool_dtype), rtol=0, atol=0)
            assert (got[want.numel():] == 0).all()


def test_write_expert_matches_fill_layout():
    pool = HostPool(1, 2, H, I, torch.bfloat16, pinned=False)
    gate, up, down = expert_weights(0, 1)
    pool.write_expert(0, 1, gate, up, down)
    assert pool.filled(0, 1) and not pool.filled(0, 0)
    torch.testing.assert_close(pool.view(0, 1), expected_slot(0, 1, torch.bfloat16), rtol=0, atol=0)


def test_view_keeps_pool_memory_alive():
    pool = HostPool(1, 1, H, I, torch.float32)
    gate, up, down = expert_weights(0, 0)
    pool.write_expert(0, 0, gate, up, down)
    view = pool.view(0, 0)
    del pool
    torch.testing.assert_close(view, expected_slot(0, 0, torch.float32))


def test_missing_tensor_names_file_and_tensor(tmp_path):
    sources = write_checkpoint(tmp_path, layers=1, experts=2, dtype=torch.float32)
    layer, expert, (gate, up, down) = sources[1]
    bad = [sources[0], (layer, expert, [gate, (up[0], "no.such.tensor"), down])]
    pool = HostPool(1, 2, H, I, torch.float32)
    with pytest.raises(RuntimeError, match=r"missing tensor 'no.such.tensor' in .*model-0.safetensors.*up_proj"):
        pool.fill(bad)
    assert pool.filled_count == 0  # validated before any expert was read


def test_wrong_shape_and_dtype_are_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"g": torch.zeros(I, H + 1), "g_ok": torch.zeros(I, H), "u": torch.zeros(I, H, dtype=torch.int32), "d": torch.zeros(H, I)}, str(path))
    pool = HostPool(1, 1, H, I, torch.float32)
    f = str(path)
    with pytest.raises(RuntimeError, match=r"tensor 'g' in .*bad.safetensors.*shape \[8, 17\], expected \[8, 16\]"):
        pool.fill([(0, 0, [(f, "g"), (f, "d"), (f, "d")])])
    with pytest.raises(RuntimeError, match=r"tensor 'u' .* dtype I32"):
        pool.fill([(0, 0, [(f, "g_ok"), (f, "u"), (f, "d")])])


def test_missing_or_corrupt_file_is_named(tmp_path):
    pool = HostPool(1, 1, H, I, torch.float32)
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(RuntimeError, match="cannot open safetensors file .*nope.safetensors"):
        pool.fill([(0, 0, [(missing, "a"), (missing, "b"), (missing, "c")])])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(RuntimeError, match="junk.safetensors"):
        pool.fill([(0, 0, [(str(junk), "a"), (str(junk), "b"), (str(junk), "c")])])


def test_pool_larger_than_host_memory_fails_before_allocating_with_a_hint():
    with pytest.raises(RuntimeError, match="host budget"):
        HostPool(1 << 16, 1 << 10, 4096, 4096, torch.bfloat16)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        HostPool(0, 1, H, I, torch.float32)
    pool = HostPool(1, 1, H, I, torch.float32)
    with pytest.raises(IndexError):
        pool.view(1, 0)
    with pytest.raises(ValueError, match=r"gate must have shape \[8, 16\]"):
        pool.write_expert(0, 0, torch.zeros(H, I), torch.zeros(I, H), torch.zeros(H, I))


# -- the pool as a cache in front of the files (capacity below the model's experts) -------------------
CL, CE = 2, 6  # layers, experts of the cache tests
LRU, LFU, WATERMARK = 0, 1, 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), layers=CL, experts=CE, dtype=torch.float32)


def cache(sources, capacity, eviction=LRU, dtype=torch.float32, **kw):
    pool = HostPool(CL, CE, H, I, dtype, capacity=capacity, eviction=eviction, **kw)
    pool.fill(sources)
    return pool


def resident(pool):
    return {(l, e) for l in range(CL) for e in range(CE) if pool.filled(l, e)}


def access_sequence(n, seed):
    g = torch.Generator().manual_seed(seed)
    # Skewed: low experts are hot, so LFU and LRU evict differently.
    return [(int(torch.randint(CL, (1,), generator=g)), int(min(torch.randint(CE, (2,), generator=g))))
            for _ in range(n)]


def oracle(sequence, capacity, policy):
    """Resident set after each access. LRU; LFU with counts kept across evictions, ties to the LRU."""
    res, last, count, states = set(), {}, {}, []
    for clock, key in enumerate(sequence):
        count[key] = count.get(key, 0) + 1
        if key not in res:
            if len(res) == capacity:
                rank = (lambda k: last[k]) if policy == LRU else (lambda k: (count[k], last[k]))
                res.remove(min(res, key=rank))
            res.add(key)
        last[key] = clock
        states.append(set(res))
    return states


@pytest.mark.parametrize("policy", [LRU, LFU])
def test_eviction_order_matches_python_oracle(sources, policy):
    capacity = 4
    pool = cache(sources, capacity, policy)
    assert pool.cached and pool.capacity == capacity and pool.total_bytes == capacity * pool.slot_bytes
    sequence = access_sequence(60, seed=policy)
    for step, ((l, e), want) in enumerate(zip(sequence, oracle(sequence, capacity, policy))):
        pool.acquire(l, e)
        pool.release(l, e)
        assert resident(pool) == want, step
    stats = pool.stats()
    assert stats["hits"] + stats["misses"] == len(sequence)
    assert stats["disk_bytes"] == stats["misses"] * 3 * H * I * 4
    assert stats["evictions"] == stats["misses"] - capacity


def test_reads_match_the_files_after_evictions_and_dtype_conversion(sources):
    pool = cache(sources, capacity=3, dtype=torch.bfloat16)
    for l, e in access_sequence(20, seed=7):
        view = pool.acquire(l, e)
        torch.testing.assert_close(view, expected_slot(l, e, torch.bfloat16), rtol=0, atol=0)
        pool.release(l, e)


def test_held_experts_are_never_evicted(sources):
    pool = cache(sources, capacity=2, wait_timeout_s=0.2)
    pool.acquire(0, 0)
    pool.acquire(0, 1)
    with pytest.raises(RuntimeError, match=r"no slot for \(layer 1, expert 0\).*all 2 host slots.*host_budget"):
        pool.acquire(1, 0)  # both slots held: nothing may be evicted
    assert resident(pool) == {(0, 0), (0, 1)}
    pool.release(0, 1)
    pool.acquire(1, 0)
    assert resident(pool) == {(0, 0), (1, 0)}  # the held LRU expert (0, 0) stayed
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        pool.release(0, 1)


def test_a_miss_waits_for_a_release_from_another_thread(sources):
    pool = cache(sources, capacity=1, wait_timeout_s=30)
    pool.acquire(0, 0)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(0, 3).clone()))
    waiter.start()
    time.sleep(0.2)
    assert not got and pool.filled(0, 0)  # still waiting: (0, 0) is held
    pool.release(0, 0)
    waiter.join(10)
    torch.testing.assert_close(got[0], expected_slot(0, 3, torch.float32), rtol=0, atol=0)
    assert pool.stats()["slot_waits"] >= 1


def test_watermark_eviction_frees_slots_ahead_of_need(sources):
    pool = cache(sources, capacity=10, eviction=WATERMARK, high_watermark=0.8, low_watermark=0.5)
    for i in range(9):
        pool.acquire(i // CE, i % CE)
        pool.release(i // CE, i % CE)
    assert len(resident(pool)) <= 8  # passing 8 of 10 shrank the tier to 5
    assert pool.stats()["evictions"] >= 4


def test_prefetch_reads_in_the_background(sources):
    pool = cache(sources, capacity=3)
    pool.prefetch(1, 4)
    deadline = time.time() + 10
    while not pool.filled(1, 4) and time.time() < deadline:
        time.sleep(0.01)
    assert pool.filled(1, 4) and pool.stats()["prefetch_reads"] == 1
    torch.testing.assert_close(pool.view(1, 4), expected_slot(1, 4, torch.float32), rtol=0, atol=0)


def test_transfer_engine_reads_misses_and_releases_its_holds(sources):
    pool = cache(sources, capacity=2, wait_timeout_s=5)
    arena = ExpertArena(3, slot_elems(H, I), torch.float32, "cpu", CL, CE)
    xfer = TransferEngine(arena, pool, 2, 1)
    xfer.fetch(0, 1, 0, True)
    xfer.fetch(1, 2, 1, False)  # prefetch: read on an I/O thread, copied once there
    xfer.fetch(1, 5, 2, False)
    xfer.wait_slots([1])
    xfer.synchronize()
    for slot, (l, e) in enumerate([(0, 1), (1, 2), (1, 5)]):
        assert arena.occupant(slot) == (l, e)
        torch.testing.assert_close(arena.weights[slot], expected_slot(l, e, torch.float32), rtol=0, atol=0)
    # Every copy ended its hold: the whole capacity can be taken again.
    for e in range(CE):
        pool.acquire(0, e)
        pool.release(0, e)
    assert pool.stats()["misses"] >= 3


def test_cpu_executor_holds_its_experts_and_runs_in_rounds_when_the_cache_is_smaller(sources):
    pool = cache(sources, capacity=2, wait_timeout_s=0.5)
    full = HostPool(CL, CE, H, I, torch.float32)
    full.fill(sources)
    ex = CpuExecutor(num_threads=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, H, generator=g)
    ids = torch.tensor([[0, 2], [3, 2], [1, 0]])
    weights = torch.rand(3, 2, generator=g)

    def run(p, experts):
        out = torch.empty(3, H)
        ex.submit(p, 1, x, ids, weights, experts, out)
        ex.wait()
        return out

    out = torch.empty(3, H)
    ex.submit(pool, 1, x, ids, weights, [0, 2], out)
    with pytest.raises(RuntimeError, match="no slot"):
        pool.acquire(0, 0)  # the job holds both slots until wait()
    ex.wait()
    torch.testing.assert_close(out, run(full, [0, 2]), rtol=0, atol=0)
    # Four experts through a 2-expert cache: two rounds, the second one inside wait().
    torch.testing.assert_close(run(pool, [0, 1, 2, 3]), run(full, [0, 1, 2, 3]), rtol=0, atol=0)
    pool.acquire(0, 0)  # holds ended with the job
    pool.release(0, 0)


def test_bad_tier_settings_are_rejected(sources):
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        HostPool(CL, CE, H, I, torch.float32, capacity=-1)
    with pytest.raises(ValueError, match="belady"):
        HostPool(CL, CE, H, I, torch.float32, capacity=2, eviction=5)
    pool = cache(sources, capacity=2)
    with pytest.raises(RuntimeError, match="write_expert fills a pool that holds every expert"):
        pool.write_expert(0, 0, torch.zeros(I, H), torch.zeros(I, H), torch.zeros(H, I))
    with pytest.raises(RuntimeError, match="not in the host cache"):
        pool.view(0, 0)
    assert not HostPool(CL, CE, H, I, torch.float32, capacity=CL * CE).cached  # all experts: no disk tier
