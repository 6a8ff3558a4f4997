"""Tests for flm.interop: flm models and tokenizers against Hugging Face ``transformers``/``tokenizers``.

Oracles: ``transformers.LlamaForCausalLM`` loaded from ``save_hf``'s directory (logits, gradients,
greedy generation, with ``sdpa`` and ``eager`` attention), HF's own ``save_pretrained`` output read
by ``load_hf``, HF's ``apply_rotary_pos_emb`` for the RoPE permutation, and ``tokenizers`` /
``AutoTokenizer`` for ``tokenizer.json`` (ids on the shared text files, GPT-2 and a small trained BPE).

Precision of the model oracle. In float64, HF Llama (transformers 5.x, ``modeling_llama.py``)
still computes three things in float32: ``LlamaRMSNorm`` casts its input to float32 before the
mean square and rsqrt; ``LlamaRotaryEmbedding`` builds ``inv_freq`` and the angles
``position · inv_freq`` and their cos/sin in float32 (``.float()``) and only then casts to the
model dtype; the eager attention takes ``softmax(…, dtype=float32)``. (The ``sdpa`` path runs
PyTorch's kernel in float64.) So the plain HF model agrees with flm's float64 model to about
float32 rounding: ``F32_INTERNALS`` below (measured max 3.2e-7 on logits, 1.2e-6 on gradients).
The ``lifted`` variant of each test patches exactly those three casts away (the same formulas,
kept in the model dtype; see ``hf_float64_internals``) and then demands float64 agreement,
``RTOL64 = 1e-9`` (measured max 1.4e-15 on logits, 3.1e-15 on gradients). Relative error = max |hf − flm| / max |flm| per tensor.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import generate_text
from hypothesis import given, settings
from hypothesis import strategies as st

import flm
from flm.generate import generate
from flm.interop import (
    config_from_hf,
    from_hf_state_dict,
    hf_config,
    load_hf,
    load_hf_tokenizer,
    rope_permutation,
    save_hf,
    save_hf_tokenizer,
    to_hf_state_dict,
)
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.nn import rope
from flm.tokenizer import EOS_TOKEN, Tokenizer, train_bpe

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402  (after the importorskip)
from transformers.models.llama import modeling_llama  # noqa: E402

RTOL64 = 1e-9  # float64 flm vs HF with its float32 casts lifted
F32_INTERNALS = 2e-5  # float64 flm vs stock HF (float32 RMSNorm, RoPE angles, eager softmax inside)

CONFIGS = [
    TransformerConfig(vocab_size=61, context_length=32, d_model=16, num_layers=1, num_heads=2, d_ff=24),
    TransformerConfig(
        vocab_size=47,
        context_length=32,
        d_model=24,
        num_layers=2,
        num_heads=4,
        d_ff=40,
        rope_theta=500.0,
        eps=1e-6,
        tie_embeddings=True,
    ),
    TransformerConfig(vocab_size=33, context_length=32, d_model=12, num_layers=3, num_heads=6, d_ff=20),
    TransformerConfig(
        vocab_size=40, context_length=32, d_model=32, num_layers=2, num_heads=1, d_ff=48, tie_embeddings=True
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture
def hf_float64_internals(monkeypatch):
    """Run HF Llama's RMSNorm, RoPE tables and eager softmax in the model dtype instead of float32.

    Each replacement is HF's own formula with only the float32 cast removed.
    """

    def rms_norm_forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))

    def rotary_forward(self, x, position_ids):
        theta, dim = self.config.rope_parameters["rope_theta"], self.config.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = torch.softmax(weights, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_forward)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rotary_forward)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager_attention)


def _params(config: TransformerConfig, seed: int = 0, dtype=torch.float64):
    """init_params with randomised RMSNorm gains (a swapped or dropped gain would show)."""
    params = init_params(config, torch.Generator().manual_seed(seed), dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    return flm.tree.tree_map(
        lambda t: t + 0.2 * torch.randn(t.shape, generator=g).to(dtype) if t.dim() == 1 else t, params
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def _load(directory, attn: str, dtype=torch.float64):
    model, info = LlamaForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=attn, output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


# =============================================================================================
# Model: logits, gradients and generation against LlamaForCausalLM
# =============================================================================================


def _compare_with_hf(config: TransformerConfig, attn: str, tmp_path) -> tuple[float, float]:
    params = _params(config)
    save_hf(params, config, tmp_path)
    model = _load(tmp_path, attn)
    if config.tie_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (2, config.context_length), generator=g)
    targets = torch.randint(0, config.vocab_size, (2, config.context_length), generator=g)

    def loss_of(logits):
        return F.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))

    hf_logits = model(ids).logits
    loss_of(hf_logits).backward()
    hf_grads = from_hf_state_dict({n: p.grad for n, p in model.named_parameters()}, config)

    flm_grads = torch.func.grad(lambda p: loss_of(transformer_lm(p, ids, config)))(params)
    flm_logits = transformer_lm(params, ids, config)
    logit_err = _rel(hf_logits.detach(), flm_logits)
    grad_err = max(_rel(a, b) for a, b in zip(flm.tree.tree_leaves(hf_grads), flm.tree.tree_leaves(flm_grads)))
    return logit_err, grad_err


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"h{c.num_heads}d{c.d_head}L{c.num_layers}t{int(c.tie_embeddings)}"
)
def test_logits_and_grads_match_hf_float64(config, attn, tmp_path, hf_float64_internals):
    """HF with its float32 internals lifted to float64 equals flm to 1e-9 (logits and all gradients)."""
    logit_err, grad_err = _compare_with_hf(config, attn, tmp_path)
    assert logit_err <= RTOL64 and grad_err <= RTOL64, (logit_err, grad_err)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("config", CONFIGS[:2], ids=["untied", "tied"])
def test_logits_and_grads_match_stock_hf(config, attn, tmp_path):
    """Stock HF (float32 RMSNorm, RoPE angles and eager softmax inside a float64 model) agrees to float32 rounding."""
    logit_err, grad_err = _compare_with_hf(config, attn, tmp_path)
    assert logit_err <= F32_INTERNALS and grad_err <= F32_INTERNALS, (logit_err, grad_err)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1]], ids=["untied", "tied"])
def test_greedy_generation_matches_hf(config, tmp_path):
    """HF ``generate(do_sample=False)`` and flm ``generate(temperature=0)`` agree token for token.

    Stock HF in float64 differs from flm by ~1e-7 relative, so the test also checks that every
    greedy choice wins by a margin far above that (no near-ties that rounding could flip).
    """
    config = config.replace(vocab_size=97, context_length=40)
    params = _params(config, seed=3)
    save_hf(params, config, tmp_path)
    model = _load(tmp_path, "sdpa")
    prompts = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=20)
    hf_new = out[:, prompts.shape[1] :].tolist()
    flm_new = generate(params, config, prompts, 20, temperature=0)
    assert hf_new == flm_new
    assert all(len(row) == 20 for row in flm_new) and len({t for row in flm_new for t in row}) > 2
    logits = transformer_lm(params, torch.cat((prompts, torch.tensor(flm_new)), dim=1), config)
    top2 = logits[:, prompts.shape[1] - 1 : -1].topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-5 * float(logits.abs().max())


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 8), seq=st.integers(1, 12), theta=st.sampled_from([10.0, 1e4]))
def test_rope_permutation_turns_pairs_into_halves(heads, half, seq, theta):
    """HF's rotate-half RoPE (``apply_rotary_pos_emb``) on permuted rows equals flm's pair RoPE, permuted."""
    d = 2 * half
    perm = rope_permutation(heads * d, heads)
    assert sorted(perm.tolist()) == list(range(heads * d))
    assert torch.equal(perm.view(heads, d) % d, rope_permutation(d, 1).expand(heads, d))
    within = rope_permutation(d, 1)  # (0, 2, …, d-2, 1, 3, …, d-1)
    x = torch.randn(1, heads, seq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seq))
    pos = torch.arange(seq)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([torch.outer(pos.double(), inv_freq)] * 2, dim=-1)[None]  # HF's cos/sin table layout
    hf_q, _ = modeling_llama.apply_rotary_pos_emb(x[..., within], x[..., within], emb.cos(), emb.sin())
    torch.testing.assert_close(hf_q, rope(x, pos, theta)[..., within], rtol=1e-12, atol=1e-12)


# =============================================================================================
# Files: round trip, key names, HF's own checkpoints, errors
# =============================================================================================


_SMALL_CONFIGS = st.builds(
    lambda heads, half, layers, tie, ff, theta, eps: TransformerConfig(
        vocab_size=11,
        context_length=8,
        d_model=heads * 2 * half,
        num_layers=layers,
        num_heads=heads,
        d_ff=ff,
        rope_theta=theta,
        eps=eps,
        tie_embeddings=tie,
    ),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.booleans(),
    st.integers(1, 9),
    st.floats(1.0, 1e6),
    st.floats(1e-8, 1e-2),
)


@settings(max_examples=20, deadline=None)
@given(
    config=_SMALL_CONFIGS,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 99),
)
def test_round_trip_is_bitwise(config, dtype, seed):
    params = _params(config, seed, dtype)
    with tempfile.TemporaryDirectory() as d:
        save_hf(params, config, d)
        back, back_config = load_hf(d)
    assert back_config == config
    assert flm.tree.leaf_paths(back) == flm.tree.leaf_paths(params)
    for a, b in zip(flm.tree.tree_leaves(back), flm.tree.tree_leaves(params)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert hf_config(back_config, dtype=dtype) == hf_config(config, dtype=dtype)


def test_dtype_arguments_and_key_names(tmp_path):
    from safetensors import safe_open

    config = CONFIGS[1]  # tied
    params = _params(config, dtype=torch.float64)
    save_hf(params, config, tmp_path, dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["torch_dtype"] == "bfloat16" and meta["tie_word_embeddings"] is True
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert keys == set(to_hf_state_dict(params, config))
    assert "model.layers.1.mlp.gate_proj.weight" in keys and "model.layers.1.self_attn.o_proj.weight" in keys
    back, _ = load_hf(tmp_path, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in flm.tree.tree_leaves(back))
    expected = flm.tree.tree_map(lambda t: t.to(torch.bfloat16).to(torch.float32), params)
    assert all(torch.equal(a, b) for a, b in zip(flm.tree.tree_leaves(back), flm.tree.tree_leaves(expected)))
    mixed = {**params, "ln_final": {"weight": params["ln_final"]["weight"].float()}}
    with pytest.raises(ValueError, match="mixed dtypes"):
        save_hf(mixed, config, tmp_path / "mixed")


@pytest.mark.parametrize("shard", [None, "8KB"])
def test_load_hf_reads_checkpoints_hf_wrote(shard, tmp_path):
    """``save_pretrained`` output (v5 ``rope_parameters``, sharded or not) loads into flm with equal logits."""
    torch.manual_seed(0)
    hc = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        rope_theta=1000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=shard is None,
    )
    model = LlamaForCausalLM(hc).to(torch.float64).eval()
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    params, config = load_hf(tmp_path)
    assert config.rope_theta == 1000.0 and config.eps == 1e-5 and config.tie_embeddings == (shard is None)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    assert _rel(transformer_lm(params, ids, config), expected) <= F32_INTERNALS


@pytest.mark.parametrize(
    ("field", "value"), [("norm", "post"), ("norm", "none"), ("ffn", "silu"), ("position", "nope")]
)
def test_save_hf_rejects_variants_llama_cannot_express(field, value, tmp_path):
    config = CONFIGS[0].replace(**{field: value})
    with pytest.raises(ValueError, match=rf"{field}='{value}'"):
        save_hf(init_params(config), config, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_type"),
        ({"model_type": "mistral"}, "model_type"),
        ({"head_dim": 4}, "head_dim"),
    ],
)
def test_load_hf_rejects_unsupported_settings(change, field, tmp_path):
    save_hf(init_params(CONFIGS[0]), CONFIGS[0], tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(ValueError, match=field):
        load_hf(tmp_path)


def test_load_hf_rejects_grouped_query_attention_from_hf(tmp_path):
    hc = LlamaConfig(
        vocab_size=20,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(hc).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        load_hf(tmp_path)


def test_state_dict_errors_name_the_tensor():
    config = CONFIGS[0]
    params = init_params(config)
    state = to_hf_state_dict(params, config)
    with pytest.raises(ValueError, match="model.norm.weight"):
        from_hf_state_dict({k: v for k, v in state.items() if k != "model.norm.weight"}, config)
    with pytest.raises(ValueError, match="q_proj"):
        from_hf_state_dict({**state, "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}, config)
    with pytest.raises(ValueError, match="unexpected"):
        from_hf_state_dict({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}, config)
    with pytest.raises(ValueError, match="lm_head"):
        to_hf_state_dict({k: v for k, v in params.items() if k != "lm_head"}, config)
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"model_type": "gpt2"})


# =============================================================================================
# Tokenizers
# =============================================================================================


@pytest.fixture(scope="module")
def gpt2(shared_data) -> Tokenizer:
    bpe = shared_data / "bpe"
    return Tokenizer.from_files(bpe / "gpt2_vocab.json", bpe / "gpt2_merges.txt", [EOS_TOKEN])


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"  # generated English-like text
    corpus.write_text(generate_text(300, seed=0), encoding="utf-8")
    vocab, merges = train_bpe(corpus, 500, [EOS_TOKEN])
    return Tokenizer(vocab, merges, [EOS_TOKEN])


@pytest.fixture(scope="module")
def texts(shared_data) -> list[str]:
    files = [
        (shared_data / "bpe" / n).read_text(encoding="utf-8")
        for n in ("tinystories_sample.txt", "german.txt", "address.txt")
    ]
    eot = EOS_TOKEN
    return [
        *files,
        f"{eot}Once upon a time{eot}{eot} there was a cat.\n\n{eot}",
        f"  leading spaces, I'm, it's, we'll   \n\n\t trailing  {eot} 12345 3.14 naïve café 🎉 日本語 <|endoftext",
        eot.join(files),
    ]


@pytest.mark.parametrize("which", ["small", "gpt2"])
def test_hf_tokenizers_give_flm_ids(which, texts, request, tmp_path):
    tok: Tokenizer = request.getfixturevalue(which)
    save_hf_tokenizer(tok, tmp_path, model_max_length=1024)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.eos_token == EOS_TOKEN and auto.eos_token_id == tok.eos_id
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids
        assert auto(text)["input_ids"] == ids  # nothing added around the text
        assert auto.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids, skip_special_tokens=False) == text == auto.decode(ids)
    back = load_hf_tokenizer(tmp_path)
    assert back.fingerprint() == tok.fingerprint()


def test_save_hf_with_tokenizer_sets_bos_eos(small, tmp_path):
    config = TransformerConfig(
        vocab_size=small.vocab_size, context_length=16, d_model=8, num_layers=1, num_heads=2, d_ff=8
    )
    save_hf(init_params(config), config, tmp_path, small)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["bos_token_id"] == meta["eos_token_id"] == small.eos_id
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 16
    assert LlamaForCausalLM.from_pretrained(tmp_path).config.eos_token_id == small.eos_id
    too_small = config.replace(vocab_size=small.vocab_size - 1)
    with pytest.raises(ValueError, match="vocab_size"):
        save_hf(init_params(too_small), too_small, tmp_path / "x", small)


def test_load_hf_tokenizer_reads_a_tokenizer_hf_trained(shared_data, texts, tmp_path):
    """A byte-level BPE trained by ``tokenizers`` itself loads into flm and encodes identically."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(shared_data / "bpe" / "corpus.en")], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_hf_tokenizer(tmp_path / "tokenizer.json")
    assert tok.special_tokens == [EOS_TOKEN] and tok.vocab_size == hf.get_vocab_size()
    for text in texts:
        assert tok.encode(text) == hf.encode(text).ids


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s["model"].update(type="WordPiece"), "model type"),
        (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
        (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer"),
        (lambda s: s["model"].update(ignore_merges=True), "ignore_merges"),
        (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip"),
    ],
)
def test_load_hf_tokenizer_rejects_what_flm_cannot_encode(small, edit, match, tmp_path):
    save_hf_tokenizer(small, tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_hf_tokenizer(tmp_path)


def test_tokenizer_json_rejects_duplicate_bytes(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b"ab"}
    tok = Tokenizer(vocab, [(b"a", b"b")])
    with pytest.raises(ValueError, match="share the token"):
        save_hf_tokenizer(tok, Path(tmp_path))


def _byte_vocab(*extra: bytes) -> dict[int, bytes]:
    return {i: bytes([i]) for i in range(256)} | {256 + k: t for k, t in enumerate(extra)}


def test_repeated_merges_keep_each_libraries_rank(tmp_path):
    """flm ranks a repeated merge by its first occurrence, ``tokenizers`` by its last: both directions agree."""
    flm_tok = Tokenizer(_byte_vocab(b"ab", b"bc"), [(b"a", b"b"), (b"b", b"c"), (b"a", b"b")])
    assert flm_tok.encode("abc") == [256, ord("c")]
    save_hf_tokenizer(flm_tok, tmp_path / "out")
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode("abc").ids == [256, ord("c")]

    spec = json.loads((tmp_path / "out" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = ["a b", "b c", "a b"]
    (tmp_path / "in.json").write_text(json.dumps(spec), encoding="utf-8")
    hf_ids = tokenizers.Tokenizer.from_file(str(tmp_path / "in.json")).encode("abc").ids
    assert hf_ids == [ord("a"), 257] == load_hf_tokenizer(tmp_path / "in.json").encode("abc")


def test_overlapping_and_non_ascii_special_tokens(small, tmp_path):
    """Added tokens match longest first and by their raw text, as flm's special-token split does."""
    specials = [EOS_TOKEN, "<|eot|>", "<|eot|><|eot|>", "<|é|>"]
    tok = Tokenizer(dict(small.vocab), small.merges, specials)
    save_hf_tokenizer(tok, tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    text = f"a<|eot|><|eot|><|eot|>b <|é|>c{EOS_TOKEN}<|eot|> <|eot|"
    ids = tok.encode(text)
    assert tok.token_to_id("<|eot|><|eot|>") in ids and tok.token_to_id("<|é|>") in ids
    assert hf.encode(text).ids == ids == auto.encode(text)
    assert load_hf_tokenizer(tmp_path).fingerprint() == tok.fingerprint()
