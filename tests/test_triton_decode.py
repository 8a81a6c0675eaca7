"""The fused block kernels of ops.triton_decode against the PyTorch block, in Triton's CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels defined from here on run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mambabyte.mixer import LayerState  # noqa: E402
from mambabyte.ops import triton_decode  # noqa: E402


def block_weights(block):
    m = block.mixer
    return (block.norm.weight, block.norm.eps, m.in_proj.weight, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight,
            m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D, m.out_proj.weight)


def random_state(block, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    empty = block.mixer.init_state(batch, dtype=dtype)
    return LayerState(torch.randn(empty.conv.shape, generator=g).to(dtype), torch.randn(empty.ssm.shape, generator=g))


@pytest.fixture
def block(tiny_model):
    return tiny_model.layers[1]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, span", [(1, 1), (3, 5)])
def test_block_span_matches_the_pytorch_block(block, dtype, batch, span):
    block = block.to(dtype)
    state = random_state(block, batch, dtype)
    hidden = torch.randn(batch, span, block.norm.weight.shape[0], generator=torch.Generator().manual_seed(1))
    expected, expected_states = block.forward_states(hidden, state)  # CPU tensors: the PyTorch path
    out, conv, ssm = triton_decode.block_span(hidden, *block_weights(block), state.conv, state.ssm, keep_states=True)
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == torch.float32 and conv.dtype == dtype and ssm.dtype == torch.float32
    assert (out - expected).abs().max() < tolerance * (1 + expected.abs().max())
    assert (ssm - expected_states.ssm).abs().max() < tolerance * (1 + expected_states.ssm.abs().max())
    torch.testing.assert_close(conv, expected_states.conv, atol=tolerance, rtol=tolerance)
    last, conv_last, ssm_last = triton_decode.block_span(hidden, *block_weights(block), state.conv, state.ssm)
    assert torch.equal(last, out) and torch.equal(conv_last, conv[:, -1]) and torch.equal(ssm_last, ssm[:, -1])


@torch.no_grad()
def test_span_equals_its_steps(block):
    state = random_state(block, 2, torch.float32, seed=3)
    hidden = torch.randn(2, 6, block.norm.weight.shape[0], generator=torch.Generator().manual_seed(4))
    span_out, conv, ssm = triton_decode.block_span(hidden, *block_weights(block), state.conv, state.ssm)
    outs = []
    for t in range(hidden.shape[1]):
        out, conv_t, ssm_t = triton_decode.block_span(hidden[:, t:t + 1], *block_weights(block), state.conv, state.ssm)
        state = LayerState(conv_t, ssm_t)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), span_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.ssm, ssm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.conv, conv)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_linear_is_the_head(tiny_model, dtype):
    model = tiny_model.to(dtype)
    hidden = torch.randn(3, 7, model.config.d_model, generator=torch.Generator().manual_seed(5))
    out = triton_decode.norm_linear(hidden, model.norm_f.weight, model.norm_f.eps, model.embedding.weight)
    expected = model.head(hidden).float()  # CPU tensors: the PyTorch head
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < tolerance * (1 + expected.abs().max())


@torch.no_grad()
def test_in_place_writes_the_next_state_over_the_current_one(block):
    state = random_state(block, 2, torch.float32, seed=6)
    hidden = torch.randn(2, 1, block.norm.weight.shape[0], generator=torch.Generator().manual_seed(7))
    expected = triton_decode.block_span(hidden, *block_weights(block), state.conv, state.ssm)
    out, conv, ssm = triton_decode.block_span(hidden, *block_weights(block), state.conv, state.ssm, in_place=True)
    assert conv is state.conv and ssm is state.ssm
    for got, want in zip((out, conv, ssm), expected):
        assert torch.equal(got, want)
