"""batchnorm.packed_batch_norm: the same training-mode batch norm as PyTorch's, forward, backward and running
statistics, at the widths pruning leaves."""
import copy

import pytest
import torch
from torch import nn

from edgeprune import create_model, prune
from edgeprune.batchnorm import packed_batch_norm, use_packed_batch_norm
from edgeprune.recipe import PruneOptions


@pytest.mark.parametrize(("width", "shape", "momentum", "affine", "track"), [
    (8, (16, 8, 8), 0.1, True, True),  # rows of 32 pixels
    (24, (6, 5, 5), None, True, True),  # 150 pixels: rows of 2, not of 32; cumulative running average
    (33, (8, 4, 4), 0.1, False, True),  # no affine parameters; rows of 128 pixels
    (4, (4, 4, 4), 0.1, True, False),  # no running statistics: batch statistics in eval mode too
    (5, (3, 3, 3), 0.1, True, True),  # 27 pixels: rows of one pixel
])
def test_matches_pytorch_in_float64(width, shape, momentum, affine, track):
    torch.manual_seed(width)
    reference = nn.BatchNorm2d(width, momentum=momentum, affine=affine, track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-1, 1)
    packed = copy.deepcopy(reference)
    assert len(use_packed_batch_norm(packed)) == 1
    n, h, w = shape
    for _ in range(3):  # the running statistics accumulate over steps
        # a large per-channel mean against a unit spread (in float64 the batch mean is its own shift, so the
        # cancellation and the offset terms are exercised by the FP32 and bf16 test below)
        x = torch.randn(n, width, h, w, dtype=torch.double) + 20 * torch.randn(1, width, 1, 1, dtype=torch.double)
        x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(x.shape, dtype=x.dtype)  # contiguous: the backward takes any layout
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = reference(xa), packed(xb)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-9)
        assert yb.is_contiguous(memory_format=torch.channels_last)
    if affine:
        torch.testing.assert_close(packed.weight.grad, reference.weight.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(packed.bias.grad, reference.bias.grad, rtol=1e-9, atol=1e-9)
    for a, b in zip(packed.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    packed.eval()
    reference.eval()
    x = torch.randn(2, width, h, w, dtype=torch.double)
    torch.testing.assert_close(packed(x), reference(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_as_close_to_float64_as_pytorchs_own(dtype):
    """In FP32 and in bf16 (FP32 parameters, as under autocast), with a per-channel mean ten times the spread: the
    output, every gradient and the running statistics land as close to the float64 batch norm's as PyTorch's own
    kernel's do (the batch mean rounded to the input's precision leaves an offset the backward must carry)."""
    torch.manual_seed(1)
    width = 24
    x64 = (torch.randn(32, width, 16, 16, dtype=torch.double) + 10 * torch.randn(1, width, 1, 1, dtype=torch.double)
           ).contiguous(memory_format=torch.channels_last)
    g64 = torch.randn_like(x64)
    exact = nn.BatchNorm2d(width).double()
    with torch.no_grad():
        exact.weight.uniform_(0.5, 1.5)
        exact.bias.uniform_(-1, 1)
    x = x64.clone().requires_grad_()
    y = exact(x)
    y.backward(g64)
    truth = [y, x.grad, exact.weight.grad, exact.bias.grad, exact.running_mean, exact.running_var]
    errors = {}
    for way in ("pytorch", "packed"):
        bn = copy.deepcopy(exact).float()
        bn.weight.grad = bn.bias.grad = None
        if way == "packed":
            use_packed_batch_norm(bn)
        xd = x64.to(dtype).requires_grad_()
        yd = bn(xd)
        yd.backward(g64.to(dtype))
        assert yd.dtype == xd.grad.dtype == dtype and bn.weight.grad.dtype == torch.float32
        got = [yd, xd.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]
        errors[way] = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, truth, strict=True)]
    for name, ours, theirs in zip(("y", "dx", "dweight", "dbias", "running mean", "running var"),
                                  errors["packed"], errors["pytorch"], strict=True):
        assert ours <= 2 * theirs + (1e-6 if dtype == torch.float32 else 1e-3), (name, ours, theirs)


def test_falls_back_where_it_cannot_help():
    """Double backward raises instead of coming out wrong; fp16 batches and all-bf16 modules run PyTorch's own
    (bit-identical to it); training under no_grad gives PyTorch's result (eval mode: the float64 test)."""
    bn = nn.BatchNorm2d(8)
    use_packed_batch_norm(bn)
    x = torch.randn(4, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    (gx,) = torch.autograd.grad(bn(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()
    for dtype, params in ((torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)):
        reference = nn.BatchNorm2d(8).to(params)
        packed = copy.deepcopy(reference)
        use_packed_batch_norm(packed)
        xd = x.detach().to(dtype)
        assert torch.equal(packed(xd), reference(xd))
        assert torch.equal(packed.running_var, reference.running_var)
    with torch.no_grad():
        reference = nn.BatchNorm2d(8)
        packed = copy.deepcopy(reference)
        use_packed_batch_norm(packed)
        torch.testing.assert_close(packed(x), reference(x), rtol=1e-5, atol=1e-5)


def test_contiguous_input_and_single_value_error():
    bn = nn.BatchNorm2d(8)
    x = torch.randn(4, 8, 3, 3)  # contiguous: copied to channels-last, same values
    torch.testing.assert_close(packed_batch_norm(bn, x), nn.BatchNorm2d(8)(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # PyTorch's own message
        packed_batch_norm(bn, torch.randn(1, 8, 1, 1))


def test_a_pruned_model_trains_as_with_pytorchs_batch_norm():
    """Only the layers whose width is not a multiple of 16 change forward; a training step's gradients land as
    close to float64's with them as with PyTorch's batch norm, in FP32 and under bf16 autocast (an untrained
    network amplifies round-off, so each is compared with the float64 step rather than with each other), and
    removing the handles leaves the modules as they were."""
    torch.manual_seed(0)
    model, _ = prune(create_model("cifar_resnet20"), PruneOptions(ratio=0.5))
    model = model.to(memory_format=torch.channels_last).train()
    widths = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))

    def grads(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        m = copy.deepcopy(m).to(torch.float64 if dtype == torch.float64 else torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = nn.functional.cross_entropy(m(x.to(torch.float64 if dtype == torch.float64 else x.dtype)), y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()]).double()

    packed = copy.deepcopy(model)
    handles = use_packed_batch_norm(packed)
    assert len(handles) == sum(w % 16 != 0 for w in widths) > 0
    exact = grads(model, torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        native, ours = ((grads(m, dtype) - exact).norm() / exact.norm() for m in (model, packed))
        assert ours < 1.5 * native + 1e-6, (dtype, ours, native)
    for handle in handles:
        handle.remove()
    assert not any("forward" in vars(m) for m in packed.modules())
    assert packed.state_dict().keys() == model.state_dict().keys()
