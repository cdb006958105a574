from hypothesis import given, settings
from hypothesis import strategies as st

from miniglm.tokenizer import StreamDecoder, load_tokenizer

from .conftest import CL100K_FILE, SAMPLE_ZH, shared_file

CHINESE = st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=40)
MIXED = st.text(alphabet=st.sampled_from(list(SAMPLE_ZH) + ["🐉", "é", "\n"]), min_size=1, max_size=60)


def stream(tok, ids, chunk_sizes):
    dec, chunks, i = StreamDecoder(tok), [], 0
    for size in chunk_sizes:
        if i >= len(ids):
            break
        chunks.append(dec.push(ids[i:i + size]))
        i += size
    for t in ids[i:]:
        chunks.append(dec.push(t))
    chunks.append(dec.flush())
    return chunks


def check(tok, ids, chunk_sizes):
    whole = tok.decode([i for i in ids if i not in tok.all_special_ids])  # special tokens are left out
    chunks = stream(tok, ids, chunk_sizes)
    assert "".join(chunks) == whole
    if "\ufffd" not in whole:
        assert not any("\ufffd" in c for c in chunks)


def test_small_bpe_splits_characters(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    ids = tok.encode("龘")  # a character the tiny vocab never saw: three byte tokens
    assert len(ids) == 3
    assert [tok.decode([i]) for i in ids] == ["\ufffd"] * 3  # the seed's problem, token by token
    assert stream(tok, ids, [1, 1, 1]) == ["", "", "龘", ""]


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(CHINESE, MIXED), chunks=st.lists(st.integers(1, 4), max_size=30))
def test_stream_equals_whole_bpe(bpe_dir, text, chunks):
    tok = load_tokenizer(bpe_dir)
    check(tok, tok.encode(text), chunks)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 399), min_size=1, max_size=40), chunks=st.lists(st.integers(1, 3), max_size=20))
def test_any_token_stream_bpe(bpe_dir, ids, chunks):
    """Arbitrary id sequences (invalid UTF-8 included): chunks join to the whole decode."""
    check(load_tokenizer(bpe_dir), ids, chunks)


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(CHINESE, MIXED), chunks=st.lists(st.integers(1, 3), max_size=30))
def test_stream_equals_whole_tiktoken(text, chunks):
    tok = _cl100k()
    check(tok, tok.encode(text), chunks)


_CACHE = {}


def _cl100k():
    if "tok" not in _CACHE:
        _CACHE["tok"] = load_tokenizer(shared_file(CL100K_FILE))
    return _CACHE["tok"]


def test_special_tokens_are_left_out_unless_kept(bpe_dir):
    """<|end|> and <|endoftext|> never reach the text by default, even between the bytes of one character;
    skip_special_tokens=False keeps them. Either way the chunks join to the text, whole characters only."""
    tok = load_tokenizer(bpe_dir)
    end, eot = tok.special("<|end|>"), tok.eot_id
    assert {end, eot, tok.special("<|user|>")} <= tok.all_special_ids and tok.encode("龘")[0] not in tok.all_special_ids
    b1, b2, b3 = tok.encode("龘")  # three byte tokens
    ids = [*tok.encode("你好"), b1, end, b2, b3, end, eot]
    chunks = stream(tok, ids, [1] * len(ids))
    assert "".join(chunks) == "你好龘" and not any("\ufffd" in c for c in chunks)

    ids = [*tok.encode("你好"), end, b1, b2, b3, eot]
    dec = StreamDecoder(tok, skip_special_tokens=False)
    chunks = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(chunks) == "你好<|end|>龘<|endoftext|>" == tok.decode(ids)
    assert not any("\ufffd" in c for c in chunks)


def test_tiktoken_knows_its_special_tokens():
    tok = _cl100k()
    assert {tok.eot_id, tok.special("<|end|>"), tok.pad_id} <= tok.all_special_ids
    assert not set(tok.encode("你好 <|end|>")) & tok.all_special_ids  # text is encoded as text
