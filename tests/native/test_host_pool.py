"""HostPool: slot layout, chunked allocation, filling from safetensors files, clear errors."""
import pytest
import torch
from safetensors.torch import save_file

from moerun.native import HostPool, slot_elems

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
        (l, e, *((files[l % 2], key(l, e, p)) for p in ("gate_proj", "up_proj", "down_proj")))
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
    layer, expert, gate, up, down = sources[1]
    bad = [sources[0], (layer, expert, gate, (up[0], "no.such.tensor"), down)]
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
        pool.fill([(0, 0, (f, "g"), (f, "d"), (f, "d"))])
    with pytest.raises(RuntimeError, match=r"tensor 'u' .* dtype I32"):
        pool.fill([(0, 0, (f, "g_ok"), (f, "u"), (f, "d"))])


def test_missing_or_corrupt_file_is_named(tmp_path):
    pool = HostPool(1, 1, H, I, torch.float32)
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(RuntimeError, match="cannot open safetensors file .*nope.safetensors"):
        pool.fill([(0, 0, (missing, "a"), (missing, "b"), (missing, "c"))])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(RuntimeError, match="junk.safetensors"):
        pool.fill([(0, 0, (str(junk), "a"), (str(junk), "b"), (str(junk), "c"))])


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
