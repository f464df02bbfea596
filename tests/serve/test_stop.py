"""Where a generation ends: at a stop string (held back until it is known not to start one, never sent), at the end
of text token, or at max_tokens; the finish reason and usage say which."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orion.serve.engine import StopText

PROMPT = "Once upon a time"


@given(st.text("abc", max_size=30), st.lists(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=4),
       st.lists(st.integers(1, 5), max_size=30))
def test_stop_text_gives_the_text_before_the_first_stop_however_it_is_cut(text, stops, cuts):
    pieces, i = [], 0
    for n in cuts:
        pieces.append(text[i:i + n])
        i += n
    pieces.append(text[i:])
    stop = StopText(tuple(stops))
    out = ""
    for piece in pieces:
        out += stop.push(piece)
        if stop.stopped:
            break
    else:
        out += stop.flush()
    ends = sorted((text.find(s) + len(s), text.find(s)) for s in stops if s in text)  # (end, start), first to end
    assert out == (text[:ends[0][1]] if ends else text)
    assert stop.stopped == bool(ends)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_text_before_it(server, tiny_gpt2_dir, stream):
    client = server.client()
    request = dict(model=str(tiny_gpt2_dir), prompt=PROMPT, max_tokens=12, temperature=0)
    full = client.completions.create(**request).choices[0].text
    stop = full[5:7]
    assert stop.strip()  # the random model's text has something to stop at there
    answer = client.completions.create(stop=[stop, "never in it"], stream=stream, **request)
    if stream:
        chunks = list(answer)
        text = "".join(c.choices[0].text for c in chunks)
        finish, usage = chunks[-1].choices[0].finish_reason, chunks[-1].usage
    else:
        text, finish, usage = answer.choices[0].text, answer.choices[0].finish_reason, answer.usage
    assert text == full[:full.find(stop)] and finish == "stop"
    assert usage.completion_tokens < 12  # the generation stopped there too


def test_the_end_of_text_token_finishes_with_stop(server, tiny_gpt2_dir, monkeypatch):
    model = server.engine.model
    original = model.generate_ids

    def ends_early(*args, **kwargs):  # two of the model's tokens, then its end of text
        tokens = original(*args, **kwargs)
        yield next(tokens)
        yield next(tokens)
        tokens.close()
        yield model.tokenizer.eos_id

    request = dict(model=str(tiny_gpt2_dir), prompt=PROMPT, max_tokens=8, temperature=0)
    full = server.client().completions.create(**request).choices[0].text
    monkeypatch.setattr(model, "generate_ids", ends_early)
    answer = server.client().completions.create(**request)
    first_two = model.tokenizer.decode(list(original(model.encode(PROMPT), 2)))
    assert answer.choices[0].text == first_two and full.startswith(first_two) and first_two != full
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == 3
