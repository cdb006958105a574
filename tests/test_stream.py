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
    whole = tok.decode(ids)
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
