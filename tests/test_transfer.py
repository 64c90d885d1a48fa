"""spiral_rt.transfer: packed uploads keep every table's values, dtype and shape."""

import torch

from spiral_rt.transfer import pack, unpack, upload_tensors


def test_pack_roundtrip_mixed_dtypes_and_none():
    tables = {"a": torch.randint(-5, 5, (7,), dtype=torch.int32), "b": None,
              "c": torch.randint(0, 2**40, (3, 5), dtype=torch.int64), "d": torch.rand(2, 3, dtype=torch.float16)}
    buffer, layout = pack(tables)
    again = unpack(buffer.clone(), layout)
    assert again["b"] is None
    for name in ("a", "c", "d"):
        assert again[name].dtype == tables[name].dtype and again[name].shape == tables[name].shape
        assert torch.equal(again[name], tables[name])


def test_upload_to_cpu_is_a_no_copy_passthrough():
    t = torch.arange(4, dtype=torch.int32)
    assert upload_tensors({"t": t}, "cpu")["t"] is t
