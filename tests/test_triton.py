"""The Triton kernels against the references, in Triton's CPU interpreter (tiny shapes: it is slow)."""

import functools
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels defined from here on run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_ops import GRAD_INPUTS, PER_POSITION, assert_close_scaled, run_scan, scan_inputs  # noqa: E402

from mambabyte.ops.causal_conv import causal_conv1d  # noqa: E402
from mambabyte.ops.dispatch import selective_step_torch  # noqa: E402
from mambabyte.ops.selective_scan import selective_scan_ref  # noqa: E402
from mambabyte.ops.triton_conv import causal_conv1d_triton  # noqa: E402
from mambabyte.ops.triton_scan import CONFIG, _segment_length, selective_scan_triton  # noqa: E402
from mambabyte.ops.triton_step import selective_step_triton  # noqa: E402

CASES = [  # (batch, length, d_inner, d_state): lengths around the interpreter's chunk of 8, channels past a tile of 4
    (2, 1, 3, 2),
    (1, 8, 4, 4),
    (2, 19, 6, 3),
]


def check_matches_reference(inputs, reset, dtype, scan=selective_scan_triton):
    """Outputs, final state and every gradient of the Triton scan against the sequential reference."""
    y, final, grads = run_scan(scan, inputs, reset)
    y_ref, final_ref, grads_ref = run_scan(selective_scan_ref, inputs, reset)
    assert y.dtype == inputs["x"].dtype and final.dtype == torch.float32
    assert_close_scaled(y, y_ref, dtype, "y")
    assert_close_scaled(final, final_ref, dtype, "final state")
    assert set(grads) == {k for k in GRAD_INPUTS if inputs[k] is not None}
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == inputs[name].dtype, f"gradient of {name}"
        assert_close_scaled(grad, grads_ref[name], dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize(("with_state", "reset_rate"), [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_scan_matches_reference(dtype, shape, with_state, reset_rate):
    batch, length, d_inner, d_state = shape
    inputs, reset = scan_inputs(batch, length, d_inner, d_state, dtype, seed=length + d_inner, with_state=with_state,
                                reset_rate=reset_rate)
    check_matches_reference(inputs, reset, dtype)


def test_scan_without_gate():
    inputs, _ = scan_inputs(2, 11, 5, 4, torch.float32, seed=7)
    check_matches_reference({**inputs, "z": None}, None, torch.float32)


def test_scan_reads_strided_views():
    """x and z as the two halves of one in_proj output, as the mixer passes them: no copy, same result."""
    inputs, _ = scan_inputs(2, 10, 5, 3, torch.float32, seed=9)
    xz = torch.cat([inputs["x"], inputs["z"]], dim=-1)
    x, z = xz.chunk(2, dim=-1)
    y, final = selective_scan_triton(**{**inputs, "x": x, "z": z})
    y_expected, final_expected = selective_scan_triton(**inputs)
    torch.testing.assert_close(y, y_expected)
    torch.testing.assert_close(final, final_expected)


def boundary_resets(batch, length, seg_len):
    """Documents starting exactly where segments start (row 0, also at position 0) or nowhere (row 1)."""
    reset = torch.zeros(batch, length, dtype=torch.bool)
    reset[0, ::seg_len] = True
    reset[1:] = False
    return reset


SEGMENTED_CASES = [  # (segments, dtype, with_state, resets): 13 positions cut 3 ways (7+6, 5+5+3, 4+4+4+1)
    (2, torch.float32, False, "none"),
    (3, torch.float32, True, "random"),
    (4, torch.float32, True, "boundaries"),
    (3, torch.bfloat16, True, "boundaries"),
    (4, torch.bfloat16, False, "random"),
]


@pytest.mark.parametrize(("segments", "dtype", "with_state", "resets"), SEGMENTED_CASES)
def test_segmented_scan_matches_reference(segments, dtype, with_state, resets):
    """Sequence segments run in parallel and joined by their carries: outputs, final state, every gradient."""
    inputs, reset = scan_inputs(2, 13, 6, 3, dtype, seed=segments, with_state=with_state,
                                reset_rate=0.2 if resets == "random" else 0.0)
    if resets == "boundaries":
        reset = boundary_resets(2, 13, -(-13 // segments))
    check_matches_reference(inputs, reset, dtype, functools.partial(selective_scan_triton, segments=segments))


@pytest.mark.parametrize(("segments", "dtype", "with_gate"), [(1, torch.float32, True), (3, torch.float32, False),
                                                         (4, torch.bfloat16, True)])
def test_backward_over_chunk_and_segment_edges_matches_reference(segments, dtype, with_gate):
    """The backward's walks load each next position early: every gradient over chunk and segment edges
    (19 positions, chunks of 8), with resets and an initial state."""
    inputs, reset = scan_inputs(2, 19, 6, 3, dtype, seed=5 + segments, with_state=True, reset_rate=0.2)
    inputs = inputs if with_gate else {**inputs, "z": None}
    check_matches_reference(inputs, reset, dtype, functools.partial(selective_scan_triton, segments=segments))


def test_bf16_inputs_with_fp32_saved_states_match_reference(monkeypatch):
    """CONFIG["bf16_states"] off: bf16 training keeps fp32 chunk states (more memory, the session-2 layout)."""
    monkeypatch.setitem(CONFIG, "bf16_states", False)
    inputs, reset = scan_inputs(2, 19, 6, 3, torch.bfloat16, seed=17, with_state=True, reset_rate=0.2)
    check_matches_reference(inputs, reset, torch.bfloat16, functools.partial(selective_scan_triton, segments=2))


def test_segmented_scan_reads_strided_views():
    """x and z as halves of one (batch, length, 2 * d_inner) tensor; segments longer than a chunk of states."""
    def scan_strided(x, z, **rest):
        x_view, z_view = torch.cat([x, z], dim=-1).chunk(2, dim=-1)
        assert x_view.stride() == (x.shape[1] * 2 * x.shape[2], 2 * x.shape[2], 1)
        return selective_scan_triton(x_view, z=z_view, segments=2, **rest)

    inputs, reset = scan_inputs(1, 35, 5, 4, torch.float32, seed=11, reset_rate=0.1)
    check_matches_reference(inputs, reset, torch.float32, scan_strided)


def test_segmented_scan_without_grad():
    """The prefill path: no autograd, nothing saved."""
    inputs, reset = scan_inputs(2, 13, 6, 3, torch.float32, seed=3, reset_rate=0.2)
    with torch.no_grad():
        y, final = selective_scan_triton(**inputs, reset=reset, segments=4)
    y_ref, final_ref = selective_scan_ref(**inputs, reset=reset)
    assert_close_scaled(y, y_ref, torch.float32, "y")
    assert_close_scaled(final, final_ref, torch.float32, "final state")


@pytest.mark.parametrize("length", [100, 511, 512, 5000, 8192])
@pytest.mark.parametrize("programs", [48, 192, 5000])
def test_segment_policy(length, programs):
    """Segments only when the GPU is short of programs, never shorter than min_segment, whole chunks."""
    multiprocessors, block_t = 132, 16
    wanted = CONFIG["segment_programs_per_sm"] * multiprocessors
    seg_len = _segment_length(length, programs, multiprocessors, block_t)
    n_segs = -(-length // seg_len)
    if programs >= wanted or length < 2 * CONFIG["min_segment"]:
        assert seg_len == length
    else:
        assert n_segs > 1 and seg_len % block_t == 0 and seg_len >= CONFIG["min_segment"]
        assert programs * n_segs >= wanted or length // (2 * n_segs) < CONFIG["min_segment"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_torch_step(dtype):
    inputs, _ = scan_inputs(3, 1, 6, 3, dtype, seed=4)
    per_t = {n: inputs[n][:, 0] for n in PER_POSITION}
    args = dict(A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"], state=inputs["initial_state"], **per_t)
    y, state = selective_step_triton(**args)
    y_expected, state_expected = selective_step_torch(**args)
    assert y.dtype == dtype and state.dtype == torch.float32
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y.float(), y_expected.float(), **tolerance)
    torch.testing.assert_close(state, state_expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 2, 19])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_conv_matches_reference(dtype, length, with_state, with_reset):
    """Output, carried window and the gradients of x, weight, bias and the incoming window."""
    g = torch.Generator().manual_seed(length)
    batch, channels, kernel = 2, 6, 4
    leaves = {
        "x": torch.randn(batch, length, channels, generator=g).to(dtype),
        "weight": torch.randn(channels, 1, kernel, generator=g),
        "bias": torch.randn(channels, generator=g),
        "conv_state": torch.randn(batch, channels, kernel - 1, generator=g).to(dtype) if with_state else None,
    }
    reset = torch.rand(batch, length, generator=g) < 0.3 if with_reset else None
    results = []
    for conv in (causal_conv1d_triton, causal_conv1d):
        inputs = {k: None if v is None else v.clone().requires_grad_() for k, v in leaves.items()}
        out, window = conv(**inputs, reset=reset)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        ((out.float() * weights).sum() + window.float().square().sum()).backward()
        results.append((out, window, {k: v.grad for k, v in inputs.items() if v is not None}))
    (out, window, grads), (out_ref, window_ref, grads_ref) = results
    assert out.dtype == dtype and window.dtype == dtype
    assert_close_scaled(out, out_ref, dtype, "out")
    assert_close_scaled(window, window_ref, dtype, "window")
    for name, grad in grads.items():
        assert_close_scaled(grad, grads_ref[name], dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recording", [False, True])
def test_conv_with_silu_matches_reference(dtype, recording):
    """silu=True: SiLU fused into the kernel when no gradient is recorded, applied after it otherwise."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 19, 6, generator=g).to(dtype)
    weight, bias = torch.randn(6, 1, 4, generator=g), torch.randn(6, generator=g)
    state = torch.randn(2, 6, 3, generator=g).to(dtype)
    reset = torch.rand(2, 19, generator=g) < 0.3
    with torch.set_grad_enabled(recording):
        out, window = causal_conv1d_triton(x.requires_grad_(recording), weight, bias, state, reset, silu=True)
    out_ref, window_ref = causal_conv1d(x.detach(), weight, bias, state, reset, silu=True)
    assert out.requires_grad == recording
    assert_close_scaled(out, out_ref, dtype, "out")
    assert torch.equal(window, window_ref)
