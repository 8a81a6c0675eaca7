"""The byte Transformer and MegaByte baselines: the model contract, causality, sizes, FLOPs, checkpoints."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_map

from mambabyte.architectures import build_model
from mambabyte.baselines import MegaByteConfig, TransformerConfig
from mambabyte.checkpoint import load_pretrained, save_pretrained
from mambabyte.config import preset
from mambabyte.errors import UserError

BASELINES = ["transformer", "megabyte"]
LENGTH = 11  # crosses two MegaByte patch boundaries of the tiny preset (P = 4) and ends inside a patch


def random_ids(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturbed_model(arch):
    """The tiny preset with every parameter moved off its initial value, so a dropped weight changes the logits."""
    torch.manual_seed(0)
    model = build_model(preset("tiny", arch))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def assert_same_state(a, b):
    assert tree_map(lambda t: t.shape, a) == tree_map(lambda t: t.shape, b)
    tree_map(lambda x, y: torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5), a, b)


@pytest.fixture(params=BASELINES)
def model(request):
    return perturbed_model(request.param)


@torch.no_grad()
def test_step_equals_forward(model):
    ids = random_ids(2, LENGTH)
    logits, final = model(ids, return_state=True)
    state = model.init_state(2)
    for t in range(LENGTH):
        step_logits, state = model.step(ids[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
    assert_same_state(state, final)


@torch.no_grad()
@pytest.mark.parametrize("split", [0, 1, 3, 4, 5, 8, 10, LENGTH])
def test_split_forward_with_state_equals_whole(model, split):
    ids = random_ids(2, LENGTH, seed=1)
    whole, final = model(ids, return_state=True)
    head, state = model(ids[:, :split], state=model.init_state(2), return_state=True)
    tail, state = model(ids[:, split:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), whole, atol=1e-5, rtol=1e-5)
    assert_same_state(state, final)


@torch.no_grad()
def test_forward_after_steps_continues(model):
    """A state built by step() serves forward() too, and the reverse."""
    ids = random_ids(1, LENGTH, seed=2)
    whole = model(ids)
    state = model.init_state(1)
    for t in range(6):
        _, state = model.step(ids[:, t], state)
    tail, state = model(ids[:, 6:9], state=state, return_state=True)
    torch.testing.assert_close(tail, whole[:, 6:9], atol=1e-5, rtol=1e-5)
    for t in range(9, LENGTH):
        logits, state = model.step(ids[:, t], state)
        torch.testing.assert_close(logits, whole[:, t], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_changing_a_future_byte_never_changes_past_logits(model):
    ids = random_ids(1, 16, seed=3)
    logits = model(ids)
    for t in range(16):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 256
        changed_logits = model(changed)
        torch.testing.assert_close(changed_logits[:, :t], logits[:, :t], atol=0, rtol=0)
        assert not torch.allclose(changed_logits[:, t:], logits[:, t:])  # the byte itself does matter


@torch.no_grad()
def test_batch_rows_are_independent(model):
    ids = random_ids(3, LENGTH, seed=4)
    batched, state = model(ids, return_state=True)
    alone, row_state = model(ids[1:2], return_state=True)
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)
    assert_same_state(tree_map(lambda t: t[1:2], state), row_state)


def test_training_step_reaches_every_parameter(model):
    ids = random_ids(2, LENGTH + 1, seed=5)
    logits = model.train()(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_megabyte_refuses_resets_in_one_line():
    model = perturbed_model("megabyte")
    ids = random_ids(1, 4)
    reset = torch.zeros(1, 4, dtype=torch.bool)
    reset[0, 2] = True
    with pytest.raises(UserError, match="cannot start a document inside a row"):
        model(ids, reset=reset)
    model(ids, reset=None)


@torch.no_grad()
def test_transformer_reset_equals_running_the_documents_alone():
    model = perturbed_model("transformer")
    first, second = random_ids(1, 5, seed=6), random_ids(1, 7, seed=7)
    alone = model(second)
    reset = torch.zeros(1, 12, dtype=torch.bool)
    reset[0, 5] = True
    packed = model(torch.cat([first, second], dim=1), reset=reset)
    torch.testing.assert_close(packed[:, 5:], alone, atol=1e-5, rtol=1e-5)
    # the same with the reset inside a continued forward, then steps after it
    _, state = model(first, return_state=True)
    head, state = model(second[:, :3], state=state, return_state=True, reset=reset[:, 5:8])
    torch.testing.assert_close(head, alone[:, :3], atol=1e-5, rtol=1e-5)
    for t in range(3, 7):
        logits, state = model.step(second[:, t], state)
        torch.testing.assert_close(logits, alone[:, t], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_transformer_left_padded_rows_equal_rows_alone():
    """Batched prompts of different lengths, as the generator reads them: padding never reaches a row."""
    model = perturbed_model("transformer")
    rows = [random_ids(1, 9, seed=8), random_ids(1, 4, seed=9)]
    padded = torch.cat([rows[0], torch.cat([torch.zeros(1, 5, dtype=torch.long), rows[1]], dim=1)])
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, 0] = reset[1, 5] = True
    logits, state = model(padded, reset=reset, return_state=True)
    next_bytes = torch.tensor([3, 4])
    step_logits, _ = model.step(next_bytes, state)
    for row, ids in enumerate(rows):
        alone, row_state = model(ids, return_state=True)
        torch.testing.assert_close(logits[row, -ids.shape[1]:], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_logits[row], model.step(next_bytes[row:row + 1], row_state)[0][0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", BASELINES)
@pytest.mark.parametrize("name", ["tiny", "small", "bench-91m"])
def test_presets_match_mambabyte_parameter_count(arch, name):
    with torch.device("meta"):
        reference = build_model(preset(name)).num_parameters()
        count = build_model(preset(name, arch)).num_parameters()
    assert abs(count / reference - 1) < 0.15


def test_unknown_preset_and_arch_are_user_errors():
    with pytest.raises(UserError, match="unknown megabyte preset"):
        preset("huge", "megabyte")
    with pytest.raises(UserError, match="unknown architecture"):
        preset("tiny", "rnn")
    with pytest.raises(UserError, match="patch_size"):
        MegaByteConfig(patch_size=3, d_global=32)
    with pytest.raises(UserError, match="heads"):
        TransformerConfig(d_model=30, n_head=4)


@pytest.mark.parametrize("arch", BASELINES)
def test_checkpoint_round_trip(tmp_path, arch):
    model = perturbed_model(arch)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and type(loaded) is type(model)
    ids = random_ids(1, LENGTH)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_transformer_flops_per_byte_by_hand():
    c = TransformerConfig(d_model=8, n_layer=2, n_head=2, d_ff=16, vocab_size=256, context_length=7)
    with torch.device("meta"):
        model = build_model(c)
    qkv, out, gate_up, down = 8 * 24, 8 * 8, 8 * 32, 16 * 8
    attention = 2 * 2 * 8 * 4  # QK^T and AV: d_model multiply-adds per key, (7 + 1) / 2 keys on average
    per_layer = 2 * (qkv + out + gate_up + down) + attention
    assert model.flops_per_byte() == 2 * per_layer + 2 * 8 * 256
    assert model.flops_per_byte(context_length=15) - model.flops_per_byte() == 2 * 2 * 2 * 8 * 4


def test_megabyte_flops_per_byte_by_hand():
    c = MegaByteConfig(patch_size=4, d_global=16, n_layer_global=1, n_head_global=2, d_local=8, n_layer_local=1,
                       n_head_local=2, d_ff_global=32, d_ff_local=16, context_length=28)
    with torch.device("meta"):
        model = build_model(c)
    global_matmuls = 2 * (16 * 48 + 16 * 16 + 16 * 64 + 32 * 16)
    global_attention = 2 * 2 * 16 * 4  # 7 patches: (7 + 1) / 2 patches attended on average
    to_local = 2 * 4 * 4 * 8  # P slices of 16 / 4 = 4 values projected to 8
    local = 2 * (8 * 24 + 8 * 8 + 8 * 32 + 16 * 8) + 2 * 2 * 8 * 2.5  # (4 + 1) / 2 bytes attended on average
    expected = (global_matmuls + global_attention + to_local) / 4 + local + 2 * 8 * 256
    assert model.flops_per_byte() == round(expected)


def test_transformer_state_grows_with_context_megabyte_per_patch():
    transformer, megabyte = perturbed_model("transformer"), perturbed_model("megabyte")
    with torch.no_grad():
        _, state = transformer(random_ids(1, 9), return_state=True)
        assert state.caches[0].keys.shape[2] == 9
        _, state = megabyte(random_ids(1, 9), return_state=True)
    assert state.global_cache[0].keys.shape[2] == 3 and state.local_cache[0].keys.shape[2] == 1


def test_compare_benchmark_tiny_smoke(tmp_path):
    """benchmarks/compare.py --tiny trains all three with the library trainer and writes its table and plot."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare_benchmark", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    results = compare.main(["--tiny", "--out", str(tmp_path)])
    assert [r["arch"] for r in results] == ["mambabyte", "transformer", "megabyte"]
    budget = 5e8
    for r in results:
        assert budget <= r["train_flops"] < 1.5 * budget  # compute-matched: the budget, rounded up to whole steps
        assert 0 < r["held_out_bpb"]["sliding_window"] < 8.5 and 0 < r["held_out_bpb"]["state_carried"] < 8.5
        assert len(r["curve"]) >= 2 and all(g["bytes_per_second"] > 0 for g in r["generation"])
    transformer_state = [g["state_mb"] for g in results[1]["generation"]]
    mamba_state = [g["state_mb"] for g in results[0]["generation"]]
    assert transformer_state[1] > transformer_state[0] and mamba_state[1] == mamba_state[0]  # KV cache vs fixed state
    table = (tmp_path / "compare.md").read_text()
    assert table.count("\n| ") == 4  # header + 3 rows
    assert (tmp_path / "compare.png").stat().st_size > 0 and (tmp_path / "compare.json").exists()
