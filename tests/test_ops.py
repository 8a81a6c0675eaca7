"""Every scan backend against the sequential reference (forward, final state, all gradients); conv and steps."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mambabyte.ops import SCAN_BACKENDS, causal_conv1d, causal_conv1d_step, selective_scan, selective_step
from mambabyte.ops.selective_scan import selective_scan_ref

FAST_BACKENDS = sorted(name for name in SCAN_BACKENDS if name != "reference")
GRAD_INPUTS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "initial_state")
# (atol, rtol) of outputs and gradients, relative to each tensor's scale
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2)}


def scan_inputs(batch, length, d_inner, d_state, dtype, seed, with_state=True, reset_rate=0.0):
    """Random scan inputs with realistic magnitudes; the activations in ``dtype``, A/D/dt_bias/state in fp32."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    inputs = {
        "x": randn(batch, length, d_inner).to(dtype),
        "dt": (0.5 * randn(batch, length, d_inner)).to(dtype),
        "A": -torch.exp(torch.log(torch.arange(1.0, d_state + 1)) + 0.3 * randn(d_inner, d_state)),
        "B": randn(batch, length, d_state).to(dtype),
        "C": randn(batch, length, d_state).to(dtype),
        "D": 1 + 0.1 * randn(d_inner),
        "dt_bias": -2 + 0.5 * randn(d_inner),
        "z": randn(batch, length, d_inner).to(dtype),
        "initial_state": randn(batch, d_inner, d_state) if with_state else None,
    }
    reset = torch.rand(batch, length, generator=g) < reset_rate if reset_rate else None
    return inputs, reset


PER_POSITION = ("x", "dt", "B", "C", "z")


def time_slice(inputs, start, end, initial_state):
    """The scan inputs of positions [start, end), starting from ``initial_state``."""
    sliced = {n: v[:, start:end] if n in PER_POSITION else v for n, v in inputs.items()}
    return {**sliced, "initial_state": initial_state}


def run_scan(scan, inputs, reset, seed=0):
    """Outputs, final state and the gradients of all inputs for a loss touching both outputs."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, final = scan(**{k: leaves.get(k) for k in inputs}, reset=reset)
    g = torch.Generator().manual_seed(seed + 1)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (final * torch.randn(final.shape, generator=g)).sum()
    loss.backward()
    return y, final, {k: v.grad for k, v in leaves.items()}


def assert_close_scaled(actual, expected, dtype, name):
    atol, rtol = TOLERANCE[dtype]
    scale = expected.float().abs().max().item() or 1.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


def check_backend_matches_reference(backend, inputs, reset, dtype):
    y, final, grads = run_scan(SCAN_BACKENDS[backend], inputs, reset)
    y_ref, final_ref, grads_ref = run_scan(selective_scan_ref, inputs, reset)
    assert y.dtype == inputs["x"].dtype and final.dtype == torch.float32
    assert_close_scaled(y, y_ref, dtype, "y")
    assert_close_scaled(final, final_ref, dtype, "final state")
    assert set(grads) == {k for k in GRAD_INPUTS if inputs[k] is not None}
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert_close_scaled(grad, grads_ref[name], dtype, f"grad {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(batch=st.integers(1, 3), length=st.integers(1, 70), d_inner=st.integers(1, 9), d_state=st.integers(1, 6),
       with_state=st.booleans(), reset_rate=st.sampled_from([0.0, 0.1, 0.5]), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_backend_matches_reference_fp32(backend, batch, length, d_inner, d_state, with_state, reset_rate, seed):
    inputs, reset = scan_inputs(batch, length, d_inner, d_state, torch.float32, seed, with_state, reset_rate)
    check_backend_matches_reference(backend, inputs, reset, torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(batch=st.integers(1, 2), length=st.integers(1, 50), d_inner=st.integers(1, 8), d_state=st.integers(1, 4),
       with_state=st.booleans(), reset_rate=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_backend_matches_reference_bf16(backend, batch, length, d_inner, d_state, with_state, reset_rate, seed):
    inputs, reset = scan_inputs(batch, length, d_inner, d_state, torch.bfloat16, seed, with_state, reset_rate)
    check_backend_matches_reference(backend, inputs, reset, torch.bfloat16)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 3, 17, 64, 129])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_backend_edge_lengths(backend, length, with_state, with_reset):
    """Length 1, odd lengths and lengths around the chunk size, explicitly (hypothesis may not draw them)."""
    inputs, reset = scan_inputs(2, length, 5, 3, torch.float32, seed=length, with_state=with_state,
                                reset_rate=0.3 if with_reset else 0.0)
    check_backend_matches_reference(backend, inputs, reset, torch.float32)


@pytest.mark.parametrize("backend", sorted(SCAN_BACKENDS))
def test_reset_equals_separate_documents(backend):
    """A reset at position k: positions >= k see only a zero state, whatever the initial state was."""
    inputs, _ = scan_inputs(2, 23, 6, 4, torch.float32, seed=3)
    k = 9
    reset = torch.zeros(2, 23, dtype=torch.bool)
    reset[:, k] = True
    y, final = selective_scan(**inputs, reset=reset, backend=backend)
    y1, _ = selective_scan(**time_slice(inputs, 0, k, inputs["initial_state"]), backend=backend)
    y2, final2 = selective_scan(**time_slice(inputs, k, None, None), backend=backend)
    torch.testing.assert_close(y, torch.cat([y1, y2], dim=1))
    torch.testing.assert_close(final, final2)


@pytest.mark.parametrize("backend", sorted(SCAN_BACKENDS))
def test_split_scan_carries_state(backend):
    inputs, _ = scan_inputs(2, 30, 4, 3, torch.float32, seed=5)
    y, final = selective_scan(**inputs, backend=backend)
    k = 13
    y1, state = selective_scan(**time_slice(inputs, 0, k, inputs["initial_state"]), backend=backend)
    y2, final2 = selective_scan(**time_slice(inputs, k, None, state), backend=backend)
    torch.testing.assert_close(y, torch.cat([y1, y2], dim=1))
    torch.testing.assert_close(final, final2)


def test_backend_choice(monkeypatch):
    from mambabyte.errors import UserError
    from mambabyte.ops.dispatch import resolve_backend

    monkeypatch.setenv("MAMBABYTE_SCAN", "reference")
    assert resolve_backend(None, torch.device("cpu")) == "reference"
    assert resolve_backend("chunked", torch.device("cpu")) == "chunked"
    monkeypatch.setenv("MAMBABYTE_SCAN", "nonsense")
    with pytest.raises(UserError):
        resolve_backend(None, torch.device("cpu"))


def test_selective_step_equals_scan():
    inputs, _ = scan_inputs(3, 11, 5, 4, torch.float32, seed=11)
    y, final = selective_scan_ref(**inputs)
    state = inputs["initial_state"]
    for t in range(11):
        per_t = {n: inputs[n][:, t] for n in PER_POSITION}
        y_t, state = selective_step(A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"], state=state, **per_t)
        torch.testing.assert_close(y_t, y[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)


def conv_inputs(batch=2, length=19, channels=5, kernel=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, channels, generator=g), torch.randn(channels, 1, kernel, generator=g),
            torch.randn(channels, generator=g))


def test_causal_conv_matches_torch_conv1d():
    x, weight, bias = conv_inputs()
    out, state = causal_conv1d(x, weight, bias)
    expected = F.conv1d(x.transpose(1, 2), weight, bias, padding=3, groups=5)[..., :19].transpose(1, 2)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


@pytest.mark.parametrize("split", [0, 1, 2, 7, 18, 19])
def test_causal_conv_carries_window(split):
    x, weight, bias = conv_inputs()
    out, state = causal_conv1d(x, weight, bias)
    out1, mid = causal_conv1d(x[:, :split], weight, bias)
    out2, state2 = causal_conv1d(x[:, split:], weight, bias, conv_state=mid)
    torch.testing.assert_close(torch.cat([out1, out2], dim=1), out)
    torch.testing.assert_close(state2, state)


def test_causal_conv_reset_equals_separate_documents():
    x, weight, bias = conv_inputs(batch=1, length=20)
    starts = [0, 2, 3, 11]  # a 2-byte, a 1-byte (shorter than the kernel) and longer documents
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, starts[1:]] = True
    carried = torch.randn(1, 5, 3)  # a window from before: the first document must still see it
    out, state = causal_conv1d(x, weight, bias, conv_state=carried, reset=reset)
    pieces = []
    for i, (start, end) in enumerate(zip(starts, starts[1:] + [20])):
        piece, piece_state = causal_conv1d(x[:, start:end], weight, bias, conv_state=carried if i == 0 else None)
        pieces.append(piece)
    torch.testing.assert_close(out, torch.cat(pieces, dim=1))
    torch.testing.assert_close(state, piece_state)


def test_causal_conv_reset_with_short_last_document():
    """A last document shorter than the window: the carried window holds zeros before it."""
    x, weight, bias = conv_inputs(batch=1, length=10)
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 9] = True
    _, state = causal_conv1d(x, weight, bias, reset=reset)
    _, expected = causal_conv1d(x[:, 9:], weight, bias)
    torch.testing.assert_close(state, expected)


def test_causal_conv_step_equals_forward():
    x, weight, bias = conv_inputs()
    carried = torch.randn(2, 5, 3)
    out, final = causal_conv1d(x, weight, bias, conv_state=carried)
    state = carried
    for t in range(x.shape[1]):
        out_t, state = causal_conv1d_step(x[:, t], weight, bias, state)
        torch.testing.assert_close(out_t, out[:, t])
    torch.testing.assert_close(state, final)
