"""spiral_rt.transfer: packed uploads keep every table's values, dtype and shape."""

import torch

from spiral_rt.transfer import pack, to_host, unpack, upload_tensors


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


def test_to_host_returns_an_equal_host_tensor():
    t = torch.randn(3, 5).to(torch.bfloat16)
    out = to_host(t)
    assert out.device.type == "cpu" and out.dtype == t.dtype and torch.equal(out, t)
    if torch.cuda.is_available():  # the GPU path: pinned, enqueued, then read after a sync
        d = torch.randn(4, 7, device="cuda")
        host = to_host(d, wait=False)
        torch.cuda.synchronize()
        assert host.is_pinned() and torch.equal(host, d.cpu())
