"""Shared-input detection: layers fed the very same tensor in every call form a group (q/k/v, FLUX's parallel
MLP); equal values in different tensors, or sharing only sometimes, do not."""

from __future__ import annotations

import torch
from torch import nn

from vqsuite.calibrators.capture import capture_inputs
from vqsuite.calibrators.shared_inputs import SharedInputTracker, track_shared_inputs


class Attention(nn.Module):
    """``x [B, T, C]``: q/k/v read the same tensor, ``out`` reads the attention result."""

    def __init__(self, c: int = 32, clone_inputs: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(c, c) for _ in range(4))
        self.clone_inputs = clone_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [x.clone() for _ in range(3)] if self.clone_inputs else [x] * 3
        q, k, v = self.q(xs[0]), self.k(xs[1]), self.v(xs[2])
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.out(a @ v)


class ParallelBlock(nn.Module):
    """FLUX single-block style: one normalized tensor feeds attention q/k/v and the MLP up-projection."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.attn = Attention(c)
        self.mlp_up = nn.Linear(c, 4 * c)
        self.mlp_down = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h) + self.mlp_down(torch.relu(self.mlp_up(h)))


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _groups(model: nn.Module, batches: list[torch.Tensor]) -> list[list[str]]:
    mods = _linears(model)
    with torch.no_grad(), track_shared_inputs(mods) as tracker:
        for b in batches:
            model(b)
    return tracker.groups(list(mods))


def test_qkv_reading_one_tensor_form_a_group() -> None:
    groups = _groups(Attention(), [torch.randn(2, 5, 32) for _ in range(3)])
    assert groups == [["q", "k", "v"], ["out"]]


def test_parallel_block_groups_qkv_with_the_mlp_up_projection() -> None:
    model = nn.Sequential(ParallelBlock(), ParallelBlock())
    groups = _groups(model, [torch.randn(2, 5, 32)])
    assert ["0.attn.q", "0.attn.k", "0.attn.v", "0.mlp_up"] in groups
    assert ["1.attn.q", "1.attn.k", "1.attn.v", "1.mlp_up"] in groups
    assert ["0.mlp_down"] in groups and ["1.attn.out"] in groups


def test_equal_values_in_different_tensors_are_not_shared() -> None:
    groups = _groups(Attention(clone_inputs=True), [torch.randn(2, 5, 32)])
    assert groups == [["q"], ["k"], ["v"], ["out"]]


def test_sharing_only_in_some_calls_is_not_sharing() -> None:
    tracker = SharedInputTracker()
    x = torch.randn(3, 8)
    tracker.observe("a", x)
    tracker.observe("b", x)
    y = torch.randn(3, 8)
    tracker.observe("a", y)
    tracker.observe("b", y.clone())  # same values, another tensor
    assert tracker.groups(["a", "b"]) == [["a"], ["b"]]
    assert tracker.calls == {"a": 2, "b": 2}


def test_reused_memory_of_a_dead_tensor_is_not_sharing() -> None:
    """A freed tensor's address may be handed to the next one: only a live first tensor counts."""
    tracker = SharedInputTracker()
    for _ in range(4):
        t = torch.randn(16, 8)
        tracker.observe("a", t)
        del t
        u = torch.randn(16, 8)  # likely the same address as t
        tracker.observe("b", u)
        del u
    assert tracker.groups(["a", "b"]) == [["a"], ["b"]]


def test_an_in_place_change_between_readers_breaks_the_sharing() -> None:
    tracker = SharedInputTracker()
    x = torch.randn(4, 8)
    tracker.observe("a", x)
    x.mul_(2)  # b sees other values in the same memory
    tracker.observe("b", x)
    assert tracker.groups(["a", "b"]) == [["a"], ["b"]]


def test_tracking_and_capture_run_in_one_pass() -> None:
    model = Attention()
    mods = _linears(model)
    x = torch.randn(2, 7, 32)
    with torch.no_grad(), capture_inputs(mods, reservoir=64) as stats, track_shared_inputs(mods) as tracker:
        model(x)
    assert tracker.groups(list(mods))[0] == ["q", "k", "v"]
    assert torch.equal(stats["q"].absmax, x.abs().amax(dim=(0, 1)))
    assert stats["q"].sample.shape == (14, 32) and stats["out"].n_rows == 14
