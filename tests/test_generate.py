"""Sampling and generation against independent references: filters checked token by token against
torch.softmax, sampled frequencies against the renormalised probabilities, batched and streamed
generation against one prompt at a time with the plain model (no cache, no batch)."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_chat import byte_tokenizer, tiny_model

from scratchlm.errors import UserError
from scratchlm.infer.decoder import BatchDecoder
from scratchlm.infer.generate import complete, complete_batch, generate, stream
from scratchlm.infer.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample_next
from scratchlm.infer.text import TextBatch, TextStream, stream_text
from scratchlm.runtime import eval_mode

pytestmark = pytest.mark.usefixtures("single_thread")


POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "nope"]


def generate_batch(model, prompts, params) -> list[list[int]]:
    """New token ids for each prompt of one batch (without the prompt, without the stop id)."""
    with eval_mode(model):
        decoder = BatchDecoder(model, prompts, params)
        while not decoder.done:
            decoder.step()
    return [row.output for row in decoder.rows]


def stream_completions(model, tokenizer, prompts, params):
    """A TextBatch's (row, text piece, finish reason) events, one by one."""
    with eval_mode(model):
        batch = TextBatch(model, tokenizer, prompts, params)
        while not batch.done:
            yield from batch.step()


def kept(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    return set(torch.nonzero(torch.isfinite(filter_logits(logits, params)[0])).flatten().tolist())


@pytest.mark.parametrize("seed", range(5))
def test_filters_keep_exactly_the_tokens_the_definitions_name(seed):
    torch.manual_seed(seed)
    logits = torch.randn(1, 50) * 2
    temperature = 0.7
    probs = torch.softmax(logits[0] / temperature, dim=-1).tolist()
    ranked = sorted(range(50), key=lambda i: -probs[i])

    # top-k: the k largest.
    assert kept(logits, SamplingParams(temperature=temperature, top_k=7)) == set(ranked[:7])
    # top-p: the smallest set of the likeliest tokens whose probabilities add up to at least p.
    for p in (0.1, 0.5, 0.9):
        total, want = 0.0, set()
        for i in ranked:
            want.add(i)
            total += probs[i]
            if total >= p:
                break
        assert kept(logits, SamplingParams(temperature=temperature, top_p=p)) == want
    # min-p: every token at least min_p times as likely as the likeliest.
    for m in (0.05, 0.3):
        want = {i for i in range(50) if probs[i] >= m * max(probs)}
        assert kept(logits, SamplingParams(temperature=temperature, min_p=m)) == want
    # Together: top-k first, then top-p on what top-k left, renormalised.
    top = ranked[:10]
    z = sum(probs[i] for i in top)
    total, want = 0.0, set()
    for i in top:
        want.add(i)
        total += probs[i] / z
        if total >= 0.6:
            break
    assert kept(logits, SamplingParams(temperature=temperature, top_k=10, top_p=0.6)) == want


def test_sampled_frequencies_follow_the_renormalised_distribution():
    torch.manual_seed(1)
    logits = torch.randn(1, 12)
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.02, seed=0)
    allowed = sorted(kept(logits, params))
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    expected = {i: float(probs[i] / probs[allowed].sum()) for i in allowed}
    n = 40_000
    draws = sample_next(logits.expand(n, -1), params, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=12).tolist()
    assert set(i for i, c in enumerate(counts) if c) <= set(allowed)
    for i, p in expected.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[i] - n * p) < 5 * sigma + 1, (i, counts[i], n * p)


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]
    # Greedy with the penalty picks what the penalised logits say.
    assert sample_next(torch.tensor([[2.0, 1.5]]), SamplingParams(temperature=0, repetition_penalty=2.0), None,
                       torch.tensor([[True, False]])).item() == 1


def test_sampling_params_are_checked():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-1),
                dict(repetition_penalty=0), dict(max_new_tokens=-5), dict(seed=-1), dict(stop=("",))):
        with pytest.raises(UserError, match=next(iter(bad))):
            SamplingParams(**bad).check()


def plain_greedy(model, prompt, n):
    """Greedy decoding by the definition: the whole sequence through the model at every step."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("position", POSITIONS)
def test_padded_rows_compute_what_they_compute_alone(position):
    model = tiny_model(50, position=position, n_kv_heads=1)
    rows = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    width = max(map(len, rows))
    pad = torch.tensor([width - len(r) for r in rows])
    batch = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    with torch.no_grad():
        padded = model(batch, pad=pad)
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]))[0]
            torch.testing.assert_close(padded[i, width - len(r):], alone, atol=1e-5, rtol=1e-4)
        # and continuing with the cache, one token at a time
        cache = model.new_cache(3)
        model(batch, cache=cache, pad=pad)
        step = model(torch.tensor([[20], [21], [22]]), cache=cache, pad=pad)[:, -1]
        for i, (r, t) in enumerate(zip(rows, [20, 21, 22])):
            torch.testing.assert_close(step[i], model(torch.tensor([r + [t]]))[0, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
def test_batched_greedy_equals_one_at_a_time_even_past_the_context(position):
    model = tiny_model(50, scale=8.0, position=position, context=16)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], list(range(1, 21))]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    batched = generate_batch(model, prompts, params)
    assert batched == [generate(model, p, params) for p in prompts]
    assert all(len(b) == 30 for b in batched)
    # Within the context the cache changes nothing: the same as running the whole sequence each time.
    assert generate(model, [1, 2, 3], SamplingParams(max_new_tokens=10, temperature=0)) == plain_greedy(model, [1, 2, 3], 10)


def test_seeded_sampling_repeats_and_a_row_samples_the_same_in_any_batch():
    model = tiny_model(50, scale=3.0)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, seed=5)
    a, b = generate(model, [1, 2, 3], params), generate(model, [1, 2, 3], params)
    assert a == b
    assert generate(model, [1, 2, 3], SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, seed=6)) != a
    per_row = [params, SamplingParams(max_new_tokens=12, temperature=0.9, seed=9)]
    assert generate_batch(model, [[1, 2, 3], [7, 8, 9, 10, 11]], per_row) == \
        [a, generate(model, [7, 8, 9, 10, 11], per_row[1])]


def test_stop_ids_end_a_row_without_being_returned():
    model = tiny_model(50, scale=8.0)
    free = generate(model, [1, 2], SamplingParams(max_new_tokens=12, temperature=0))
    stop_at = free[5]
    cut = generate(model, [1, 2], SamplingParams(max_new_tokens=12, temperature=0, stop_ids=(stop_at,)))
    assert cut == free[:free.index(stop_at)]
    decoder = BatchDecoder(model, [[1, 2], [3]], SamplingParams(max_new_tokens=12, temperature=0, stop_ids=(stop_at,)))
    while not decoder.done:
        decoder.step()
    assert decoder.rows[0].finish_reason == "stop" and decoder.rows[0].output == cut
    assert generate(model, [1, 2], SamplingParams(max_new_tokens=0)) == []


class Letters:
    """A tokenizer stand-in whose token i is the UTF-8 bytes listed for it."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode_bytes(self, ids, errors="strict"):
        return b"".join(self.pieces[i] for i in ids)


def push_all(stream_, ids):
    out = [stream_.push(i) for i in ids]
    return out + [stream_.close()]


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    euro = "€".encode()  # three bytes, split over two tokens
    tok = Letters([b"Hel", b"lo", b" \n", b"\nUs", b"er: x", euro[:2], euro[2:], b"!"])
    pieces = push_all(TextStream(tok), [0, 1, 5, 6, 7])
    assert pieces == ["Hel", "lo", "", "€", "!", ""]
    # The stop string "\n\nUser:" spans three tokens; its start is held back until it is complete.
    ts = TextStream(tok, stop=["\n\nUser:"])
    pieces = push_all(ts, [0, 1, 2, 3, 4])
    assert "".join(pieces) == "Hello " and ts.stopped
    assert pieces[2] == " "            # " \n" could start the stop string: only the space is safe
    # A held-back start that turns out not to be the stop string is released.
    ts = TextStream(tok, stop=["\n\nUser:"])
    assert "".join(push_all(ts, [0, 2, 7])) == "Hel \n!" and not ts.stopped


def test_streaming_equals_the_whole_completion():
    tok = byte_tokenizer()
    model = tiny_model(tok.vocab_size, scale=8.0)
    prompt = tok.encode("Hello there")
    for params in (SamplingParams(max_new_tokens=25, temperature=0),
                   SamplingParams(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=3),
                   SamplingParams(max_new_tokens=25, temperature=0, stop=("\x02",))):
        whole = complete(model, tok, prompt, params)
        streamed = "".join(stream_text(tok, stream(model, prompt, params), stop=params.stop))
        assert streamed == whole.text
        events = list(stream_completions(model, tok, [prompt], params))
        assert "".join(e[1] for e in events) == whole.text and events[-1][2] == whole.finish_reason
        if not params.stop:
            assert whole.text == tok.decode(generate(model, prompt, params))
    # Two prompts in one batch, each as it would be alone.
    prompts = [tok.encode("Hi"), tok.encode("How are you today?")]
    params = SamplingParams(max_new_tokens=15, temperature=0)
    assert [c.text for c in complete_batch(model, tok, prompts, params)] == \
        [complete(model, tok, p, params).text for p in prompts]


def test_stop_string_cuts_the_completion_before_it():
    tok = byte_tokenizer()
    model = tiny_model(tok.vocab_size, scale=8.0)
    prompt = tok.encode("abc")
    free = complete(model, tok, prompt, SamplingParams(max_new_tokens=20, temperature=0)).text
    stop = free[6:8]
    cut = complete(model, tok, prompt, SamplingParams(max_new_tokens=20, temperature=0, stop=(stop,)))
    assert cut.text == free[:free.index(stop)] and cut.finish_reason == "stop"


def test_a_prompt_can_join_a_running_batch():
    model = tiny_model(50, scale=8.0, context=16)
    first = SamplingParams(max_new_tokens=25, temperature=0)
    later = [([4, 5, 6, 7], SamplingParams(max_new_tokens=20, temperature=0)),
             ([9], SamplingParams(max_new_tokens=10, temperature=1.0, seed=3, repetition_penalty=1.3))]
    decoder = BatchDecoder(model, [[1, 2, 3]], first)
    for _ in range(5):
        decoder.step()
    rows = [decoder.add(p, params) for p, params in later]
    while not decoder.done:
        decoder.step()
    assert decoder.rows[0].output == generate(model, [1, 2, 3], first)
    for row, (p, params) in zip(rows, later):
        assert decoder.rows[row].output == generate(model, p, params)


@pytest.mark.parametrize("position", POSITIONS)
def test_joins_and_early_finishes_leave_each_row_as_it_would_be_alone(position):
    """Prompts join a running batch (prefilled into its cache), and one row is ended between its joining
    and the next step: every other row still produces exactly what it produces alone."""
    model = tiny_model(50, scale=8.0, context=16, position=position, n_kv_heads=1)
    greedy = SamplingParams(max_new_tokens=14, temperature=0)
    decoder = BatchDecoder(model, [[1, 2, 3, 4, 5, 6]], greedy)
    for _ in range(3):
        decoder.step()
    joined = [decoder.add(p, greedy) for p in ([7, 8], [9, 10, 11, 12, 13, 14, 15], [16])]
    decoder.finish(joined[1])  # gone before it ever stepped
    while not decoder.done:
        decoder.step()
    assert decoder.rows[0].output == generate(model, [1, 2, 3, 4, 5, 6], greedy)
    for row, prompt in ((joined[0], [7, 8]), (joined[2], [16])):
        assert decoder.rows[row].output == generate(model, prompt, greedy)
    assert decoder.rows[joined[1]].output == []


def test_last_only_logits_are_the_last_row_of_the_full_forward():
    model = tiny_model(50, n_kv_heads=1)
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    with torch.no_grad():
        full, last = model(ids), model(ids, last_only=True)
    assert last.shape == (2, 1, 50)
    torch.testing.assert_close(last[:, 0], full[:, -1])
