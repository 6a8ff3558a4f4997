"""Tests for flm.generate: KV cache vs full recompute, top-p, temperature, EOS, batching, sliding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flm.generate as gen
from flm.generate import (
    clone_cache,
    decode_step,
    generate,
    generate_stream,
    prefill,
    sample_next_token,
    top_k_mask,
    top_p_filter,
    top_p_mask,
)
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.tree import tree_map

VOCAB = 37


def make(context_length: int = 24, **kw) -> tuple[TransformerConfig, dict]:
    cfg = TransformerConfig(
        vocab_size=VOCAB, context_length=context_length, d_model=16, num_layers=2, num_heads=4, d_ff=24, **kw
    )
    return cfg, init_params(cfg, torch.Generator().manual_seed(1), dtype=torch.float64)


VARIANTS = [
    {},
    {"norm": "post"},
    {"norm": "none"},
    {"ffn": "silu"},
    {"position": "nope"},
    {"tie_embeddings": True},
    {"attention": "sdpa"},
    {"norm": "post", "ffn": "silu", "position": "nope", "tie_embeddings": True, "attention": "sdpa"},
]


def naive_greedy(params, cfg, prompt: list[int], n: int, eos_id: int | None = None) -> list[int]:
    """Reference decoder: full recompute over the last ≤ context_length tokens each step."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = transformer_lm(params, torch.tensor(seq[-cfg.context_length :])[None], cfg)[0, -1]
        tok = int(logits.argmax())
        if tok == eos_id:
            break
        seq.append(tok)
        out.append(tok)
    return out


# ------------------------------------------------------------------ KV cache == full recompute


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_cached_logits_equal_full_recompute_every_step(variant):
    cfg, params = make(**variant)
    x = torch.randint(0, VOCAB, (3, cfg.context_length), generator=torch.Generator().manual_seed(0))
    ref = transformer_lm(params, x, cfg)
    logits, cache = prefill(params, cfg, x[:, :5])
    torch.testing.assert_close(logits, ref[:, :5], rtol=0, atol=1e-12)
    for t in range(5, cfg.context_length):
        logits, cache = decode_step(params, cfg, x[:, t], cache)
        assert cache.length == t + 1
        torch.testing.assert_close(logits[:, 0], ref[:, t], rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", [{}, {"attention": "sdpa"}, {"norm": "post", "position": "nope"}])
def test_left_padded_rows_equal_their_unpadded_recompute(variant):
    cfg, params = make(**variant)
    g = torch.Generator().manual_seed(2)
    lengths = [6, 2, 4]
    rows = [torch.randint(0, VOCAB, (n + 5,), generator=g) for n in lengths]  # prompt + 5 continuation ids
    width = max(lengths)
    padded = torch.full((3, width), 7)  # pad id: any valid id
    for b, n in enumerate(lengths):
        padded[b, width - n :] = rows[b][:n]
    logits, cache = prefill(params, cfg, padded, pad_lengths=torch.tensor([width - n for n in lengths]))
    for b, n in enumerate(lengths):
        ref = transformer_lm(params, rows[b][None], cfg)[0]
        torch.testing.assert_close(logits[b, width - n :], ref[:n], rtol=0, atol=1e-12)
    for t in range(5):
        logits, cache = decode_step(params, cfg, torch.stack([r[n + t] for r, n in zip(rows, lengths)]), cache)
        for b, n in enumerate(lengths):
            ref = transformer_lm(params, rows[b][None, : n + t + 1], cfg)[0, -1]
            torch.testing.assert_close(logits[b, 0], ref, rtol=0, atol=1e-12)


def test_prefill_last_only_and_float32():
    cfg, params = make()
    params32 = tree_map(lambda t: t.float(), params)
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    logits, cache = prefill(params32, cfg, x, last_only=True)
    assert logits.shape == (2, 1, VOCAB) and logits.dtype == torch.float32
    assert cache.keys[0].dtype == torch.float32 and cache.keys[0].shape == (
        2,
        cfg.num_heads,
        cfg.context_length,
        cfg.d_head,
    )
    torch.testing.assert_close(logits[:, 0], transformer_lm(params32, x, cfg)[:, -1], rtol=1e-5, atol=1e-5)


def test_cache_is_explicit_state_and_clone_branches():
    cfg, params = make()
    x = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    _, cache = prefill(params, cfg, x)
    branch = clone_cache(cache)
    la, _ = decode_step(params, cfg, torch.tensor([1]), cache)
    lb, _ = decode_step(params, cfg, torch.tensor([2]), branch)
    torch.testing.assert_close(la[0, 0], transformer_lm(params, torch.cat([x, torch.tensor([[1]])], 1), cfg)[0, -1])
    torch.testing.assert_close(lb[0, 0], transformer_lm(params, torch.cat([x, torch.tensor([[2]])], 1), cfg)[0, -1])


def test_full_cache_and_bad_shapes_raise():
    cfg, params = make(context_length=4)
    _, cache = prefill(params, cfg, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit"):
        decode_step(params, cfg, torch.tensor([0]), cache)
    with pytest.raises(ValueError):
        prefill(params, cfg, torch.zeros(1, 5, dtype=torch.long))  # longer than the cache
    with pytest.raises(ValueError):
        prefill(params, cfg, torch.zeros(4, dtype=torch.long))  # not (batch, seq)
    with pytest.raises(ValueError):
        prefill(params, cfg, torch.tensor([[VOCAB]]))
    with pytest.raises(ValueError):
        prefill(params, cfg, torch.zeros(1, 3, dtype=torch.long), pad_lengths=torch.tensor([3]))  # all padding
    with pytest.raises(ValueError):
        decode_step(params, cfg, torch.zeros(1, 2, dtype=torch.long), cache)


# ------------------------------------------------------------------ top-p


def test_top_p_mask_hand_made():
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]], dtype=torch.float64)

    def kept(p):
        return set(torch.nonzero(top_p_mask(probs, p)[0]).flatten().tolist())

    assert kept(0.1) == {1}
    assert kept(0.5) == {1}  # the top token alone reaches 0.5
    assert kept(0.5001) == {1, 3}
    assert kept(0.75) == {1, 3}
    assert kept(0.76) in ({1, 3, 0}, {1, 3, 2})  # tie at the boundary: exactly one of the two
    assert len(kept(0.76)) == 3
    assert kept(1.0) == {0, 1, 2, 3}
    # batched rows are independent; a one-hot row keeps its single token
    batch = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    assert top_p_mask(batch, 0.8).tolist() == [[True, True, False], [False, False, True]]


def test_top_p_filter_renormalises():
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    out = top_p_filter(probs, 0.8)
    torch.testing.assert_close(out, torch.tensor([0.0, 2 / 3, 1 / 3], dtype=torch.float64))
    assert top_p_filter(probs, 1.0) is probs


@given(
    weights=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=30).filter(lambda w: sum(w) > 1e-3),
    p=st.floats(min_value=1e-6, max_value=1.0),
)
def test_top_p_mask_is_smallest_sorted_prefix_reaching_p(weights, p):
    probs = torch.tensor(weights, dtype=torch.float64)
    probs = probs / probs.sum()
    mask = top_p_mask(probs, p)
    kept, dropped = probs[mask], probs[~mask]
    tol = 1e-12
    assert mask[probs.argmax()]  # the most probable token is always kept
    assert kept.sum() >= p - tol or mask.all()  # reaches p
    if dropped.numel():
        assert kept.min() >= dropped.max()  # a prefix of the sorted distribution
    if kept.numel() > 1:
        assert kept.sum() - kept.min() < p + tol  # smallest: one fewer token does not reach p


def test_bad_top_p_and_temperature_raise():
    logits = torch.zeros(1, 4)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            sample_next_token(logits, top_p=bad)
        with pytest.raises(ValueError, match="top_p"):
            top_p_mask(logits.softmax(-1), bad)
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sample_next_token(logits, temperature=bad)


# ------------------------------------------------------------------ sampling


def test_sampling_frequencies_follow_temperature_and_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (2.0, 0.7)]:
        probs = top_p_filter((logits[0] / temperature).softmax(-1).double(), top_p)
        draws = sample_next_token(logits, temperature=temperature, top_p=top_p, generator=g)
        freq = torch.bincount(draws, minlength=4).double() / draws.numel()
        assert (freq - probs).abs().max() < 0.015, (temperature, top_p, freq, probs)
        assert bool((freq[probs == 0] == 0).all())  # never outside the nucleus


def test_temperature_zero_is_greedy_argmax_of_full_recompute():
    cfg, params = make()
    prompt = [3, 1, 4, 1, 5]
    # top_p is irrelevant at temperature 0
    assert generate(params, cfg, [prompt], 12, temperature=0.0, top_p=0.3) == [naive_greedy(params, cfg, prompt, 12)]


def test_fixed_generator_reproducible_and_seeds_differ():
    cfg, params = make()

    def run(seed):
        return generate(
            params, cfg, [[1, 2, 3]] * 2, 16, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(seed)
        )

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert generate(params, cfg, [[1, 2, 3]], 8) == generate(params, cfg, [[1, 2, 3]], 8)  # None: seeded 0


def test_global_rng_untouched():
    cfg, params = make()
    state = torch.get_rng_state()
    generate(params, cfg, [[1, 2]], 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------ stopping, batching, sliding


def test_max_new_tokens_respected():
    cfg, params = make()
    out = generate(params, cfg, [[1], [2, 3, 4]], 7, generator=torch.Generator().manual_seed(0))
    assert [len(r) for r in out] == [7, 7]
    assert all(0 <= t < VOCAB for r in out for t in r)
    assert generate(params, cfg, [[1], [2]], 0) == [[], []]


def test_eos_stops_and_is_excluded():
    cfg, params = make()
    prompts = [[3, 1, 4], [2, 7]]
    free = [naive_greedy(params, cfg, p, 10) for p in prompts]
    eos = free[0][3]  # a token the first row emits at step 3
    out = generate(params, cfg, prompts, 10, temperature=0.0, eos_id=eos)
    assert out == [naive_greedy(params, cfg, p, 10, eos_id=eos) for p in prompts]
    assert out[0] == free[0][: free[0].index(eos)] and eos not in out[0]
    # once every row has stopped, generation ends: a huge budget returns at once
    assert generate(params, cfg, [prompts[0]], 10_000, temperature=0.0, eos_id=free[0][0]) == [[]]


def test_batch_equals_per_prompt_generation():
    cfg, params = make()
    prompts = [[5, 6, 7, 8, 9, 10], [1], [30, 2, 2]]
    batched = generate(params, cfg, prompts, 9, temperature=0.0)
    assert batched == [generate(params, cfg, [p], 9, temperature=0.0)[0] for p in prompts]
    assert batched == [naive_greedy(params, cfg, p, 9) for p in prompts]
    # tensor inputs: 2-D equal-length batch and a 1-D single prompt
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert generate(params, cfg, x, 6, temperature=0.0) == [naive_greedy(params, cfg, r, 6) for r in x.tolist()]
    assert generate(params, cfg, torch.tensor([1, 2, 3]), 6, temperature=0.0) == [
        naive_greedy(params, cfg, [1, 2, 3], 6)
    ]
    assert generate(params, cfg, [1, 2, 3], 6, temperature=0.0) == [naive_greedy(params, cfg, [1, 2, 3], 6)]
    assert generate(params, cfg, [torch.tensor([4, 5]), torch.tensor([6])], 6, temperature=0.0) == [
        naive_greedy(params, cfg, [4, 5], 6),
        naive_greedy(params, cfg, [6], 6),
    ]


@pytest.mark.parametrize("variant", [{}, {"position": "nope", "attention": "sdpa"}])
def test_sliding_window_beyond_context_length(variant, monkeypatch):
    cfg, params = make(context_length=8, **variant)
    seen: list[int] = []
    real_forward = gen._forward

    def spy(params_, config, token_ids, cache, *, last_only):
        seen.append(cache.length + token_ids.shape[1])
        return real_forward(params_, config, token_ids, cache, last_only=last_only)

    monkeypatch.setattr(gen, "_forward", spy)
    prompts = [[1, 2, 3, 4, 5], [9, 8], list(range(1, 12))]  # the last is longer than the context
    out = generate(params, cfg, prompts, 20, temperature=0.0)
    assert max(seen) == cfg.context_length  # reached the window, never beyond it
    assert out == [naive_greedy(params, cfg, p, 20) for p in prompts]


def test_sampled_generation_with_eos_and_sliding_runs():
    cfg, params = make(context_length=6)
    out = generate(
        params, cfg, [[1, 2], [3]], 30, temperature=1.2, top_p=0.8, eos_id=0, generator=torch.Generator().manual_seed(5)
    )
    assert len(out) == 2 and all(0 not in r and len(r) <= 30 for r in out)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[]], {}, "empty"),
        ([], {}, "no prompts"),
        ([[1], []], {}, "empty"),
        (torch.zeros(1, 0, dtype=torch.long), {}, "empty"),
        ([[1, VOCAB]], {}, "outside"),
        ([[-1]], {}, "outside"),
        (torch.tensor([[1.0]]), {}, "integer"),
        ([["a"]], {}, "ints"),
        ([[True]], {}, "ints"),
        ([torch.tensor([1.0])], {}, "integer"),
        ("abc", {}, "list of lists"),
        ([[1]], {"temperature": -0.5}, "temperature"),
        ([[1]], {"top_p": 0.0}, "top_p"),
        ([[1]], {"top_p": 1.01}, "top_p"),
        ([[1]], {"max_new_tokens": -1}, "max_new_tokens"),
        ([[1]], {"eos_id": VOCAB}, "eos_id"),
    ],
)
def test_bad_generate_inputs_raise(prompts, kwargs, match):
    cfg, params = make()
    n = kwargs.pop("max_new_tokens", 3)
    with pytest.raises(ValueError, match=match):
        generate(params, cfg, prompts, n, **kwargs)


# ------------------------------------------------------------------ top-k and streaming


def test_top_k_mask_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k_mask(logits, 2).tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert top_k_mask(logits, 99).all()
    with pytest.raises(ValueError, match="top_k"):
        top_k_mask(logits, 0)


@given(st.lists(st.floats(-5, 5, width=32), min_size=2, max_size=20), st.integers(1, 25))
def test_top_k_sampling_never_leaves_the_top_k(values, k):
    # float32 logits: sampling ranks in float32, where distinct float64 values can tie (e.g. -1e-308 and 0).
    logits = torch.tensor([values], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    kept = top_k_mask(logits, k)[0]
    for _ in range(5):
        tok = int(sample_next_token(logits, temperature=1.0, top_k=k, generator=g)[0])
        assert kept[tok]


def test_top_k_one_is_greedy_and_bad_top_k_raises():
    cfg, params = make()
    g = torch.Generator().manual_seed(3)
    assert generate(params, cfg, [[1, 2]], 8, temperature=1.5, top_k=1, generator=g) == generate(
        params, cfg, [[1, 2]], 8, temperature=0.0
    )
    with pytest.raises(ValueError, match="top_k"):
        generate(params, cfg, [[1]], 2, top_k=-1)


@pytest.mark.parametrize(
    "setting",
    [
        {"temperature": True},
        {"top_p": True},
        {"top_k": True},
        {"top_k": False},
        {"top_k": -1},
        {"top_k": 2.0},
        {"top_p": 0.0},
        {"temperature": float("nan")},
        {"temperature": -0.5},
    ],
)
def test_sample_config_sampling_and_generate_refuse_the_same_settings(setting):
    """Regression (issue 20): ``SampleConfig`` and ``flm.sampling`` had their own checks and
    disagreed about bools (``SampleConfig(top_k=True)`` passed, ``sample_next_token(top_k=True)``
    raised; ``temperature=True`` passed ``sample_next_token``). One validator now refuses each."""
    from flm.config import SampleConfig
    from flm.sampling import check_sampling

    (name,) = setting
    with pytest.raises(ValueError, match=f"^SampleConfig: {name} must"):
        SampleConfig(**setting)
    with pytest.raises(ValueError, match=f"^{name} must"):
        sample_next_token(torch.zeros(1, 4), **setting)
    with pytest.raises(ValueError, match=f"^{name} must"):
        check_sampling(**setting)
    cfg, params = make()
    with pytest.raises(ValueError, match=f"^{name} must"):
        generate(params, cfg, [[1]], 1, **setting)


@pytest.mark.parametrize(
    "setting", [{"temperature": 0}, {"temperature": 2}, {"top_p": 1}, {"top_k": 0}, {"top_k": None}]
)
def test_sample_config_and_sampling_accept_the_same_settings(setting):
    from flm.config import SampleConfig

    SampleConfig(**setting)
    assert sample_next_token(torch.zeros(1, 4), **setting, generator=torch.Generator().manual_seed(0)).shape == (1,)


def test_stream_yields_the_same_tokens_as_generate_one_step_at_a_time():
    cfg, params = make(context_length=6)
    prompts = [[1, 2], [3]]
    steps = list(
        generate_stream(params, cfg, prompts, 15, temperature=0.9, eos_id=0, generator=torch.Generator().manual_seed(7))
    )
    rows = [[t for t in col if t is not None] for col in zip(*steps)]
    assert rows == generate(
        params, cfg, prompts, 15, temperature=0.9, eos_id=0, generator=torch.Generator().manual_seed(7)
    )
    assert all(len(s) == 2 for s in steps)


def test_huge_max_new_tokens_allocates_nothing_up_front():
    """Regression: max_new_tokens used to size preallocated buffers (an 8 TB allocation for 10**12);
    now only the KV cache (≤ context_length slots) exists, so the first tokens arrive at once."""
    cfg, params = make()
    stream = generate_stream(params, cfg, [[1, 2, 3]], 10**12, temperature=0.0)
    first = [next(stream) for _ in range(3)]
    assert [r[0] for r in first] == naive_greedy(params, cfg, [1, 2, 3], 3)


def test_every_public_function_documented():
    for name in gen.__all__:
        doc = getattr(gen, name).__doc__
        assert doc and doc.strip(), name


@given(
    limit=st.integers(1, 12),
    temperature=st.sampled_from([0.0, 0.7, 1.0, 5.0]),
    top_k=st.sampled_from([None, 1, 3, 20]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_vocab_limit_samples_only_ids_below_it(limit, temperature, top_k, seed):
    """vocab_limit (the tokenizer's size when BPE stopped short of vocab_size): no id ≥ limit is
    ever sampled, whatever the temperature and top-k; the limit = vocab_size changes nothing."""
    cfg = TransformerConfig(vocab_size=12, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24)
    params = init_params(cfg, torch.Generator().manual_seed(seed))
    kw = dict(temperature=temperature, top_k=top_k)
    out = generate(params, cfg, [[0, 1]], 12, generator=torch.Generator().manual_seed(seed), vocab_limit=limit, **kw)
    assert all(0 <= t < limit for t in out[0])
    full = generate(params, cfg, [[0, 1]], 12, generator=torch.Generator().manual_seed(seed), vocab_limit=12, **kw)
    assert full == generate(params, cfg, [[0, 1]], 12, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("bad", [0, 13, True, 2.0])
def test_vocab_limit_is_validated(bad):
    cfg = TransformerConfig(vocab_size=12, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24)
    params = init_params(cfg, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="vocab_limit must be an int in \\[1, vocab_size=12\\]"):
        generate(params, cfg, [[0]], 2, vocab_limit=bad)
