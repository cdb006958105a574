import json

import numpy as np
import pytest

from miniglm.corpus import PrepareOptions, prepare_corpus
from miniglm.shards import open_shards, token_dtype, tokenize_corpus, tokenizer_of
from miniglm.tokenizer import load_tokenizer

from .conftest import CL100K_FILE, shared_file


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, world_dir):
    out = tmp_path_factory.mktemp("corpus")
    prepare_corpus([str(world_dir / "corpus.jsonl")], out, PrepareOptions(split="file", val_fraction=0.1))
    return out


def test_dtype_choice():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100282) == np.uint32


def test_documents_tokenised_whole_and_joined_with_eot(tmp_path, corpus_dir, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    meta = tokenize_corpus(corpus_dir, tok, tmp_path / "data")
    train, val, meta2 = open_shards(tmp_path / "data")
    assert meta == meta2 and meta["dtype"] == "uint16" and meta["eot_id"] == tok.eot_id
    docs = [json.loads(line)["text"] for line in (corpus_dir / "val.jsonl").read_text().splitlines()]
    expected = [i for d in docs for i in [*tok.encode(d), tok.eot_id]]
    assert val.tokens.tolist() == expected
    assert len(train) == meta["train_tokens"] and meta["val_documents"] == len(docs)
    assert load_tokenizer(tokenizer_of(tmp_path / "data")).encode(docs[0]) == tok.encode(docs[0])


def test_sampling_is_deterministic(tmp_path, corpus_dir, bpe_dir):
    tokenize_corpus(corpus_dir, load_tokenizer(bpe_dir), tmp_path / "data")
    train, _, _ = open_shards(tmp_path / "data")
    x1, y1 = train.sample(4, 16, np.random.default_rng(3))
    x2, y2 = train.sample(4, 16, np.random.default_rng(3))
    x3, _ = train.sample(4, 16, np.random.default_rng(4))
    assert (x1 == x2).all() and (y1 == y2).all() and not (x1 == x3).all()
    assert x1.shape == (4, 16) and (x1[:, 1:] == y1[:, :-1]).all()


def test_cl100k_shards_are_uint32(tmp_path, corpus_dir):
    tok = load_tokenizer(shared_file(CL100K_FILE))
    meta = tokenize_corpus(corpus_dir, tok, tmp_path / "data")
    train, _, _ = open_shards(tmp_path / "data")
    assert meta["dtype"] == "uint32" and train.tokens.dtype == np.uint32
    assert int(train.tokens.max()) >= 100257  # the eot id does not fit in uint16
