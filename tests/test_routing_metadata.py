"""route_metadata: exact agreement with the reference, invariants, opcheck, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseops
from conftest import DEVICES, backend_params, interpreted
from sparseops.reference import route_metadata_ref
from sparseops.testing import random_ids

BACKENDS = backend_params("route_metadata")
FIELDS = sparseops.RouteMeta._fields


def _check(ids, E, block_m, backend):
    meta = sparseops.route_metadata(ids, E, block_m=block_m, backend=backend)
    expected = route_metadata_ref(ids, E, block_m)
    for name, got, want in zip(FIELDS, meta, expected):
        if block_m == 0 and name.startswith(("padded", "block")):
            assert got is None
            continue
        assert got.dtype == torch.int32 and got.device == ids.device, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    return meta


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize(
    "T,k,E",
    [(1, 1, 1), (1, 2, 8), (7, 2, 8), (97, 8, 128), (64, 8, 256), (600, 8, 60), (1025, 4, 257), (700, 6, 1024)],
)
@pytest.mark.parametrize("block_m", [0, 1, 16, 64])
def test_matches_reference(device, backend, T, k, E, block_m):
    if interpreted(device, backend) and T * k > 1000:
        pytest.skip("too many programs for the Triton interpreter")
    ids = random_ids(T, k, E, device=device, seed=T * k + E)
    _check(ids, E, block_m, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_large_multi_tile(device, backend):
    """Many tiles, skewed load and empty experts: the multi-block path of the GPU kernels."""
    T = 512 if interpreted(device, backend) else 8192
    ids = random_ids(T, 8, 128, device=device, seed=1, skew=4.0, drop=0.01)
    meta = _check(ids, 128, 16, backend)
    assert (meta.counts == 0).any(), "skewed routing should leave some experts empty"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("block_m", [0, 8])
def test_empty_and_dropped(device, backend, block_m):
    _check(torch.empty(0, 4, dtype=torch.int32, device=device), 16, block_m, backend)
    ids = random_ids(33, 4, 16, device=device, seed=2, drop=0.3)
    meta = _check(ids, 16, block_m, backend)
    kept = int((ids >= 0).sum())
    assert int(meta.offs[-1]) == kept
    assert (ids.flatten()[meta.sorted_slots[kept:].long()] == -1).all()
    all_dropped = torch.full((5, 2), -1, dtype=torch.int32, device=device)
    _check(all_dropped, 4, block_m, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_int64_ids_and_noncontiguous(device, backend):
    ids = random_ids(20, 4, 32, device=device, seed=3)
    _check(ids.long(), 32, 4, backend)
    wide = torch.empty(20, 8, dtype=torch.int32, device=device)
    wide[:, ::2] = ids
    _check(wide[:, ::2], 32, 4, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic(device, backend):
    ids = random_ids(300, 8, 64, device=device, seed=4)
    a = sparseops.route_metadata(ids, 64, block_m=16, backend=backend)
    b = sparseops.route_metadata(ids, 64, block_m=16, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 200),
    k=st.integers(1, 8),
    E=st.integers(1, 300),
    block_m=st.sampled_from([0, 1, 3, 16, 128]),
    drop=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_invariants(T, k, E, block_m, drop, seed):
    """Properties that define the layout, checked without the reference (CPU default backend)."""
    k = min(k, E)
    ids = random_ids(T, k, E, seed=seed, drop=drop)
    m = sparseops.route_metadata(ids, E, block_m=block_m)
    flat = ids.flatten().long()
    n = T * k
    assert int(m.counts.sum()) == int((flat >= 0).sum())
    assert torch.equal(m.offs, m.counts.cumsum(0).to(torch.int32))
    # sorted_slots is a permutation and inverse is its inverse.
    assert torch.equal(m.sorted_slots.sort().values, torch.arange(n, dtype=torch.int32))
    assert torch.equal(m.inverse[m.sorted_slots.long()], torch.arange(n, dtype=torch.int32))
    # Expert-major and stable: keys ascending, slots ascending within equal keys.
    key = torch.where(flat >= 0, flat, E)[m.sorted_slots.long()]
    assert (key[1:] >= key[:-1]).all()
    same = key[1:] == key[:-1]
    assert (m.sorted_slots[1:][same] > m.sorted_slots[:-1][same]).all()
    assert torch.equal(m.tokens, m.sorted_slots // k)
    if block_m:
        padded_counts = (m.counts + block_m - 1) // block_m * block_m
        assert torch.equal(m.padded_offs, padded_counts.cumsum(0).to(torch.int32))
        real = m.padded_slots < n
        assert int(real.sum()) == int(m.counts.sum())
        assert torch.equal(
            m.padded_slots[real].sort().values, m.sorted_slots[: int(m.offs[-1]) if E else 0].sort().values
        )
        # Every real row sits in a block owned by its expert.
        rows = real.nonzero().flatten()
        row_expert = flat[m.padded_slots[rows].long()]
        assert torch.equal(m.block_expert[rows // block_m].long(), row_expert)
        used = int(m.padded_offs[-1]) // block_m
        assert (m.block_expert[used:] == -1).all() and (m.block_expert[:used] >= 0).all()


@pytest.mark.skipif(not sparseops.build_info()["extension"], reason="C++ extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for ids, E, bm in [(random_ids(9, 3, 16, device=device), 16, 0), (random_ids(9, 3, 16, device=device), 16, 4)]:
        torch.library.opcheck(torch.ops.sparseops.route_metadata.default, (ids, E, bm))


@pytest.mark.skipif(not sparseops.build_info()["extension"], reason="C++ extension not built")
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_every_backend(device, backend):
    ids = random_ids(9, 3, 16, device=device)
    torch.library.opcheck(torch.ops.sparseops.route_metadata.default, (ids, 16, 4, backend))


BAD = [
    ("rank", lambda d: (torch.zeros(6, dtype=torch.int32, device=d), 8, 0), "ids must be a 2-D tensor"),
    ("dtype", lambda d: (torch.zeros(3, 2, device=d), 8, 0), "ids must have dtype"),
    ("E=0", lambda d: (torch.zeros(3, 2, dtype=torch.int32, device=d), 0, 0), "num_experts must be in"),
    ("E>1024", lambda d: (torch.zeros(3, 2, dtype=torch.int32, device=d), 1025, 0), "num_experts must be in"),
    ("block_m<0", lambda d: (torch.zeros(3, 2, dtype=torch.int32, device=d), 8, -1), "block_m must be in"),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name,make,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(device, backend, name, make, message):
    ids, E, bm = make(device)
    with pytest.raises(RuntimeError, match=message):
        sparseops.route_metadata(ids, E, block_m=bm, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad_value", [8, 100, -2])
def test_out_of_range_ids_raise_on_cpu(backend, bad_value):
    ids = random_ids(5, 2, 8)
    ids[2, 1] = bad_value
    with pytest.raises(RuntimeError, match=r"ids must hold expert indices in \[0, num_experts = 8\)"):
        sparseops.route_metadata(ids, 8, backend=backend)
