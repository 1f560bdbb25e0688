import torch

from leanformer.memory._arena import PayloadArena


def test_payloads_are_disjoint_aligned_slices_of_shared_blocks():
    arena = PayloadArena(block_bytes=1024)
    a, b = arena.take(10, torch.device("cpu")), arena.take(100, torch.device("cpu"))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert b.storage_offset() == 64 and a.numel() == 10 and b.numel() == 100
    a.fill_(1)
    b.fill_(2)
    assert int(a.sum()) == 10 and int(b.sum()) == 200
    big = arena.take(300, torch.device("cpu"))  # more than a quarter block: its own allocation
    assert big.untyped_storage().nbytes() == 300
    arena.release()
    c = arena.take(10, torch.device("cpu"))
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert int(a.sum()) == 10  # earlier payloads keep their block alive
