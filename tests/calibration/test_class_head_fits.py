"""The class head's fits: a closed-form gradient that matches autograd's, and a basis that loses nothing under its
rank."""

import math

import torch

from clip_ensemble.calibration.class_head_fits import HEAD_RANK, _loss_and_gradient, head_basis, head_path


def test_the_closed_form_gradient_is_autograds():
    generator = torch.Generator().manual_seed(0)
    num_classes, rank = 7, 5
    inputs, anchor = torch.randn(30, rank, generator=generator), 4 * torch.randn(30, num_classes, generator=generator)
    labels = torch.randint(num_classes, (30,), generator=generator)
    parameters = torch.randn(num_classes * (rank + 1), generator=generator, requires_grad=True)
    loss, gradient = _loss_and_gradient(parameters.detach().clone(), inputs, anchor, labels, penalty=0.01)
    weight, bias = parameters[:-num_classes].view(num_classes, rank), parameters[-num_classes:]
    scores = torch.addmm(anchor + bias, inputs, weight.T)
    expected = torch.nn.functional.cross_entropy(scores, labels) + 0.005 * parameters.pow(2).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(gradient, parameters.grad)


def test_under_its_rank_the_basis_spans_every_embedding_and_the_path_starts_at_the_anchor():
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(12, 40, generator=generator)
    basis = head_basis(embeds, seed=0)
    assert basis.shape == (40, 12) and HEAD_RANK > 12
    torch.testing.assert_close(embeds @ basis @ basis.T, embeds, atol=1e-5, rtol=1e-5)  # nothing lost
    torch.testing.assert_close(basis.T @ basis, torch.eye(12), atol=1e-5, rtol=1e-5)
    anchor, labels = torch.zeros(12, 3), torch.arange(12) % 3
    path = head_path(embeds @ basis, anchor, labels, (math.inf, 1e-2))
    assert not path[0][0].any() and not path[0][1].any()  # an infinite penalty: no correction
    scores = torch.addmm(anchor + path[1][1], embeds @ basis, path[1][0].T)
    assert (scores.argmax(-1) == labels).all()  # 12 points in 12 dimensions: separable
