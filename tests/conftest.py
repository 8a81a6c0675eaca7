import pytest
import torch

from mambabyte.architectures import build_model
from mambabyte.config import preset


@pytest.fixture
def tiny_model():
    """The tiny preset with every parameter moved off its initial value (norms, D, biases included),
    so that a swapped or dropped weight changes the logits."""
    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()
