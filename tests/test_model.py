"""The MambaByte LM: step == forward, state carrying, row independence, document resets, size, initialisation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from mambabyte.architectures import build_model
from mambabyte.config import preset

LENGTH = 13


def random_ids(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_step_equals_forward(tiny_model):
    ids = random_ids(2, LENGTH)
    logits, final = tiny_model(ids, return_state=True)
    state = tiny_model.init_state(2)
    for t in range(LENGTH):
        step_logits, state = tiny_model.step(ids[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
    tree_map(lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5), state, final)


@torch.no_grad()
def test_step_in_place_equals_step(tiny_model):
    ids = random_ids(3, 4, seed=3)
    state = tiny_model.init_state(3)
    buffers = tiny_model.init_state(3)
    for t in range(ids.shape[1]):
        logits, state = tiny_model.step(ids[:, t], state)
        torch.testing.assert_close(tiny_model.step_(ids[:, t], buffers), logits)
    tree_map(torch.testing.assert_close, buffers, state)


@torch.no_grad()
def test_forward_from_init_state_equals_forward_without_state(tiny_model):
    ids = random_ids(2, LENGTH)
    torch.testing.assert_close(tiny_model(ids, state=tiny_model.init_state(2)), tiny_model(ids))


@torch.no_grad()
@pytest.mark.parametrize("split", range(LENGTH + 1))
def test_split_forward_with_state_equals_whole(tiny_model, split):
    ids = random_ids(2, LENGTH, seed=1)
    whole, final = tiny_model(ids, return_state=True)
    head, state = tiny_model(ids[:, :split], return_state=True)
    tail, state = tiny_model(ids[:, split:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), whole, atol=1e-5, rtol=1e-5)
    tree_map(lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5), state, final)


@torch.no_grad()
def test_forward_states_keeps_the_state_after_every_position(tiny_model):
    ids = random_ids(2, LENGTH, seed=2)
    split = 4
    _, state = tiny_model(ids[:, :split], return_state=True)
    logits, states = tiny_model.forward_states(ids[:, split:], state)
    torch.testing.assert_close(logits, tiny_model(ids)[:, split:], atol=1e-5, rtol=1e-5)
    for position in range(LENGTH - split):
        _, expected = tiny_model(ids[:, : split + position + 1], return_state=True)
        tree_map(lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5),
                 tiny_model.state_at(states, position), expected)


@torch.no_grad()
def test_state_size_does_not_grow(tiny_model):
    _, short = tiny_model(random_ids(1, 3), return_state=True)
    _, long = tiny_model(random_ids(1, 300), return_state=True)
    assert tree_map(lambda t: t.shape, short) == tree_map(lambda t: t.shape, long)
    assert tree_map(lambda t: t.shape, short) == tree_map(lambda t: t.shape, tiny_model.init_state(1))


@torch.no_grad()
def test_batch_rows_are_independent(tiny_model):
    ids = random_ids(3, LENGTH, seed=2)
    batched, state = tiny_model(ids, return_state=True)
    for row in range(3):
        alone, row_state = tiny_model(ids[row : row + 1], return_state=True)
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-5)
        tree_map(lambda a, b: torch.testing.assert_close(a[row : row + 1], b, atol=1e-5, rtol=1e-5), state, row_state)
    changed = ids.clone()
    changed[1] = random_ids(1, LENGTH, seed=3)
    torch.testing.assert_close(tiny_model(changed)[[0, 2]], batched[[0, 2]])


@torch.no_grad()
def test_batch_rows_are_independent_in_step(tiny_model):
    ids = random_ids(3, 4, seed=4)
    state = tiny_model.init_state(3)
    row_state = tiny_model.init_state(1)
    for t in range(4):
        logits, state = tiny_model.step(ids[:, t], state)
        row_logits, row_state = tiny_model.step(ids[2:, t], row_state)
        torch.testing.assert_close(logits[2:], row_logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_reset_equals_separate_documents(tiny_model):
    """A packed window with resets gives, for every document, the logits of that document run alone from zero."""
    starts = [0, 5, 6, 14]  # documents of 5, 1 (shorter than the conv window), 8 and 6 bytes
    ids = random_ids(2, 20, seed=5)
    reset = torch.zeros(2, 20, dtype=torch.bool)
    reset[:, starts[1:]] = True
    packed, final = tiny_model(ids, return_state=True, reset=reset)
    for start, end in zip(starts, starts[1:] + [20]):
        alone, alone_state = tiny_model(ids[:, start:end], return_state=True)
        torch.testing.assert_close(packed[:, start:end], alone, atol=1e-5, rtol=1e-5)
    tree_map(lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5), final, alone_state)


@torch.no_grad()
def test_reset_at_start_forgets_the_carried_state(tiny_model):
    ids = random_ids(2, LENGTH, seed=6)
    _, state = tiny_model(random_ids(2, 9, seed=7), return_state=True)
    reset = torch.zeros(2, LENGTH, dtype=torch.bool)
    reset[0, 0] = True  # row 0 starts a new document, row 1 continues
    logits = tiny_model(ids, state=state, reset=reset)
    torch.testing.assert_close(logits[0], tiny_model(ids[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], tiny_model(ids[1:], state=tree_map(lambda t: t[1:], state))[0],
                               atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter(tiny_model):
    ids = random_ids(2, LENGTH, seed=8)
    logits = tiny_model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
    for name, parameter in tiny_model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_recomputing_the_conv_in_the_backward_changes_no_gradient(tiny_model, monkeypatch):
    from mambabyte import mixer

    ids = random_ids(2, LENGTH, seed=4)
    grads = []
    for devices in ((), ("cpu",)):
        monkeypatch.setattr(mixer, "RECOMPUTE_CONV_ON", devices)
        tiny_model.zero_grad()
        tiny_model(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in tiny_model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)


def test_small_preset_parameter_count():
    with torch.device("meta"):
        model = build_model(preset("small"))
    assert model.num_parameters() == 3_569_920


@torch.no_grad()
def test_initialisation_matches_design():
    torch.manual_seed(0)
    config = preset("small")
    model = build_model(config)
    expected_A_log = torch.log(torch.arange(1, config.d_state + 1, dtype=torch.float32)).expand(config.d_inner, -1)
    dt_bound = config.dt_rank**-0.5
    for layer in model.layers:
        mixer = layer.mixer
        torch.testing.assert_close(mixer.A_log, expected_A_log)
        torch.testing.assert_close(mixer.D, torch.ones(config.d_inner))
        dt = F.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
        log_dt = dt.log()  # log-uniform: the logs spread over the whole range, mean near the middle
        assert log_dt.min() < math.log(2e-3) and log_dt.max() > math.log(5e-2)
        assert abs(log_dt.mean().item() - (math.log(1e-3) + math.log(1e-1)) / 2) < 0.3
        assert mixer.dt_proj.weight.abs().max() <= dt_bound
        assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.x_proj.bias is None
        torch.testing.assert_close(layer.norm.weight, torch.ones(config.d_model))
        assert layer.norm.eps == config.norm_eps == 1e-5
        # kaiming-uniform(a=sqrt 5) bound is 1/sqrt(fan_in), then divided by sqrt(n_layer)
        out_bound = 1 / math.sqrt(config.d_inner) / math.sqrt(config.n_layer)
        assert mixer.out_proj.weight.abs().max() <= out_bound
        assert mixer.out_proj.weight.abs().max() > 0.9 * out_bound
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.002
    torch.testing.assert_close(model.norm_f.weight, torch.ones(config.d_model))


def test_head_is_tied_to_embedding(tiny_model):
    ids = torch.tensor([[1, 2, 3, 4]])  # byte 200 is not in the input: its embedding row reaches only the head
    with torch.no_grad():
        before = tiny_model(ids)
        tiny_model.embedding.weight[200] += 1.0
        after = tiny_model(ids)
    torch.testing.assert_close(after[..., :200], before[..., :200])
    assert not torch.allclose(after[..., 200], before[..., 200])
    assert sum(p.numel() for p in tiny_model.parameters()) == tiny_model.num_parameters()


def test_logits_are_fp32_and_shaped(tiny_model):
    logits = tiny_model(random_ids(2, 7))
    assert logits.shape == (2, 7, 256) and logits.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_bf16_autocast_trains_with_every_backend(tiny_model, backend, monkeypatch):
    """Mixed precision (as on GPU) must run forward and backward, and stay close to fp32."""
    monkeypatch.setenv("MAMBABYTE_SCAN", backend)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    reference = tiny_model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tiny_model(ids)
    logits.float().logsumexp(-1).mean().backward()
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny_model.parameters())


def test_bf16_weights_forward_and_step_match_fp32(tiny_model):
    """A model cast to bf16 (how GPU decoding stores it) runs both paths and stays close to fp32."""
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = tiny_model(ids)
        half = build_model(tiny_model.config)
        half.load_state_dict(tiny_model.state_dict())
        half = half.to(torch.bfloat16).eval()
        logits = half(ids)
        state, stepped = half.init_state(2), []
        for t in range(ids.shape[1]):
            out, state = half.step(ids[:, t], state)
            stepped.append(out)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.05
    assert (torch.stack(stepped, 1) - reference).abs().max() < 0.05
