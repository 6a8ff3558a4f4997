"""Hugging Face Llama checkpoints from and to flm parameter trees (``save_hf`` / ``load_hf``).

flm's default Transformer (pre-norm RMSNorm, SwiGLU, RoPE, no biases, multi-head attention) is
the Llama architecture, so a parameter tree maps one-to-one onto a ``transformers`` Llama
state dict. One difference is in the layout, not the maths: flm's RoPE rotates *interleaved*
pairs ``(x_{2k}, x_{2k+1})`` of each head (Su et al. 2021, eq. 34; handout §3.5.3), while HF Llama
rotates *halves* ``(x_k, x_{k+d/2})`` (``rotate_half``), both with frequency ``θ^{-2k/d}``.
Permuting each head's rows of ``W_q`` and ``W_k`` by ``P = [0, 2, …, d-2, 1, 3, …, d-1]`` turns one
into the other: ``rope_half(P q) = P rope_pairs(q)``, and since ``(P q)·(P k) = q·k`` the attention
scores, hence the whole model, are unchanged. ``save_hf`` applies ``P``, ``load_hf`` its inverse.

Sources: Hugging Face ``transformers`` Llama modeling docs (``LlamaConfig``, ``LlamaForCausalLM``,
checkpoint key names); Su et al. (2021) RoFormer; CS336 assignment 1 handout §3.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flm._io import atomic_write_bytes, atomic_write_json
from flm.interop.tokenizer import read_json as _read_json
from flm.interop.tokenizer import save_hf_tokenizer
from flm.model import TransformerConfig
from flm.tokenizer.tokenizer import Tokenizer
from flm.tree import flatten, unflatten

__all__ = [
    "config_from_hf",
    "from_hf_state_dict",
    "hf_config",
    "load_hf",
    "rope_permutation",
    "save_hf",
    "to_hf_state_dict",
]

Params = dict[str, Any]

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
_SAFETENSORS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# flm -> HF per-layer names (weights are (d_out, d_in) on both sides).
_LAYER_KEYS = {
    "ln1.weight": "input_layernorm.weight", "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight", "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight", "ln2.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w2.weight": "mlp.down_proj.weight",  # w1 = gate, w2 = down
    "ffn.w3.weight": "mlp.up_proj.weight",  # w3 = up
}  # fmt: skip
_ROTATED = ("attn.q_proj.weight", "attn.k_proj.weight")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _check_expressible(config: TransformerConfig) -> None:
    for field, wanted in (("norm", "pre"), ("ffn", "swiglu"), ("position", "rope")):
        value = getattr(config, field)
        if value != wanted:
            raise ValueError(f"Hugging Face Llama cannot express {field}={value!r} (only {field}={wanted!r})")


def hf_config(
    config: TransformerConfig, *, dtype: torch.dtype = torch.float32, tokenizer: Tokenizer | None = None
) -> dict:
    """Return the ``config.json`` dict of the ``LlamaForCausalLM`` that computes what ``config`` does.

    Args:
        config: an flm config with ``norm="pre"``, ``ffn="swiglu"``, ``position="rope"``.
        dtype: the stored weights' dtype (``torch_dtype`` field).
        tokenizer: when it has ``<|endoftext|>``, that id becomes ``bos_token_id`` and
            ``eos_token_id``; otherwise both are ``null`` (so ``generate`` never stops early on
            LlamaConfig's defaults 1 and 2).

    Returns:
        A JSON-serialisable dict of LlamaConfig fields (``num_key_value_heads = num_heads``,
        ``max_position_embeddings = context_length``, no biases, ``hidden_act="silu"``).

    Raises:
        ValueError: a variant Llama cannot express (the message names the field and value), or
            an unsupported ``dtype``.

    Source: HF ``LlamaConfig`` docs; handout §3.6.
    """
    _check_expressible(config)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"hf_config: dtype must be one of {sorted(_DTYPE_NAMES.values())}, got {dtype}")
    eos = tokenizer.eos_id if tokenizer is not None else None
    theta = float(config.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads, "head_dim": config.d_head,
        "max_position_embeddings": config.context_length,
        # v4 reads rope_theta/rope_scaling, v5 rope_parameters.
        "rope_theta": theta, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rms_norm_eps": float(config.eps), "tie_word_embeddings": bool(config.tie_embeddings),
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": None, "torch_dtype": _DTYPE_NAMES[dtype],
    }  # fmt: skip


def _get(hf: Mapping[str, Any], key: str, default: Any = ..., types: tuple = (int,)) -> Any:
    value = hf.get(key, default)
    if value is ...:
        raise ValueError(f"Hugging Face config: required field {key!r} is missing")
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        raise ValueError(f"Hugging Face config: {key}={value!r} has the wrong type (expected {types[0].__name__})")
    return value


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE base from a v4 (``rope_theta``/``rope_scaling``) or v5 (``rope_parameters``) config; errors on scaling."""
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        raise ValueError(f"Hugging Face config: rope_scaling={scaling!r} is not supported (flm's RoPE is unscaled)")
    theta = hf.get("rope_theta", 10000.0)
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ValueError(
                f"Hugging Face config: rope_parameters={params!r} is not supported (one plain RoPE expected)"
            )
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"Hugging Face config: rope_parameters rope_type={kind!r} is not supported (only 'default')"
            )
        extra = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
        if extra or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"Hugging Face config: rope_parameters={params!r} is not supported (only rope_theta)")
        theta = params.get("rope_theta", theta)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"Hugging Face config: partial_rotary_factor={hf['partial_rotary_factor']!r} is not supported")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"Hugging Face config: rope_theta={theta!r} must be a positive number")
    return float(theta)


def config_from_hf(hf: Mapping[str, Any], *, attention: str = "auto") -> TransformerConfig:
    """Build the flm config of a Hugging Face Llama ``config.json`` dict.

    Missing optional fields take LlamaConfig's defaults (``rms_norm_eps=1e-6``,
    ``max_position_embeddings=2048``, ``rope_theta=10000``, untied embeddings).

    Args:
        hf: the parsed ``config.json``.
        attention: flm's attention implementation for the result (not stored by HF).

    Returns:
        The equivalent :class:`~flm.model.TransformerConfig` (pre-norm, SwiGLU, RoPE).

    Raises:
        ValueError: naming the field, for anything flm cannot compute: ``model_type`` not
            ``"llama"``, ``num_key_value_heads != num_attention_heads`` (grouped-query attention),
            ``head_dim != hidden_size / num_attention_heads``, ``attention_bias`` or ``mlp_bias``
            true, ``hidden_act`` not SiLU, ``rope_scaling`` or a non-default ``rope_parameters``,
            nonzero ``attention_dropout``, or a missing size field.

    Source: HF ``LlamaConfig`` docs.
    """
    if hf.get("model_type") != "llama":
        raise ValueError(f"Hugging Face config: model_type={hf.get('model_type')!r} is not supported (only 'llama')")
    archs = hf.get("architectures")
    if archs is not None and "LlamaForCausalLM" not in archs:
        raise ValueError(f"Hugging Face config: architectures={archs!r} is not supported (expected LlamaForCausalLM)")
    d_model = _get(hf, "hidden_size")
    heads = _get(hf, "num_attention_heads")
    kv = hf.get("num_key_value_heads")
    if kv is not None and kv != heads:
        raise ValueError(f"Hugging Face config: num_key_value_heads={kv!r} != num_attention_heads={heads} "
                         "(grouped-query attention is not supported)")  # fmt: skip
    head_dim = hf.get("head_dim")
    if head_dim is not None and heads > 0 and head_dim * heads != d_model:
        raise ValueError(
            f"Hugging Face config: head_dim={head_dim!r} != hidden_size/num_attention_heads={d_model}/{heads}"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise ValueError(f"Hugging Face config: {key}={hf[key]!r} is not supported (flm layers have no biases)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"Hugging Face config: hidden_act={act!r} is not supported (only 'silu')")
    if hf.get("attention_dropout", 0.0):
        raise ValueError(
            f"Hugging Face config: attention_dropout={hf['attention_dropout']!r} is not supported (flm has no dropout)"
        )
    return TransformerConfig(
        vocab_size=_get(hf, "vocab_size"), context_length=_get(hf, "max_position_embeddings", 2048),
        d_model=d_model, num_layers=_get(hf, "num_hidden_layers"), num_heads=heads,
        d_ff=_get(hf, "intermediate_size"), rope_theta=_rope_theta(hf),
        eps=float(_get(hf, "rms_norm_eps", 1e-6, (int, float))), norm="pre", ffn="swiglu", position="rope",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention=attention,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------


def rope_permutation(d_model: int, num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Row order that turns flm's interleaved-pair RoPE layout into HF's rotate-half layout.

    Within each head of size ``d``: rows ``0, 2, …, d-2`` then ``1, 3, …, d-1``, so that HF's pair
    ``(k, k + d/2)`` holds flm's pair ``(2k, 2k+1)``, rotated by the same angle ``pos·θ^{-2k/d}``.
    ``W_hf = W_flm[perm]`` for ``W_q`` and ``W_k``; ``W_flm = W_hf[argsort(perm)]``.

    Args:
        d_model: the projection's output width ``num_heads · d``.
        num_heads: number of heads; ``d = d_model / num_heads`` must be even.
        device: where to build the index.

    Returns:
        ``(d_model,)`` int64 permutation.

    Raises:
        ValueError: ``d_model`` not divisible by ``num_heads`` or an odd head dimension.

    Source: Su et al. (2021) eq. (34) (pairs); HF Llama ``rotate_half`` (halves); handout §3.5.3.
    """
    if num_heads <= 0 or d_model % num_heads or (d_model // num_heads) % 2:
        raise ValueError(f"rope_permutation: need an even head dimension, got d_model={d_model}, num_heads={num_heads}")
    d = d_model // num_heads
    within = torch.cat((torch.arange(0, d, 2, device=device), torch.arange(1, d, 2, device=device)))
    return (torch.arange(num_heads, device=device)[:, None] * d + within).flatten()


def _key_table(config: TransformerConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(flm key, HF key, shape)`` of every parameter, in HF's order."""
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    shapes = {"ln1": (d,), "ln2": (d,), "ffn.w1": (f, d), "ffn.w2": (d, f), "ffn.w3": (f, d)}
    table = [("token_embeddings.weight", "model.embed_tokens.weight", (v, d))]
    for i in range(config.num_layers):
        table += [
            (f"layers.{i}.{k}", f"model.layers.{i}.{hf}", shapes.get(k.removesuffix(".weight"), (d, d)))
            for k, hf in _LAYER_KEYS.items()
        ]
    table.append(("ln_final.weight", "model.norm.weight", (d,)))
    if not config.tie_embeddings:
        table.append(("lm_head.weight", "lm_head.weight", (v, d)))
    return table


def to_hf_state_dict(params: Params, config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Map an flm parameter tree to a ``LlamaForCausalLM`` state dict (RoPE rows permuted).

    Works on any tree of tensors shaped like the parameters (e.g. gradients). Tensors other than
    ``W_q``/``W_k`` are returned as they are (not copied); ``lm_head.weight`` is absent when tied.

    Args:
        params: the tree from :func:`flm.model.init_params` for ``config``.
        config: a Llama-expressible config (pre-norm, SwiGLU, RoPE).

    Returns:
        ``{HF key: tensor}`` (e.g. ``model.layers.0.self_attn.q_proj.weight``), in HF's order.

    Raises:
        ValueError: an inexpressible config, or a missing, extra or wrongly shaped parameter
            (the message names its flm key).

    Source: HF Llama checkpoint layout; handout §3.6 (flm's keys).
    """
    _check_expressible(config)
    flat, table = flatten(params), _key_table(config)
    extra = sorted(set(flat) - {row[0] for row in table})
    if extra:
        raise ValueError(f"to_hf_state_dict: parameters {extra} do not belong to this config")
    perm = rope_permutation(config.d_model, config.num_heads)
    out = {}
    for flm_key, hf_key, shape in table:
        t = _checked(flat, flm_key, shape, "to_hf_state_dict: parameter")
        out[hf_key] = t[perm.to(t.device)] if flm_key.endswith(_ROTATED) else t
    return out


def _checked(flat: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if key not in flat:
        raise ValueError(f"{what} {key!r} is missing")
    if tuple(flat[key].shape) != shape:
        raise ValueError(f"{what} {key!r} has shape {tuple(flat[key].shape)}, the config expects {shape}")
    return flat[key]


def from_hf_state_dict(state: Mapping[str, torch.Tensor], config: TransformerConfig) -> Params:
    """Map a ``LlamaForCausalLM`` state dict to an flm parameter tree; the inverse of :func:`to_hf_state_dict`.

    ``…rotary_emb.inv_freq`` buffers (older checkpoints) are ignored; with tied embeddings a
    stored ``lm_head.weight`` equal to the embedding is ignored.

    Args:
        state: ``{HF key: tensor}`` (parameters or gradients).
        config: the flm config (from :func:`config_from_hf`).

    Returns:
        The flm tree (``flm.unflatten`` of the mapped keys); ``W_q``/``W_k`` rows un-permuted.

    Raises:
        ValueError: a missing, unexpected or wrongly shaped tensor (named), or a stored
            ``lm_head.weight`` that differs from the tied embedding.

    Source: HF Llama checkpoint layout; handout §3.6.
    """
    table = _key_table(config)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings and "lm_head.weight" in state:
        head, emb = state.pop("lm_head.weight"), state.get("model.embed_tokens.weight")
        if emb is None or head.shape != emb.shape or not torch.equal(head, emb):
            raise ValueError(
                "from_hf_state_dict: tie_word_embeddings is true but lm_head.weight differs from the embedding"
            )
    extra = sorted(set(state) - {row[1] for row in table})
    if extra:
        raise ValueError(f"from_hf_state_dict: unexpected tensors {extra[:5]}{' …' if len(extra) > 5 else ''}")
    inv = torch.argsort(rope_permutation(config.d_model, config.num_heads))
    flat = {}
    for flm_key, hf_key, shape in table:
        t = _checked(state, hf_key, shape, "from_hf_state_dict: tensor")
        flat[flm_key] = t[inv.to(t.device)] if flm_key.endswith(_ROTATED) else t
    return unflatten(flat)


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------


def save_hf(
    params: Params, config: TransformerConfig, out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None,
    *, dtype: torch.dtype | None = None,
) -> Path:  # fmt: skip
    """Write a directory that ``transformers.LlamaForCausalLM.from_pretrained`` loads as the same model.

    Writes ``config.json`` (:func:`hf_config`) and ``model.safetensors`` (:func:`to_hf_state_dict`,
    ``lm_head.weight`` omitted when tied, as HF expects), and with a tokenizer also
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    (:func:`save_hf_tokenizer`). Each file is written atomically.

    Args:
        params: the tree from :func:`flm.model.init_params` (any device).
        config: its config; must be pre-norm, SwiGLU, RoPE.
        out_dir: the directory (created if missing).
        tokenizer: optional flm tokenizer to export alongside.
        dtype: stored dtype (float32, float16, bfloat16, float64); default the parameters'
            dtype, which must then be the same for all of them.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: an inexpressible variant (names ``norm``/``ffn``/``position`` and its value),
            mixed parameter dtypes without ``dtype``, an unsupported dtype, a parameter that does
            not fit the config, or a tokenizer whose vocabulary exceeds ``config.vocab_size``.

    Source: HF Llama modeling docs (checkpoint layout); Su et al. (2021) (RoPE layouts).
    """
    from safetensors.torch import save as st_save

    state = to_hf_state_dict(params, config)
    if dtype is None:
        dtypes = {t.dtype for t in state.values()}
        if len(dtypes) != 1:
            raise ValueError(f"save_hf: parameters have mixed dtypes {sorted(map(str, dtypes))}; pass dtype=")
        (dtype,) = dtypes
    meta = hf_config(config, dtype=dtype, tokenizer=tokenizer)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"save_hf: tokenizer has vocab_size {tokenizer.vocab_size} > model vocab_size {config.vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:  # first: it is the part that can still fail (duplicate token bytes)
        save_hf_tokenizer(tokenizer, out, model_max_length=config.context_length)
    tensors = {k: t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous() for k, t in state.items()}
    atomic_write_bytes(out / _SAFETENSORS, st_save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", meta)
    return out


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / _SAFETENSORS).is_file():
        return load_file(directory / _SAFETENSORS)
    if (directory / _INDEX).is_file():
        weight_map = _read_json(directory / _INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{directory / _INDEX}: no 'weight_map' object")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise ValueError(f"{directory / _INDEX}: shard name {shard!r} is not a plain file name")
            for key, t in load_file(directory / shard).items():
                if weight_map.get(key) == shard:
                    state[key] = t
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{directory / _INDEX}: tensors {missing[:5]} are not in their shards")
        return state
    raise ValueError(f"{directory}: neither {_SAFETENSORS} nor {_INDEX} found (only safetensors checkpoints load)")


def load_hf(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    attention: str = "auto",
) -> tuple[Params, TransformerConfig]:  # fmt: skip
    """Load a Hugging Face Llama checkpoint directory as an flm parameter tree and config.

    Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
    ``model.safetensors.index.json``); ``W_q``/``W_k`` rows are un-permuted back to flm's
    interleaved RoPE layout, so ``load_hf(save_hf(p, c))`` gives ``p`` and ``c`` back exactly.

    Args:
        path: the checkpoint directory.
        dtype: convert the tensors to this dtype (default: keep the stored dtype).
        device: where to put them (default CPU).
        attention: flm's attention implementation for the returned config.

    Returns:
        ``(params, config)``.

    Raises:
        ValueError: no safetensors weights, an unreadable file, an unsupported architecture or
            setting (see :func:`config_from_hf`; the message names the field), or tensors that do
            not match the config.

    Source: HF Llama modeling docs (config fields, checkpoint layout).
    """
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ValueError(f"load_hf: {directory / 'config.json'} not found")
    config = config_from_hf(_read_json(directory / "config.json"), attention=attention)
    state = _load_tensors(directory)
    if dtype is not None or device is not None:
        state = {k: t.to(device=device, dtype=dtype) for k, t in state.items()}
    return from_hf_state_dict(state, config), config
