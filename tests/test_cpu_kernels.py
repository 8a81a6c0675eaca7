"""The compiled CPU kernels (ops/cpu_scan.c) against the references, and the clean fallback when they cannot build."""

import pytest
import torch
from test_ops import check_backend_matches_reference, scan_inputs

from mambabyte.config import MambaByteConfig
from mambabyte.mixer import MambaMixer
from mambabyte.model import MambaByteLM
from mambabyte.ops import cpu_kernels
from mambabyte.ops.dispatch import resolve_backend, selective_step_torch

needs_kernels = pytest.mark.skipif(not cpu_kernels.may_build(), reason="no C compiler here")


@pytest.fixture
def rebuilt_library():
    """Forget the loaded library before and after a test that changes how it is built."""
    cpu_kernels._library.cache_clear()
    yield
    cpu_kernels._library.cache_clear()


@needs_kernels
def test_kernels_build_where_a_compiler_exists():
    assert cpu_kernels.available()
    assert resolve_backend(None, torch.device("cpu")) == "cpu"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, d_inner, d_state, with_state, reset_rate", [
    (2, 150, 40, 16, True, 0.05),  # several checkpoint chunks, a partial one, and a partial channel block
    (1, 64, 16, 4, False, 0.0),  # exactly one chunk and one block
    (3, 7, 5, 3, True, 0.5),
    (2, 1, 33, 2, True, 0.0),
])
@pytest.mark.parametrize("parallel", [False, True])
def test_scan_matches_reference(monkeypatch, dtype, batch, length, d_inner, d_state, with_state, reset_rate, parallel):
    monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN_WORK", 1 if parallel else 1 << 60)
    inputs, reset = scan_inputs(batch, length, d_inner, d_state, dtype, seed=length + d_inner, with_state=with_state,
                                reset_rate=reset_rate)
    check_backend_matches_reference("cpu", inputs, reset, dtype)


@needs_kernels
def test_empty_sequence_keeps_the_initial_state():
    inputs, _ = scan_inputs(2, 0, 8, 4, torch.float32, seed=0)
    y, final = cpu_kernels.selective_scan_cpu(**inputs)
    assert y.shape == (2, 0, 8)
    torch.testing.assert_close(final, inputs["initial_state"])


@needs_kernels
def test_scan_step_matches_torch_step():
    inputs, _ = scan_inputs(3, 1, 21, 5, torch.float32, seed=3)
    args = [inputs[k][:, 0] if k in ("x", "dt", "B", "C", "z") else inputs[k]
            for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "initial_state")]
    y, state = cpu_kernels.selective_step_cpu(*args)
    y_ref, state_ref = selective_step_torch(*args)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("d_conv", [2, 4])
def test_fused_mixer_step_matches_plain_step(d_conv):
    torch.manual_seed(d_conv)
    mixer = MambaMixer(MambaByteConfig(d_model=24, n_layer=1, d_state=5, d_conv=d_conv))
    state = mixer.init_state(3)
    state = state._replace(conv=torch.randn_like(state.conv), ssm=torch.randn_like(state.ssm))
    for _ in range(3):
        hidden = torch.randn(3, 24)
        with torch.no_grad():
            assert cpu_kernels.mixer_step_applies(hidden, state.conv)
            out, fused_state = mixer.step(hidden, state)
        out_ref, state = mixer.step(hidden, state)  # autograd on: the plain PyTorch path
        torch.testing.assert_close(out, out_ref.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fused_state.conv, state.conv.detach())
        torch.testing.assert_close(fused_state.ssm, state.ssm.detach(), atol=1e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("batch", [1, 3, 9])  # 9: above BLOCK_STEP_MAX_BATCH, the per-op path with the fused mixer step
def test_fused_block_step_matches_plain_step(batch):
    torch.manual_seed(batch)
    block = MambaByteLM(MambaByteConfig(d_model=24, n_layer=1, d_state=5)).layers[0]
    state = block.mixer.init_state(batch)
    state = state._replace(conv=torch.randn_like(state.conv), ssm=torch.randn_like(state.ssm))
    for _ in range(3):
        hidden = torch.randn(batch, 24)
        with torch.no_grad():
            out, fused_state = block.step(hidden, state)
        out_ref, state = block.step(hidden, state)  # autograd on: the plain PyTorch path
        torch.testing.assert_close(out, out_ref.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fused_state.conv, state.conv.detach())
        torch.testing.assert_close(fused_state.ssm, state.ssm.detach(), atol=1e-5, rtol=1e-4)


@needs_kernels
def test_fused_steps_equal_forward():
    torch.manual_seed(0)
    model = MambaByteLM(MambaByteConfig(d_model=32, n_layer=2, d_state=8)).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        logits = model(ids)
        state = model.init_state(2)
        for t in range(ids.shape[1]):
            step_logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(step_logits, logits[:, t], atol=1e-4, rtol=1e-4)


def test_turned_off_falls_back_to_pure_pytorch(monkeypatch, rebuilt_library):
    monkeypatch.setenv("MAMBABYTE_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    assert resolve_backend(None, torch.device("cpu")) == "chunked"
    with torch.no_grad():
        assert not cpu_kernels.block_step_applies(torch.zeros(1, 4))


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path, rebuilt_library):
    monkeypatch.setenv("MAMBABYTE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="falling back to pure PyTorch"):
        assert not cpu_kernels.available()
    assert resolve_backend(None, torch.device("cpu")) == "chunked"
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-written library left behind
