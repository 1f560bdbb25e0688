"""StepArena: blocks come from one buffer once it is sized, it resets only when all are released."""

from __future__ import annotations

import torch

from leanformer.memory.arena import StepArena


def _shares(block: torch.Tensor, arena: StepArena) -> bool:
    return block.untyped_storage().data_ptr() == arena._buffer.untyped_storage().data_ptr()


def test_first_step_sizes_the_buffer_then_blocks_are_carved_from_it():
    arena = StepArena()
    first = [arena.take(n) for n in (100, 5000, 7)]
    assert arena.capacity == 0  # nothing fits yet: ordinary allocations
    for _ in first:
        arena.release()
    assert arena.capacity >= 100 + 5000 + 7
    second = [arena.take(n) for n in (100, 5000, 7)]
    assert all(_shares(b, arena) for b in second)
    assert [b.numel() for b in second] == [100, 5000, 7]
    ptrs = [b.data_ptr() for b in second]
    assert len(set(ptrs)) == 3 and all(p % 64 == 0 for p in ptrs)  # disjoint, cache-line aligned


def test_no_reset_while_a_block_is_live():
    arena = StepArena()
    arena.take(1000)
    arena.release()
    a = arena.take(600)
    a.fill_(7)
    arena.take(600)  # does not fit: an ordinary allocation, `a` untouched
    arena.release()  # one block still live: no reset
    b = arena.take(300)
    assert b.data_ptr() != a.data_ptr() or not _shares(b, arena)
    assert bool((a == 7).all())
