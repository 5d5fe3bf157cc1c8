"""ExpertArena: slot table bookkeeping and its mirror (CPU build: host memory)."""
import pytest
import torch

from moerun.native import ExpertArena, slot_elems


def make_arena(num_slots=4, device="cpu"):
    return ExpertArena(num_slots, slot_elems(8, 4), torch.float32, device, num_layers=3, num_experts=5)


def test_slot_elems_rounds_up_to_64():
    assert slot_elems(8, 4) == 128  # 96 -> 128
    assert slot_elems(2048, 1408) == 3 * 2048 * 1408


def test_new_arena_is_empty_zeroed_and_shaped():
    a = make_arena()
    assert a.weights.shape == (4, 128) and a.weights.dtype == torch.float32
    assert torch.count_nonzero(a.weights) == 0
    assert a.slot_table.shape == (3, 5) and a.slot_table.dtype == torch.int32
    assert (a.slot_table == -1).all() and a.resident_count == 0


def test_assign_updates_table_and_mirror_and_clears_previous_occupant():
    a = make_arena()
    a.assign(1, 2, 3)
    assert a.lookup(2, 3) == 1 and a.occupant(1) == (2, 3)
    assert a.slot_table[2, 3].item() == 1
    a.assign(1, 0, 4)  # the slot changes hands: the old occupant is no longer resident
    assert a.lookup(2, 3) == -1 and a.slot_table[2, 3].item() == -1
    assert a.lookup(0, 4) == 1
    a.assign(2, 0, 4)  # the expert moves: its old slot becomes free
    assert a.occupant(1) == (-1, -1) and a.lookup(0, 4) == 2
    a.evict(2)
    assert a.lookup(0, 4) == -1 and a.resident_count == 0
    assert (a.slot_table == -1).all()


def test_table_mirror_matches_host_table_after_random_moves():
    a = make_arena(num_slots=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        slot, layer, expert = (int(torch.randint(0, n, (1,), generator=gen)) for n in (3, 3, 5))
        if torch.rand(1, generator=gen).item() < 0.2:
            a.evict(slot)
        else:
            a.assign(slot, layer, expert)
        table = a.slot_table
        for l in range(3):
            for e in range(5):
                assert table[l, e].item() == a.lookup(l, e)
        assert a.resident_count == int((table >= 0).sum())


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 64"):
        ExpertArena(2, 100, torch.float32, "cpu", 1, 1)
    with pytest.raises(ValueError, match="positive"):
        ExpertArena(0, 64, torch.float32, "cpu", 1, 1)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ExpertArena(2, 64, torch.int8, "cpu", 1, 1)
    a = make_arena()
    with pytest.raises(IndexError, match="slot 9"):
        a.assign(9, 0, 0)
    with pytest.raises(IndexError, match="layer 3"):
        a.lookup(3, 0)
