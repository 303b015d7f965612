"""What proximity, adaptive, sphere and subspace steering promise, checked on a tiny random model.

Each test observes the hooked site twice in one pass, before and after the steering hook (an
observer installed before ``apply_steering`` runs first, one installed inside runs last), and
asserts the mode's formula from steering.py on every position: which positions move, by how much
and in which direction, and which stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from alignment_artifacts.models import site_hooks
from alignment_artifacts.steering import SteeringConfig, apply_steering
from tiny_models import tiny_model
from tiny_steering import logits, random_directions

SITE = "mlp_out"  # where random_directions says the directions were measured: the modes hook it by default
LAYER = 2  # the hooked layer of single-layer tests: its input does not depend on the steering


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("qwen2")


def observe(loaded, config, directions, layers):
    """(before, after, interventions): the hooked site's states around the steering hook, per layer."""
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}

    def keep(store, layer):
        def fn(h):
            store[layer] = h.detach().clone()

        return fn

    with (site_hooks(loaded.adapter, {(SITE, layer): keep(before, layer) for layer in layers}),
          apply_steering(loaded, config, directions) as handle,
          site_hooks(loaded.adapter, {(SITE, layer): keep(after, layer) for layer in layers})):
        logits(loaded)
    return before, after, handle.total()


def plain_states(loaded, layer=LAYER) -> torch.Tensor:
    """The unsteered site states at ``layer`` for the test prompts, [batch, seq, hidden]."""
    seen = []
    with site_hooks(loaded.adapter, {(SITE, layer): lambda h: seen.append(h.detach().clone())}):
        logits(loaded)
    return seen[0]


def cosine(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (h @ u) / h.norm(dim=-1)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_proximity_moves_exactly_the_positions_close_to_the_direction_by_s_v(loaded):
    """proximity: h - s*v where |cos(h, u)| > threshold, h untouched elsewhere."""
    directions = random_directions(loaded)
    v = directions.vectors[LAYER]
    u = v / v.norm()
    cos = cosine(plain_states(loaded), u)
    threshold = float(cos.abs().median())  # about half the positions on each side
    near_sign = torch.sign(cos[cos.abs() > threshold])
    assert (near_sign > 0).any() and (near_sign < 0).any()  # both signs qualify: |cos|, not cos
    s = 1.5
    config = SteeringConfig(mode="proximity", scale=s, layers=[LAYER], proximity_threshold=threshold)
    before, after, total = observe(loaded, config, directions, [LAYER])
    near = cosine(before[LAYER], u).abs() > threshold
    assert torch.equal(after[LAYER][~near], before[LAYER][~near])
    close(after[LAYER][near], before[LAYER][near] - s * v)
    assert total == int(near.sum()) > 0
    stricter = SteeringConfig(mode="proximity", scale=s, layers=[LAYER], proximity_threshold=min(1.0, 2 * threshold))
    assert 0 <= observe(loaded, stricter, directions, [LAYER])[2] < total  # a higher threshold touches fewer


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_adaptive_subtracts_v_weighted_by_the_absolute_cosine(loaded, scale):
    """adaptive: h - s*|cos(h, u)|*v at every position and hooked layer, so the change lies along v."""
    directions = random_directions(loaded)
    layers = [1, LAYER]
    config = SteeringConfig(mode="adaptive", scale=scale, layers=layers)
    before, after, total = observe(loaded, config, directions, layers)
    for layer in layers:
        v = directions.vectors[layer]
        weight = cosine(before[layer], v / v.norm()).abs()
        close(after[layer], before[layer] - scale * weight[..., None] * v)
    assert total == before[1].shape[0] * before[1].shape[1] * len(layers)


def test_adaptive_shift_grows_linearly_with_the_scale(loaded):
    directions = random_directions(loaded)
    v = directions.vectors[1]
    shifts = []
    for scale in (0.5, 1.0, 2.0):
        before, after, _ = observe(loaded, SteeringConfig(mode="adaptive", scale=scale, layers=[1]), directions,
                                   [1])
        shifts.append((before[1] - after[1]) @ (v / v.norm()))
    assert all((shift >= 0).all() for shift in shifts)  # |cos|: always against u, whichever side h is on
    close(shifts[1], 2 * shifts[0])
    close(shifts[2], 4 * shifts[0])
    assert shifts[2].abs().max() > shifts[0].abs().max() > 0


def test_sphere_pushes_positions_inside_the_radius_away_from_the_centre(loaded):
    """sphere: inside |h-c| < R, h + s*exp(-decay*|h-c|/R) along (h-c)/|h-c|; outside, untouched."""
    directions = random_directions(loaded)
    states = plain_states(loaded)
    centre = states.reshape(-1, states.shape[-1]).mean(0)
    radius = float((states - centre).norm(dim=-1).median())  # about half the positions inside
    directions.positive_mean[LAYER] = centre
    s, decay = 1.5, 2.0
    config = SteeringConfig(mode="sphere", scale=s, layers=[LAYER], distance_threshold=radius, decay_rate=decay)
    before, after, total = observe(loaded, config, directions, [LAYER])
    offset = before[LAYER] - centre
    r = offset.norm(dim=-1)
    inside = r < radius
    assert torch.equal(after[LAYER][~inside], before[LAYER][~inside])
    moved = after[LAYER][inside] - centre
    close(moved.norm(dim=-1), r[inside] + s * torch.exp(-decay * r[inside] / radius))  # pushed out by the decay
    close(torch.nn.functional.cosine_similarity(moved, offset[inside], dim=-1), torch.ones(int(inside.sum())))
    assert total == int(inside.sum()) > 0


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_subspace_shrinks_the_first_k_components_and_leaves_the_complement(loaded, scale):
    """subspace: h - s*P^T P (h - m) with P the first k PCA rows, m the midpoint of the two means."""
    directions = random_directions(loaded)  # three orthonormal PCA rows per layer
    layers, k = [1, LAYER], 2
    config = SteeringConfig(mode="subspace", scale=scale, layers=layers, pca_components=k)
    before, after, total = observe(loaded, config, directions, layers)
    for layer in layers:
        basis, extra_row = directions.pca[layer][:k], directions.pca[layer][k]
        mean = (directions.positive_mean[layer] + directions.negative_mean[layer]) / 2
        change = after[layer] - before[layer]
        close(change - (change @ basis.T) @ basis, torch.zeros_like(change))  # the complement of P is unchanged
        close(change @ extra_row, torch.zeros(change.shape[:2]))  # so is component k+1: only k are used
        close((after[layer] - mean) @ basis.T, (1 - scale) * (before[layer] - mean) @ basis.T)
        assert change.abs().max() > 0.1
    assert total == before[1].shape[0] * before[1].shape[1] * len(layers)
