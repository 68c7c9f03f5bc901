"""Base models: preparing one leaves the caller's random stream alone."""

from __future__ import annotations

import torch

from core.models import build_tiny_random


def test_building_the_tiny_model_does_not_move_the_global_random_stream():
    """A run seeds, then loads its base model; the first load in a deployment builds it. If that
    reseeded the global stream, a job's first run would sample differently from its reruns."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first, _ = build_tiny_random()
    assert torch.equal(torch.rand(4), expected)
    second, _ = build_tiny_random()  # and the model itself is the same every time
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
