"""Tests for flm.data: get_batch (handout §5.1) and the token-file format (load_tokens/write_tokens)."""

from __future__ import annotations

import json
import re
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flm.data import get_batch, load_tokens, read_sidecar, sidecar_path, write_tokens


def _assert_windows(x: np.ndarray, inputs: torch.Tensor, targets: torch.Tensor, context_length: int) -> list[int]:
    """Check every row is a real window of x and targets are inputs shifted by one; return the starts."""
    starts = []
    xs = np.asarray(x).astype(np.int64)
    for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
        assert row_in[1:] == row_t[:-1]
        s = row_in[0]  # for x = arange, the value is its own index
        assert 0 <= s <= len(xs) - context_length - 1
        assert row_in == xs[s : s + context_length].tolist()
        assert row_t == xs[s + 1 : s + context_length + 1].tolist()
        starts.append(s)
    return starts


# ------------------------------------------------------------------------------------------------
# get_batch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64])
def test_get_batch_shapes_dtypes_device(dtype):
    x = np.arange(1000, dtype=dtype)
    inputs, targets = get_batch(x, batch_size=16, context_length=32, device="cpu")
    assert inputs.shape == targets.shape == (16, 32)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.device.type == targets.device.type == "cpu"
    assert inputs.is_contiguous() and targets.is_contiguous()
    _assert_windows(x, inputs, targets, 32)


def test_get_batch_torch_tensor_dataset():
    x = torch.arange(500, dtype=torch.int32)
    inputs, targets = get_batch(x, 8, 10, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert inputs.dtype == torch.int64 and inputs.shape == (8, 10)
    _assert_windows(x.numpy(), inputs, targets, 10)


def test_every_valid_start_is_reachable_and_none_beyond():
    n, m = 12, 4  # valid starts 0..7
    x = np.arange(n)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        inputs, targets = get_batch(x, 32, m, "cpu", g)
        seen.update(_assert_windows(x, inputs, targets, m))
    assert seen == set(range(n - m))


def test_context_length_uses_the_whole_dataset():
    x = np.arange(9)
    inputs, targets = get_batch(x, 3, 8, "cpu")
    assert (inputs == torch.arange(8)).all() and (targets == torch.arange(1, 9)).all()


def test_same_seed_same_batch_and_different_seed_differs():
    x = np.arange(10_000, dtype=np.uint16)
    a = get_batch(x, 8, 16, "cpu", torch.Generator().manual_seed(123))
    b = get_batch(x, 8, 16, "cpu", torch.Generator().manual_seed(123))
    c = get_batch(x, 8, 16, "cpu", torch.Generator().manual_seed(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_memmap_of_a_big_sparse_file_is_not_read_whole(tmp_path):
    n = 1 << 29  # 1 GiB of uint16, sparse: no disk blocks, and far more than get_batch may copy
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(n * 2)
    mm = np.memmap(path, dtype=np.uint16, mode="r+")
    mm[n - 5 :] = [1, 2, 3, 4, 5]
    mm.flush()
    del mm
    x = np.memmap(path, dtype=np.uint16, mode="r")
    tracemalloc.start()
    try:
        inputs, targets = get_batch(x, 4, 64, "cpu", torch.Generator().manual_seed(0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert inputs.shape == (4, 64)
    assert peak < 1 << 20, f"get_batch allocated {peak} bytes on a 1 GiB memmap"
    # The last window is reachable and read correctly from the file.
    x_small = np.memmap(path, dtype=np.uint16, mode="r", offset=(n - 10) * 2)
    i, t = get_batch(x_small, 2, 9, "cpu")
    assert i[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4] and t[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("device", ["cuda:7", "bogus", "mps:3", "nope:0"])
def test_invalid_device_raises(device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ValueError, match=repr(device).replace("'", "'?")):
        get_batch(np.arange(100), 2, 4, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_batch_cuda():
    x = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(5)
    inputs, targets = get_batch(x, 4, 8, "cuda", g)
    assert inputs.device.type == "cuda" and inputs.dtype == torch.int64
    cpu = get_batch(x, 4, 8, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(inputs.cpu(), cpu[0]) and torch.equal(targets.cpu(), cpu[1])


def test_too_short_dataset_raises():
    with pytest.raises(ValueError, match="5 tokens"):
        get_batch(np.arange(5), 1, 5, "cpu")
    get_batch(np.arange(6), 1, 5, "cpu")  # exactly context_length + 1 is fine


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"context_length": 0}, "context_length"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"context_length": True}, "context_length"),
    ],
)
def test_bad_sizes_raise(kwargs, match):
    args = {"batch_size": 2, "context_length": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        get_batch(np.arange(100), args["batch_size"], args["context_length"], "cpu")


def test_non_1d_and_non_integer_datasets_raise():
    with pytest.raises(ValueError, match=r"1-D.*\(10, 10\)"):
        get_batch(np.zeros((10, 10), dtype=np.int64), 2, 4, "cpu")
    with pytest.raises(TypeError, match="float"):
        get_batch(np.zeros(100, dtype=np.float32), 2, 4, "cpu")


def test_vocab_size_check_names_the_bad_id():
    x = np.full(50, 7, dtype=np.uint16)
    x[:] = 3
    x[10:40] = 9999  # every window of length 20 touches it
    with pytest.raises(ValueError, match="9999"):
        get_batch(x, 4, 20, "cpu", vocab_size=100)
    get_batch(x, 4, 20, "cpu", vocab_size=10_000)


@given(
    n=st.integers(2, 300),
    context_length=st.integers(1, 64),
    batch_size=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_windows_are_contiguous_slices(n, context_length, batch_size, seed):
    x = np.arange(n, dtype=np.uint32) * 3 + 1  # values differ from indices
    if n < context_length + 1:
        with pytest.raises(ValueError):
            get_batch(x, batch_size, context_length, "cpu")
        return
    inputs, targets = get_batch(x, batch_size, context_length, "cpu", torch.Generator().manual_seed(seed))
    assert inputs.shape == targets.shape == (batch_size, context_length)
    for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
        s = (row_in[0] - 1) // 3
        assert 0 <= s <= n - context_length - 1
        assert row_in == x[s : s + context_length].astype(np.int64).tolist()
        assert row_t == x[s + 1 : s + context_length + 1].astype(np.int64).tolist()


@given(
    world=st.sampled_from([1, 2, 4]),
    local=st.integers(1, 6),
    context_length=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
    as_tensor=st.booleans(),
)
def test_property_the_ranks_rows_put_together_are_the_global_batch(world, local, context_length, seed, as_tensor):
    """Every rank draws the whole global batch from the same generator state and keeps its rows:
    their union, in rank order, is the batch one process draws, and each generator ends where the
    single process's does (the next step's batch agrees too)."""
    x = np.arange(500, dtype=np.uint16) * 7 % 499
    data = torch.from_numpy(x.astype(np.int32)) if as_tensor else x
    batch = world * local
    g = torch.Generator().manual_seed(seed)
    whole = [get_batch(data, batch, context_length, "cpu", g) for _ in range(2)]  # two steps
    ranks = []
    for rank in range(world):
        gr, rows = torch.Generator().manual_seed(seed), slice(rank * local, (rank + 1) * local)
        ranks.append([get_batch(data, batch, context_length, "cpu", gr, rows=rows) for _ in range(2)])
    for step, (inputs, targets) in enumerate(whole):
        assert all(r[step][0].shape == r[step][1].shape == (local, context_length) for r in ranks)
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), inputs)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), targets)


def test_rows_reads_only_the_selected_windows():
    """``rows`` gathers only its own windows' tokens, not the global batch's."""

    class Counting(np.ndarray):
        reads: list[int] = []

        def __getitem__(self, idx):
            if isinstance(idx, np.ndarray):
                Counting.reads.append(idx.size)
            return np.asarray(self).__getitem__(idx)

    x = np.arange(1000, dtype=np.uint16).view(Counting)
    inputs, targets = get_batch(x, 64, 10, "cpu", torch.Generator().manual_seed(0), rows=slice(16, 20))
    assert inputs.shape == (4, 10)
    assert Counting.reads == [4 * 11]
    _assert_windows(np.arange(1000), inputs, targets, 10)


@pytest.mark.parametrize(
    "rows",
    [slice(0, 0), slice(3, 2), slice(-1, 2), slice(0, 9), slice(0, 4, 2), slice(None, 4), slice(0.0, 4), (0, 4), 3],
)
def test_bad_rows_raise_naming_them(rows):
    with pytest.raises(ValueError, match=r"rows must be a slice.*batch_size = 8.*got " + re.escape(repr(rows))):
        get_batch(np.arange(100), 8, 4, "cpu", rows=rows)


# ------------------------------------------------------------------------------------------------
# Token files
# ------------------------------------------------------------------------------------------------
FP = "ab" * 32  # a sha256-shaped fingerprint


@pytest.mark.parametrize("vocab_size, dtype", [(256, "uint16"), (65536, "uint16"), (65537, "uint32")])
def test_write_load_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, size=1234)
    ids[0] = vocab_size - 1
    path = tmp_path / "tok.bin"
    meta = write_tokens(path, ids.tolist(), vocab_size=vocab_size, tokenizer_fingerprint=FP, source="corpus.txt")
    assert meta["dtype"] == dtype
    side = json.loads(sidecar_path(path).read_text())
    assert side == read_sidecar(path) == meta
    assert side["format"] == "flm-tokens" and side["version"] == 1 and side["count"] == 1234
    assert path.stat().st_size == 1234 * np.dtype(dtype).itemsize
    arr = load_tokens(path, vocab_size=vocab_size, tokenizer_fingerprint=FP)
    assert isinstance(arr, np.memmap) and arr.dtype == np.dtype(dtype) and not arr.flags.writeable
    np.testing.assert_array_equal(arr, ids)
    # Raw little-endian layout: readable without flm.
    np.testing.assert_array_equal(np.fromfile(path, dtype="<" + np.dtype(dtype).str[1:]), ids)
    # And it feeds get_batch directly.
    inputs, _ = get_batch(arr, 2, 8, "cpu", vocab_size=vocab_size)
    assert inputs.shape == (2, 8)
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_file_round_trip(tmp_path):
    path = tmp_path / "empty.bin"
    write_tokens(path, [], vocab_size=10)
    arr = load_tokens(path)
    assert arr.shape == (0,)


def test_truncated_file_raises_naming_the_file(tmp_path):
    path = tmp_path / "trunc.bin"
    write_tokens(path, np.arange(100), vocab_size=1000)
    with open(path, "r+b") as f:
        f.truncate(150)
    with pytest.raises(ValueError, match=r"trunc\.bin.*truncated"):
        load_tokens(path)


def test_vocab_check_names_the_bad_id(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokens(path, np.arange(100), vocab_size=1000)
    # Corrupt one id in place (the sidecar still claims vocab_size 1000).
    mm = np.memmap(path, dtype="<u2", mode="r+")
    mm[42] = 4321
    mm.flush()
    del mm
    with pytest.raises(ValueError, match=r"token id 4321 at position 42"):
        load_tokens(path)
    assert load_tokens(path, check=False)[42] == 4321


def test_vocab_check_scans_in_chunks(tmp_path, monkeypatch):
    import flm.tokens as tokens

    monkeypatch.setattr(tokens, "_SCAN_CHUNK", 7)  # force many chunks; the bad id sits in a late one
    path = tmp_path / "tok.bin"
    write_tokens(path, np.arange(100) % 50, vocab_size=50)
    load_tokens(path)
    mm = np.memmap(path, dtype="<u2", mode="r+")
    mm[93] = 60
    mm.flush()
    del mm
    with pytest.raises(ValueError, match=r"token id 60 at position 93"):
        load_tokens(path)


def test_sidecar_vocab_larger_than_model_raises(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokens(path, np.arange(10), vocab_size=1000)
    with pytest.raises(ValueError, match="vocab_size 1000"):
        load_tokens(path, vocab_size=500)


def test_write_tokens_rejects_out_of_vocab(tmp_path):
    with pytest.raises(ValueError, match="token id 10 at position 3"):
        write_tokens(tmp_path / "x.bin", [1, 2, 3, 10], vocab_size=10)
    with pytest.raises(ValueError, match="-1"):
        write_tokens(tmp_path / "x.bin", [1, -1], vocab_size=10)
    assert not list(tmp_path.iterdir())


def test_fingerprint_mismatch_raises(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokens(path, np.arange(10), vocab_size=100, tokenizer_fingerprint=FP)
    with pytest.raises(ValueError, match=f"made with tokenizer {FP}"):
        load_tokens(path, tokenizer_fingerprint="cd" * 32)
    load_tokens(path, tokenizer_fingerprint=FP.upper())  # hex case does not matter
    path2 = tmp_path / "nofp.bin"
    write_tokens(path2, np.arange(10), vocab_size=100)
    with pytest.raises(ValueError, match="unrecorded tokenizer"):
        load_tokens(path2, tokenizer_fingerprint=FP)


def test_raw_file_needs_dtype(tmp_path):
    path = tmp_path / "raw.bin"
    np.arange(20, dtype="<u4").tofile(path)
    with pytest.raises(FileNotFoundError, match="dtype="):
        load_tokens(path)
    arr = load_tokens(path, dtype="uint32", vocab_size=20)
    np.testing.assert_array_equal(arr, np.arange(20))
    with pytest.raises(ValueError, match="token id 19"):
        load_tokens(path, dtype=np.uint32, vocab_size=19)
    with open(path, "ab") as f:
        f.write(b"\x00\x01\x02")  # 83 bytes: not whole uint32s
    with pytest.raises(ValueError, match=r"raw\.bin.*multiple"):
        load_tokens(path, dtype="uint32")


def test_dtype_disagreeing_with_sidecar_raises(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokens(path, np.arange(10), vocab_size=100)
    load_tokens(path, dtype="uint16")
    with pytest.raises(ValueError, match="uint32"):
        load_tokens(path, dtype="uint32")


def test_bad_sidecar_raises(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokens(path, np.arange(10), vocab_size=100)
    sc = sidecar_path(path)
    meta = json.loads(sc.read_text())
    sc.write_text(json.dumps(meta | {"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_tokens(path)
    sc.write_text(json.dumps(meta | {"dtype": "float32"}))
    with pytest.raises(ValueError, match="float32"):
        load_tokens(path)
    sc.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        read_sidecar(path)


def test_overwrite_replaces_data_and_sidecar(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokens(path, np.arange(10), vocab_size=100)
    write_tokens(path, np.arange(5), vocab_size=100_000)
    arr = load_tokens(path)
    assert arr.dtype == np.dtype("<u4") and arr.tolist() == list(range(5))
