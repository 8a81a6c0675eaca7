"""Interop with transformers' MambaForCausalLM, both directions, on the tiny preset (fp32, CPU)."""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mambabyte.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from mambabyte.cli import main  # noqa: E402
from mambabyte.errors import UserError  # noqa: E402
from mambabyte.hf import export_hf, import_hf  # noqa: E402

IDS = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(0))
MAX_ABS_DIFF = 1e-4


def random_hf_model(**config):
    """A transformers Mamba with every parameter random (not its initial values)."""
    torch.manual_seed(1)
    defaults = dict(vocab_size=256, hidden_size=24, state_size=6, num_hidden_layers=3, expand=2, conv_kernel=4)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**{**defaults, **config}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@torch.no_grad()
def hf_logits(model, ids):
    return model(ids, use_cache=False).logits.float()


@torch.no_grad()
def test_export_loads_in_transformers_with_same_logits(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == 256 and hf.dtype == torch.float32
    assert (hf_logits(hf, IDS) - tiny_model(IDS)).abs().max() < MAX_ABS_DIFF


@torch.no_grad()
def test_export_matches_transformers_generation_with_cache(tiny_model, tmp_path):
    """Their recurrent (cached) path on our weights follows our step() byte by byte."""
    hf = transformers.MambaForCausalLM.from_pretrained(export_hf(tiny_model, tmp_path / "hf")).eval()
    prompt = IDS[:1, :5]
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    state = tiny_model.init_state(1)
    out = prompt[0].tolist()
    for byte in out:
        logits, state = tiny_model.step(torch.tensor([byte]), state)
    for _ in range(8):
        out.append(int(logits.argmax()))
        logits, state = tiny_model.step(torch.tensor([out[-1]]), state)
    assert theirs[0].tolist() == out


@pytest.mark.parametrize("config", [{}, {"use_conv_bias": False, "time_step_rank": 3, "layer_norm_epsilon": 1e-6}])
@torch.no_grad()
def test_import_gives_same_logits_as_transformers(config, tmp_path):
    hf = random_hf_model(**config)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    ours = load_pretrained(tmp_path / "ckpt")
    assert (ours(IDS) - hf_logits(hf, IDS)).abs().max() < MAX_ABS_DIFF


@torch.no_grad()
def test_round_trip_keeps_every_weight(tiny_model, tmp_path):
    back = import_hf(export_hf(tiny_model, tmp_path / "hf"))
    assert back.config == tiny_model.config
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_import_refuses_other_vocab_sizes(tmp_path, capsys):
    random_hf_model(vocab_size=300).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' own progress output
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "vocab" in err
    assert not (tmp_path / "ckpt").exists()


def test_import_refuses_what_is_not_a_transformers_mamba(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "ours")  # our own format: no model_type
    for directory in (tmp_path / "ours", tmp_path / "missing"):
        with pytest.raises(UserError) as caught:
            import_hf(directory)
        assert "\n" not in str(caught.value)


def test_export_refuses_missing_checkpoint(tmp_path, capsys):
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "hf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_missing_transformers_is_a_user_error(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(UserError, match="transformers"):
        export_hf(tiny_model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hf_module_imports_transformers_lazily():
    code = "import sys, mambabyte.hf, mambabyte.cli; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_import_refuses_an_untied_head(tmp_path):
    random_hf_model(tie_word_embeddings=False).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="tied"):
        import_hf(tmp_path / "hf")
