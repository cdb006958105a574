import pytest

from miniglm.fileio import UserError
from miniglm.tokenizer import EOT, PAD, ROLE_TOKENS, BPETokenizer, load_tokenizer, report

from .conftest import CL100K_FILE, SAMPLE_ZH, shared_file


def test_bpe_roundtrip_and_specials(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == 400
    assert [tok.special(t) for t in [EOT, PAD, *ROLE_TOKENS]] == list(range(6))
    assert tok.eot_id == 0 and tok.pad_id == 1
    assert tok.all_special_ids == frozenset(range(6))  # the added special tokens, nothing else
    ids = tok.encode(SAMPLE_ZH)
    assert tok.decode(ids) == SAMPLE_ZH
    assert report(tok, [SAMPLE_ZH, "第二段。"])["roundtrip_failures"] == 0


def test_bpe_pretokenizer_keeps_chinese_runs(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    pieces = [p for p, _ in tok.tok.pre_tokenizer.pre_tokenize_str("滚滚长江东逝水，浪花淘尽英雄。")]
    # ByteLevel shows bytes as printable characters: decode them back to compare
    from miniglm.tokenizer import BYTE_DECODER
    words = [bytes(BYTE_DECODER[c] for c in p).decode() for p in pieces]
    assert words == ["滚滚长江东逝水", "，", "浪花淘尽英雄", "。"]
    assert tok.tok.normalizer is None


def test_bpe_loads_in_transformers(bpe_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(bpe_dir)
    hf = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert hf(SAMPLE_ZH, add_special_tokens=False)["input_ids"] == ours.encode(SAMPLE_ZH)
    assert hf.eos_token == EOT and hf.pad_token == PAD
    assert hf.decode(ours.encode(SAMPLE_ZH)) == SAMPLE_ZH


def test_bpe_merges_form_words(tmp_path):
    from miniglm.tokenizer import train_bpe

    tok = train_bpe(["江湖上称他为玉面书生。"] * 50 + ["玉面书生来了。"] * 50, 300, tmp_path / "t")
    assert len(tok.encode("玉面书生")) == 1


def test_han_chars_keep_a_name_the_same_tokens_everywhere(tmp_path):
    """--han-chars: no token spans two Chinese characters, so 苏州 is the same ids in 来自苏州 and in
    答：苏州 (GPT-2's split fuses it with its neighbours); transformers tokenizes as we do."""
    from transformers import AutoTokenizer

    from miniglm.tokenizer import train_bpe

    texts = ["何瑶来自苏州。", "问：何瑶是哪里人？\n答：苏州", "李霜来自苏州。year 1106"] * 50
    fused = train_bpe(texts, 400, tmp_path / "gpt2")
    assert fused.encode("来自苏州")[-1:] != fused.encode("苏州")
    tok = train_bpe(texts, 400, tmp_path / "han", han_chars=True)
    suzhou = tok.encode("苏州")
    assert tok.encode("来自苏州")[-2:] == suzhou == tok.encode("答：苏州")[-2:] and len(suzhou) == 2
    ids = tok.encode(texts[1] + texts[2])
    assert all(sum(map(str.isalpha, tok.decode([i]))) <= 1 or tok.decode([i]).isascii() for i in ids)
    assert tok.decode(ids) == texts[1] + texts[2]
    assert AutoTokenizer.from_pretrained(str(tmp_path / "han"))(texts[1], add_special_tokens=False)["input_ids"] \
        == tok.encode(texts[1])


def test_tiktoken_from_local_file():
    tok = load_tokenizer(shared_file(CL100K_FILE))
    ids = tok.encode(SAMPLE_ZH)
    assert tok.decode(ids) == SAMPLE_ZH
    assert tok.eot_id == 100257
    assert tok.vocab_size > 100257 and tok.special(PAD) >= 100277
    assert tok.encode("<|endoftext|>") != [100257]  # plain text never becomes a special token


def test_tiktoken_saved_into_a_run_folder(tmp_path):
    tok = load_tokenizer(shared_file(CL100K_FILE))
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode(SAMPLE_ZH) == tok.encode(SAMPLE_ZH)


def test_hf_tokenizer_by_path(tmp_path, bpe_dir):
    # Any HF tokenizer folder: a BERT-style Chinese tokenizer built offline from a vocab file.
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"话说天下大势，分久必合。"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab), encoding="utf-8")
    BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "bert"))
    tok = load_tokenizer(tmp_path / "bert")
    assert tok.eot_id == 3 and tok.pad_id == 0  # [SEP] ends, [PAD] pads
    assert tok.all_special_ids == frozenset(range(5))  # BERT's [PAD] [UNK] [CLS] [SEP] [MASK]
    ids = tok.encode("话说天下大势")
    assert ids == [vocab.index(c) for c in "话说天下大势"]
    assert tok.decode(ids).replace(" ", "") == "话说天下大势"


def test_unknown_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "no-such-tokenizer")
    with pytest.raises(UserError, match="unknown tokenizer 'no-such-org/no-such-tokenizer'"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    with pytest.raises(UserError, match="unknown tiktoken encoding"):
        load_tokenizer("tiktoken:no_such_base")
