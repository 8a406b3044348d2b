"""nn.NMLinear, sparsify_ and wanda_scores: the N:M drop-in modules."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseops
from sparseops.nn import NMLinear, sparsify_, wanda_scores


def _masked_dense(lin: nn.Linear, n: int, m: int, scores=None) -> torch.Tensor:
    mask = sparseops.nm_mask(lin.weight.detach(), n, m, scores=scores)
    return lin.weight.detach() * mask


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (1, 2), (8, 16)])
def test_from_dense_forward_equals_masked_dense(n, m):
    torch.manual_seed(0)
    lin = nn.Linear(48, 7)
    mod = NMLinear.from_dense(lin, n, m)
    x = torch.randn(5, 3, 48)
    want = F.linear(x, _masked_dense(lin, n, m), lin.bias)
    torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.weight, _masked_dense(lin, n, m))
    assert f"{n}:{m}" in repr(mod)


def test_training_step_keeps_pruned_positions_zero():
    torch.manual_seed(1)
    lin = nn.Linear(32, 6)
    mod = NMLinear.from_dense(lin, 2, 4)
    mask = mod.weight != 0
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    x = torch.randn(9, 32)
    loss = mod(x).square().sum()
    loss.backward()
    # the values' gradient is the dense gradient at the kept columns
    dense = _masked_dense(lin, 2, 4).requires_grad_(True)
    F.linear(x, dense, lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(mod.values.grad, dense.grad[mask].reshape(6, -1), rtol=1e-5, atol=1e-5)
    opt.step()
    assert (mod.weight[~mask] == 0).all()


def test_state_dict_round_trip():
    torch.manual_seed(2)
    mod = NMLinear.from_dense(nn.Linear(16, 5), 1, 4)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    other = NMLinear(16, 5, 1, 4)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(3, 16)
    torch.testing.assert_close(other(x), mod(x))


def test_sparsify_include_exclude_and_wanda():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 3))
    batches = [torch.randn(4, 16) for _ in range(3)]
    scores = wanda_scores(model, batches, exclude="3")
    assert set(scores) == {"0", "2"}
    dense = [m.weight.detach().clone() for m in (model[0], model[2])]
    sparsify_(model, "2:4", exclude="3", scores=scores)
    assert isinstance(model[0], NMLinear) and isinstance(model[2], NMLinear)
    assert type(model[3]) is nn.Linear
    assert model.nm_sparsified == ["0", "2"]
    for mod, w, name in zip((model[0], model[2]), dense, ("0", "2")):
        want = w * sparseops.nm_mask(w, 2, 4, scores=scores[name])
        torch.testing.assert_close(mod.weight, want)


def test_sparsify_bad_inputs():
    with pytest.raises(ValueError, match="not a multiple of m"):
        sparsify_(nn.Sequential(nn.Linear(6, 4)), "2:4")
    with pytest.raises(TypeError, match="nn.Linear"):
        NMLinear.from_dense(nn.Conv1d(4, 4, 1), 2, 4)
