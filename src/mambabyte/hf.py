"""Conversion between our MambaByte LM and Hugging Face transformers' ``MambaForCausalLM``.

Both are the same Mamba-1 network (pre-norm RMSNorm blocks, fp32 residual, tied byte head), so a
conversion only renames weights: ours ``embedding.weight``, ``layers.i.*``, ``norm_f.weight`` are
theirs ``backbone.embeddings.weight``, ``backbone.layers.i.*``, ``backbone.norm_f.weight``, and their
``lm_head.weight`` is tied to the embedding. transformers is optional: it is imported only here, when
a conversion runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mambabyte.checkpoint import WEIGHTS_FILE, atomic_directory
from mambabyte.config import MambaByteConfig
from mambabyte.errors import UserError
from mambabyte.model import MambaByteLM

HF_PREFIX = "backbone."
BYTE_VOCAB = 256


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face conversion needs transformers: pip install 'transformers>=4.46'") from None
    return transformers


def _hf_name(name: str) -> str:
    """Our parameter name -> the name in MambaForCausalLM."""
    if name == "embedding.weight":
        return HF_PREFIX + "embeddings.weight"
    return HF_PREFIX + name


def _our_name(hf_name: str) -> str | None:
    """A MambaForCausalLM parameter name -> ours (None for the tied lm_head)."""
    if hf_name == "lm_head.weight":
        return None
    name = hf_name.removeprefix(HF_PREFIX)
    return "embedding.weight" if name == "embeddings.weight" else name


def hf_config_from(config: MambaByteConfig):
    """The transformers ``MambaConfig`` describing the same network as ``config``."""
    transformers = _transformers()
    return transformers.MambaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        state_size=config.d_state,
        num_hidden_layers=config.n_layer,
        layer_norm_epsilon=config.norm_eps,
        expand=config.expand,
        conv_kernel=config.d_conv,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        residual_in_fp32=True,
        time_step_rank=config.dt_rank,
        time_step_min=config.dt_min,
        time_step_max=config.dt_max,
        time_step_floor=config.dt_init_floor,
        tie_word_embeddings=True,
        architectures=["MambaForCausalLM"],
    )


def config_from_hf(hf_config) -> MambaByteConfig:
    """Our config for a transformers ``MambaConfig``; a one-line refusal for what we cannot represent."""
    if hf_config.vocab_size != BYTE_VOCAB:
        raise UserError(f"only byte-level (vocab {BYTE_VOCAB}) Mamba models can be imported; "
                        f"this one has vocab_size {hf_config.vocab_size}")
    if hf_config.use_bias:
        raise UserError("cannot import a Mamba with biases in in_proj/out_proj (use_bias=true)")
    if hf_config.hidden_act != "silu":
        raise UserError(f"cannot import a Mamba with activation {hf_config.hidden_act!r} (only silu)")
    if hf_config.intermediate_size != hf_config.expand * hf_config.hidden_size:
        raise UserError("cannot import a Mamba whose intermediate_size is not expand * hidden_size")
    return MambaByteConfig(
        d_model=hf_config.hidden_size,
        n_layer=hf_config.num_hidden_layers,
        d_state=hf_config.state_size,
        expand=hf_config.expand,
        d_conv=hf_config.conv_kernel,
        vocab_size=hf_config.vocab_size,
        norm_eps=hf_config.layer_norm_epsilon,
        dt_rank=int(hf_config.time_step_rank),
        dt_min=hf_config.time_step_min,
        dt_max=hf_config.time_step_max,
        dt_init_floor=hf_config.time_step_floor,
    )


def export_hf(model: nn.Module, outdir: str | os.PathLike) -> Path:
    """Writes ``model`` as a transformers ``MambaForCausalLM`` directory (config.json + model.safetensors), atomically."""
    if not isinstance(model, MambaByteLM):
        raise UserError(f"only MambaByte models can be exported to transformers, not arch {model.config.arch!r}")
    hf_config = hf_config_from(model.config)
    weights = {_hf_name(name): t.detach().float().contiguous().cpu() for name, t in model.state_dict().items()}
    with atomic_directory(outdir) as staging:
        hf_config.save_pretrained(staging)
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(outdir)


def import_hf(hf_dir: str | os.PathLike) -> MambaByteLM:
    """A MambaByte LM (fp32, eval mode) with the weights of a transformers Mamba directory (vocab 256).

    Anything ``MambaForCausalLM.from_pretrained`` reads is accepted (safetensors or .bin, sharded, any dtype).
    """
    transformers = _transformers()
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read a transformers config in {hf_dir}: {str(error).splitlines()[0]}") from None
    if not isinstance(hf_config, transformers.MambaConfig):
        raise UserError(f"{hf_dir} holds a {hf_config.model_type!r} model, not a Mamba (model_type 'mamba')")
    config = config_from_hf(hf_config)
    try:
        hf_model = transformers.MambaForCausalLM.from_pretrained(hf_dir)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot load the Mamba weights in {hf_dir}: {str(error).splitlines()[0]}") from None
    hf_weights = hf_model.state_dict()
    if not torch.equal(hf_weights["lm_head.weight"], hf_weights[HF_PREFIX + "embeddings.weight"]):
        raise UserError("cannot import a Mamba whose lm_head is not tied to its embedding")
    weights = {_our_name(name): t for name, t in hf_weights.items() if _our_name(name) is not None}
    model = MambaByteLM(config)
    if not hf_config.use_conv_bias:  # no conv bias is the same as a zero one
        for i, layer in enumerate(model.layers):
            weights[f"layers.{i}.mixer.conv1d.bias"] = torch.zeros_like(layer.mixer.conv1d.bias)
    model.load_state_dict(weights)
    return model.eval()
