"""The sampler: valid text by construction (TextMask), seeded answers that do not depend on their batch,
and degenerate settings refused or handled."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miniglm.batcher import Batcher, Job
from miniglm.chat import generate_texts, load_run
from miniglm.cli import main
from miniglm.engine import (
    BOUNDARY,
    N_STATES,
    Engine,
    Row,
    SamplingError,
    SamplingParams,
    TextMask,
    mask_for,
    sample_next,
    utf8_step,
)
from miniglm.model import MiniGLM, ModelConfig
from miniglm.tokenizer import load_tokenizer

from .conftest import make_chat_run

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["你好", "天下大势", "司徒沧霄的师父是谁？", "龘", "Hello, world", "🙂", "江湖上称他为", "1+1="]


def engine(bpe_dir, valid_text: bool = True, seed: int = 0) -> Engine:
    """A random-weight model over the test BPE, whose many byte tokens a random model samples freely."""
    torch.manual_seed(seed)
    model = MiniGLM(ModelConfig(vocab_size=400, block_size=96, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    return Engine(model, load_tokenizer(bpe_dir), valid_text=valid_text)


def clean(text: str) -> bool:
    """No U+FFFD, no C0 control but \\t \\n \\r."""
    return "\ufffd" not in text and not any(ord(c) < 32 and c not in "\t\n\r" for c in text)


def sampled_texts(eng: Engine, n: int = 48, temperature: float = 1.0) -> list[str]:
    prompts = [eng.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=40, temperature=temperature, seed=1))
    return [o.text for o in outs]


# --- D: valid text by construction ------------------------------------------------------------------
def accepts(data: bytes) -> bool:
    state = BOUNDARY
    for b in data:
        state = utf8_step(state, b)
        if state == N_STATES:
            return False
    return state == BOUNDARY


def valid(data: bytes) -> bool:
    try:
        return clean(data.decode("utf-8"))
    except UnicodeDecodeError:
        return False


TRICKY = [0x00, 0x01, 0x09, 0x0A, 0x0D, 0x1F, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBD, 0xBF, 0xC0, 0xC1, 0xC2,
          0xDF, 0xE0, 0xE1, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF4, 0xF5, 0xFF, 0x41]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 255), st.sampled_from(TRICKY)), max_size=8).map(bytes))
def test_the_automaton_accepts_exactly_clean_utf8(data):
    """Overlong forms, surrogates, past U+10FFFF, C0 controls but \\t \\n \\r, U+FFFD: all refused."""
    assert accepts(data) == valid(data)


def test_the_automaton_accepts_every_character_but_the_excluded():
    for cp in [*range(0x800), *range(0xD000, 0xE100), *range(0xFFF0, 0x10100), *range(0x10FF00, 0x110000)]:
        if not 0xD800 <= cp <= 0xDFFF:
            assert accepts(chr(cp).encode()) == ((cp >= 32 or chr(cp) in "\t\n\r") and cp != 0xFFFD), hex(cp)


def test_the_table_walks_each_tokens_bytes(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    mask = TextMask(tok, tok.vocab_size + 3)  # a model's vocabulary padded past the tokenizer's
    assert mask.blocked[:, tok.vocab_size:].all()  # ids with no token: never
    for i in range(tok.vocab_size):
        for s in range(N_STATES):
            state = s
            for b in tok.token_bytes(i):
                state = utf8_step(state, b) if state < N_STATES else state
            if i in tok.all_special_ids:
                state = BOUNDARY if s == BOUNDARY else N_STATES  # at a boundary only
            assert bool(mask.blocked[s, i]) == (state == N_STATES), (s, i, tok.token_bytes(i))
            assert mask.after(s, i) == (BOUNDARY if state == N_STATES else state)
    # every state inside a character can be left (the tokenizer has every byte)
    assert (~mask.blocked).any(1).all()
    assert bool(mask.blocked[BOUNDARY, tok.encode("\x01")[0]]) and not mask.blocked[BOUNDARY, tok.encode("\n")[0]]


def test_sampled_text_is_always_valid(bpe_dir):
    """A random model over a vocabulary of byte tokens breaks characters all the time, unless masked."""
    unmasked = sampled_texts(engine(bpe_dir, valid_text=False))
    assert sum(not clean(t) for t in unmasked) > 10  # what the mask is for
    for temperature in (1.0, 2.0):
        texts = sampled_texts(engine(bpe_dir), temperature=temperature)
        assert all(clean(t) for t in texts), [t for t in texts if not clean(t)]
    eng = engine(bpe_dir)
    chunks = list(eng.stream(eng.tokenizer.encode("龘"), SamplingParams(max_new_tokens=60, temperature=2.0, seed=5)))
    assert all(clean(c) for c in chunks)


def test_greedy_valid_answers_stay_token_identical(bpe_dir):
    """The mask removes only tokens that would make the text invalid: a greedy answer that was valid is
    the same tokens; one that was not is now valid."""
    changed = 0
    for seed in range(4):
        masked, plain = engine(bpe_dir, seed=seed), engine(bpe_dir, valid_text=False, seed=seed)
        prompts = [masked.tokenizer.encode(p) for p in PROMPTS]
        params = SamplingParams(max_new_tokens=30)
        for m, p in zip(masked.generate(prompts, params), plain.generate(prompts, params), strict=True):
            shown = [i for i in p.ids if i not in masked.tokenizer.all_special_ids]
            raw = b"".join(masked.tokenizer.token_bytes(i) for i in shown)
            assert clean(m.text)
            if _prefix_valid(raw):
                assert m.ids == p.ids
            else:
                changed += 1
    assert changed  # the random models do break characters greedily too


def _prefix_valid(raw: bytes) -> bool:
    """raw is clean UTF-8, but for an unfinished character at its end."""
    state = BOUNDARY
    for b in raw:
        state = utf8_step(state, b)
        if state == N_STATES:
            return False
    return True


def test_a_character_cut_by_the_limit_is_dropped(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    lead, *rest = tok.encode("龘")  # three byte tokens
    mask = mask_for(tok, tok.vocab_size)
    row = Row([1], SamplingParams(max_new_tokens=2), tok, mask=mask)
    row.push(lead)
    assert row.utf8 != BOUNDARY and not row.done
    row.push(rest[0])
    assert row.done and row.text == ""  # was "\ufffd"
    row = Row([1], SamplingParams(max_new_tokens=3), tok, mask=mask)
    for t in [lead, *rest]:
        row.push(t)
    assert row.text == "龘" and row.utf8 == BOUNDARY


def test_the_server_batcher_masks_too(bpe_dir):
    eng = engine(bpe_dir)
    batcher = Batcher(eng.model, eng.tokenizer, thread=False)
    jobs = [batcher.submit(Job(eng.tokenizer.encode(p), SamplingParams(max_new_tokens=30, temperature=t, seed=s),
                               lambda e: None))
            for p in PROMPTS for t, s in ((1.0, None), (2.0, 3))]
    jobs.append(batcher.submit(Job(eng.tokenizer.encode("龘"), SamplingParams(
        max_new_tokens=30, temperature=1.5, repetition_penalty=1.2, seed=4), lambda e: None)))  # samples alone
    while any(not j.row or not j.row.done for j in jobs):
        _one_step(batcher)
    assert all(clean(j.row.text) for j in jobs)
    solo = eng.generate([jobs[-1].prompt], jobs[-1].params)[0]
    assert solo.ids == jobs[-1].row.ids  # a seeded row: the engine's answer, token for token


def _one_step(batcher: Batcher) -> None:
    """One turn of the batcher's loop, here: the waiting rows join, then one step."""
    with torch.inference_mode():
        for j in batcher.waiting:
            batcher._join(j)
        batcher.waiting = []
        batcher._step()


def test_hf_generate_is_masked_too(tmp_path, bpe_dir):
    from miniglm.hf import load_model
    from miniglm.hf_engine import HFEngine

    from .test_hf import make_hf_model

    path = make_hf_model(tmp_path, "llama", bpe_dir)
    eng = HFEngine(load_model(str(path)), load_tokenizer(str(path)))
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    texts = [o.text for o in eng.generate(prompts, SamplingParams(max_new_tokens=30, temperature=1.5, seed=0))]
    assert all(clean(t) for t in texts), texts


# --- E: a seeded answer does not depend on its batch -------------------------------------------------
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_seeded_answers_do_not_depend_on_the_batch(tmp_path, bpe_dir, penalty):
    run = load_run(make_chat_run(tmp_path, bpe_dir, block_size=96, n_layer=1))
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=11, repetition_penalty=penalty)
    texts = ["你好", *PROMPTS, "天下大势，分久必合" * 3, "你好"]  # one prompt first, last, and far apart
    answers = {}
    for batch in (1, 3, 8):
        rows = list(generate_texts(run, texts, params, batch_size=batch))
        answers[batch] = [r["output"] for r in rows]
        assert answers[batch][0] == answers[batch][-1] == answers[batch][1]  # "你好" at 0, 1 and the end
    assert answers[1] == answers[3] == answers[8]
    assert len(set(answers[1])) > 3  # sampled, not one answer for all
    other = next(generate_texts(run, ["你好"], SamplingParams(**{**params.__dict__, "seed": 12})))["output"]
    assert other != answers[1][0]  # another sample of a prompt: another seed


def test_seeded_eval_answers_do_not_depend_on_the_batch(tmp_path, bpe_dir):
    from miniglm.evaluate import Example, answer

    run = load_run(make_chat_run(tmp_path, bpe_dir, block_size=96, n_layer=1))
    examples = [Example([{"role": "user", "content": q}], ["x"]) for q in [*PROMPTS, PROMPTS[0]]]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)
    one, eight = answer(run, examples, params, batch_size=1), answer(run, examples, params, batch_size=8)
    assert one == eight and one[0] == one[-1]


def test_generate_cli_seeded_batches(tmp_path, bpe_dir, capsys):
    run = make_chat_run(tmp_path, bpe_dir, block_size=96, n_layer=1)
    (tmp_path / "p.txt").write_text("\n".join(["江湖", *PROMPTS, "江湖"]) + "\n", encoding="utf-8")
    outs = []
    for batch in ("1", "4"):
        assert main(["generate", "--run", str(run), "--file", str(tmp_path / "p.txt"), "--jsonl", "--seed", "5",
                     "--temperature", "1.0", "--max-new-tokens", "12", "--batch-size", batch]) == 0
        outs.append([json.loads(x)["output"] for x in capsys.readouterr().out.splitlines()])
    assert outs[0] == outs[1] and outs[0][0] == outs[0][-1]


# --- I: degenerate values ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, says", [
    (["--temperature", "1e-320"], "--temperature"), (["--temperature", "1e-6"], "--temperature"),
    (["--repetition-penalty", "1e-300"], "--repetition-penalty"), (["--repetition-penalty", "0.001"],
                                                                    "--repetition-penalty"),
])
def test_degenerate_values_are_one_line(capsys, tmp_path, flags, says):
    code = main(["generate", "--run", str(tmp_path / "no-run"), "--prompt", "x", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"miniglm: error: {says} ")


def test_validate_floors():
    SamplingParams(temperature=0).validate()
    SamplingParams(temperature=1e-5, repetition_penalty=0.01).validate()
    for bad in ({"temperature": 1e-320}, {"temperature": 5e-6}, {"repetition_penalty": 1e-300},
                {"repetition_penalty": 0.0}):
        with pytest.raises(SamplingError):
            SamplingParams(**bad).validate()


def test_sample_next_handles_degenerate_values():
    """Past the check (a direct call): taken at the floor, never inf or NaN probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 20
    history = torch.tensor([[1, 2], [3, 4], [5, 6]])
    greedy = logits.argmax(-1)
    tiny = sample_next(logits, SamplingParams(temperature=1e-320), None, None)
    assert torch.equal(tiny, greedy)
    for penalty in (1e-300, 1e-30):
        p = SamplingParams(temperature=1.0, repetition_penalty=penalty)
        out = sample_next(logits, p, history, torch.Generator().manual_seed(0))
        floor = SamplingParams(temperature=1.0, repetition_penalty=0.01)
        assert torch.equal(out, sample_next(logits, floor, history, torch.Generator().manual_seed(0)))
        assert torch.equal(sample_next(logits, SamplingParams(temperature=1e-320, repetition_penalty=penalty),
                                       history, None),
                           sample_next(logits, SamplingParams(repetition_penalty=0.01), history, None))
