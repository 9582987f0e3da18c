"""The small full-batch fits: the candidates' inverse temperature and static weights' closed-form gradient."""

import pytest
import torch
from torch import nn

from clip_ensemble.calibration.static_fits import (
    fit_inverse_temperature,
    fit_log_temperature_lbfgs,
    static_loss_and_gradient,
)
from clip_ensemble.models.gate import EnsembleGate, combine_logits


def test_inverse_temperature_recovers_the_scale_labels_were_drawn_at():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=generator)
    labels = torch.multinomial((2.5 * logits).softmax(-1), 1, generator=generator).squeeze(1)
    assert fit_inverse_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    # Logits that are always right are pushed to high confidence, but a bounded one.
    assert 1 < fit_inverse_temperature(torch.eye(3).repeat(4, 1), torch.arange(3).repeat(4)) <= torch.e**10


@pytest.mark.parametrize("n, scale", [(12, 0.3), (60, 1.0), (400, 8.0)])
def test_newtons_inverse_temperature_is_the_minimum_l_bfgs_finds(n, scale):
    generator = torch.Generator().manual_seed(n)
    logits = scale * torch.randn(n, 16, generator=generator)
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    assert fit_inverse_temperature(logits, labels) == pytest.approx(fit_log_temperature_lbfgs(logits, labels), rel=1e-3)


@pytest.mark.parametrize("combination", ["softplus", "softmax"])
def test_static_weights_closed_form_gradient_is_autograds(combination):
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 3, 7, generator=generator), torch.randint(0, 7, (50,), generator=generator)
    gate = EnsembleGate([4, 4, 4], combination=combination)
    bias = torch.randn(3, generator=generator, requires_grad=True)
    loss, gradient = static_loss_and_gradient(gate, bias.detach(), logits, labels, penalty=0.03)
    weights = gate.activate(bias)
    expected = nn.functional.cross_entropy(combine_logits(logits, weights.expand(50, -1)), labels)
    expected = expected + 0.03 * (weights - 1 / 3).pow(2).sum()
    expected.backward()
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(gradient, bias.grad)
