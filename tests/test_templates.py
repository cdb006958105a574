import json

import pytest

from miniglm.fileio import UserError
from miniglm.sft.data import fit, pack, prepare_sft
from miniglm.sft.formats import load_records, to_messages
from miniglm.sft.templates import IGNORE, TEMPLATES, TemplateOptions, render
from miniglm.tokenizer import load_tokenizer

from .conftest import SHARED_DATA, shared_file

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "[gMASK]", "<sop>",
            "<eop>", "sop", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A byte-level BPE with the special tokens of every seed family, saved as an HF tokenizer folder:
    <s> is BOS (added by the post-processor, as LLaMA's tokenizer does), </s> EOS, <pad> padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Below is an instruction that describes a task. 问：你好 答：简约而不简单的牛仔外套 Tweet text : Label : "
            "complaint no complaint [Round 0] ### Instruction: ### Response: 类型#上衣*材质#牛仔布"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHATML)
    out = tmp_path_factory.mktemp("hftok")
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


CHAT = [{"role": "system", "content": "你是武侠专家。"},
        {"role": "user", "content": "黄蓉是谁？"}, {"role": "assistant", "content": "郭靖的妻子。"},
        {"role": "user", "content": "她的师父是谁？"}, {"role": "assistant", "content": "洪七公。"}]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_train_prompt_equals_inference_prompt(hf_tok, template):
    full = render(template, CHAT, hf_tok)
    prompt = render(template, CHAT[:-1], hf_tok, add_generation_prompt=True)
    assert full.ids[:len(prompt.ids)] == prompt.ids
    trained = [i for i, lab in enumerate(full.labels) if lab != IGNORE]
    assert full.labels[trained[-1]] in full.stop_ids  # the end-of-turn token is trained
    assert hf_tok.decode([full.ids[i] for i in trained if i >= len(prompt.ids)]).lstrip().startswith("洪七公。")
    assert all(full.labels[i] == full.ids[i] for i in trained)


def test_chatglm_matches_seed_layout(hf_tok):
    """Seed 002's ChatGLM-6B preprocess: a + [gMASK, <sop>] + b + [<eop>], labels -100 before <sop>."""
    q, a = "类型#上衣*材质#牛仔布", "简约而不简单的牛仔外套"
    opts = TemplateOptions(max_source_len=64, max_target_len=64)
    r = render("chatglm", [{"role": "user", "content": q}, {"role": "assistant", "content": a}], hf_tok, opts=opts)
    a_ids, b_ids = hf_tok.encode(q)[:63], hf_tok.encode(a)[:62]
    gmask, sop, eop = (hf_tok.token_id(t) for t in ["[gMASK]", "<sop>", "<eop>"])
    input_ids = a_ids + [gmask, sop] + b_ids + [eop]  # build_inputs_with_special_tokens
    context_length = input_ids.index(sop)
    assert r.ids == input_ids
    assert r.labels == [-100] * context_length + input_ids[context_length:]
    # budgets truncate the source to max_source_len - 1 and the target to max_target_len - 2
    short = render("chatglm", [{"role": "user", "content": q}, {"role": "assistant", "content": a}], hf_tok,
                   opts=TemplateOptions(max_source_len=4, max_target_len=5))
    assert short.ids == a_ids[:3] + [gmask, sop] + b_ids[:3] + [eop]
    hist = render("chatglm", CHAT[1:], hf_tok)
    rounds = "[Round 0]\n问：黄蓉是谁？\n答：郭靖的妻子。\n[Round 1]\n问：她的师父是谁？\n答："
    assert hf_tok.decode(hist.ids).startswith(rounds)


def test_plain_carries_an_instruction(hf_tok):
    """A system prompt (eval classify --system, finetune --system) is a line before the record, untrained."""
    opts = TemplateOptions(prompt_field="Tweet text", label_field="Label", system="Answer complaint or no complaint.")
    msgs = [{"role": "user", "content": "late again"}, {"role": "assistant", "content": "complaint"}]
    r = render("plain", msgs, hf_tok, opts=opts)
    prompt = hf_tok.encode("Answer complaint or no complaint.\n") + hf_tok.encode("Tweet text : late again Label : ")
    assert r.ids[:len(prompt)] == prompt and r.labels[:len(prompt)] == [-100] * len(prompt)
    assert render("plain", msgs[:1], hf_tok, True, opts).ids == prompt


def test_plain_matches_seed_bloomz_layout(hf_tok, tmp_path):
    """Seed 002's BLOOMZ twitter example: target + pad, left padding with pad, -100 on prompt and padding."""
    from miniglm.train import SFTData

    tweet = "If I can't get my 3rd pair of @beatsbydre powerbeats to work today I'm doneski man."
    opts = TemplateOptions(prompt_field="Tweet text", label_field="Label", end_token="pad")
    msgs = [{"role": "user", "content": tweet}, {"role": "assistant", "content": "complaint"}]
    r = render("plain", msgs, hf_tok, opts=opts)
    sample = hf_tok.encode(f"Tweet text : {tweet} Label : ")
    label_ids = hf_tok.encode("complaint") + [hf_tok.pad_id]
    assert r.ids == sample + label_ids and r.labels == [-100] * len(sample) + label_ids
    # left padding to max_length, as the seed does
    max_length = len(r.ids) + 5
    (tmp_path / "d").mkdir()
    long = {"ids": [7] * max_length, "labels": [7] * max_length}
    for split in ["train", "val"]:
        (tmp_path / "d" / f"{split}.jsonl").write_text(json.dumps({"ids": r.ids, "labels": r.labels}) + "\n"
                                                       + json.dumps(long) + "\n")
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"padding_side": "left", "pad_id": hf_tok.pad_id}))
    batch = SFTData(str(tmp_path / "d"), max_length, 0).collate([{"ids": r.ids, "labels": r.labels}, long])
    ids = [hf_tok.pad_id] * 5 + r.ids
    labels = [-100] * 5 + r.labels
    mask = [0] * 5 + [1] * len(r.ids)
    assert batch["idx"][0].tolist() == ids[:-1] and batch["targets"][0].tolist() == labels[1:]
    assert batch["attention_mask"][0].tolist() == mask[:-1]


def test_alpaca_matches_seed_layout(hf_tok):
    """Seed 002's Chinese-LLaMA collate: tokenizer(source) (with <s>) + tokenizer(output + eos)."""
    row = {"instruct": "抽取句子中的人名", "query": "郭靖和黄蓉去了桃花岛。", "answer": "郭靖；黄蓉"}
    r = render("alpaca", to_messages(row, "x"), hf_tok)
    source = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\n抽取句子中的人名\n郭靖和黄蓉去了桃花岛。\n\n### Response: ")
    s = hf_tok.tok(source)["input_ids"]
    t = hf_tok.tok("郭靖；黄蓉" + "</s>", add_special_tokens=False)["input_ids"]
    assert s[0] == hf_tok.bos_id
    assert r.ids == s + t and r.labels == [-100] * len(s) + t


def test_hf_template_prefix_check(hf_tok, tmp_path):
    r = render("hf", CHAT, hf_tok)
    assert hf_tok.decode(r.ids).startswith("<|im_start|>system\n你是武侠专家。<|im_end|>\n")
    trained = hf_tok.decode([t for t, lab in zip(r.ids, r.labels, strict=True) if lab != IGNORE])
    assert trained == "郭靖的妻子。<|im_end|>洪七公。<|im_end|>"
    hf_tok.tok.chat_template = "{% if add_generation_prompt %}PROMPT {% endif %}" + CHATML
    try:
        with pytest.raises(UserError, match="not a token prefix"):
            render("hf", CHAT, hf_tok)
        bad = tmp_path / "chats.jsonl"
        bad.write_text(json.dumps({"messages": CHAT}, ensure_ascii=False) + "\n", encoding="utf-8")
        with pytest.raises(UserError, match=r"chats.jsonl:line 1: .*not a token prefix"):
            prepare_sft(bad, hf_tok, tmp_path / "out", "hf", max_len=512, val_fraction=0)
    finally:
        hf_tok.tok.chat_template = CHATML


def test_last_turn_only_and_unknown_template(hf_tok):
    r = render("chatml", CHAT, hf_tok, opts=TemplateOptions(train_all_turns=False))
    assert hf_tok.decode([t for t, lab in zip(r.ids, r.labels, strict=True) if lab != IGNORE]) == "洪七公。<|im_end|>"
    with pytest.raises(UserError, match="unknown template"):
        render("nope", CHAT, hf_tok)


def test_truncation_drops_history_then_cuts_prompt(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    long_chat = []
    for i in range(4):
        long_chat += [{"role": "user", "content": f"第{i}个问题" * 5}, {"role": "assistant", "content": f"答案{i}"}]
    full = render("miniglm", long_chat, tok)
    r, truncated = fit("miniglm", long_chat, tok, len(full.ids) - 5, TemplateOptions())
    assert truncated and len(r.ids) <= len(full.ids) - 5
    assert "第0个问题" not in tok.decode(r.ids) and tok.decode(r.ids).endswith("答案3<|end|>")
    one = [{"role": "user", "content": "很长的问题" * 40}, {"role": "assistant", "content": "短答案"}]
    r, truncated = fit("miniglm", one, tok, 30, TemplateOptions())
    assert truncated and len(r.ids) <= 30 and tok.decode(r.ids).endswith("短答案<|end|>")
    r, truncated = fit("miniglm", [{"role": "user", "content": "问"}, {"role": "assistant", "content": "长" * 80}],
                       tok, 20, TemplateOptions())
    assert r is None and truncated  # the answer alone does not fit: dropped, never cut


def test_pack_and_prepare(tmp_path, world_dir, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    meta = prepare_sft(world_dir / "sft_train.jsonl", tok, tmp_path / "plain", max_len=128)
    packed = prepare_sft(world_dir / "sft_train.jsonl", tok, tmp_path / "packed", max_len=128, packing=True)
    assert packed["packed_padding_efficiency"] > 2 * meta["padding_efficiency"]
    assert packed["tokens"] == meta["tokens"] and packed["sequences"] < meta["sequences"]
    rows = [json.loads(x) for x in (tmp_path / "packed" / "train.jsonl").read_text().splitlines()]
    assert all(len(r["ids"]) <= 128 and sum(r["lengths"]) == len(r["ids"]) for r in rows)
    assert pack([{"ids": [1] * 3, "labels": [1] * 3}] * 3, 7)[0]["lengths"] == [3, 3]


def test_packed_batch_positions_restart(tmp_path, world_dir, bpe_dir):
    from miniglm.train import SFTData

    prepare_sft(world_dir / "sft_train.jsonl", load_tokenizer(bpe_dir), tmp_path / "p", max_len=64, packing=True)
    batch = SFTData(str(tmp_path / "p"), 64, 0).next_batch(2)
    pos = batch["position_ids"][0].tolist()
    assert pos[0] == 0 and pos.count(0) >= 2


def test_formats_and_errors(tmp_path):
    rows = [
        {"instruction": "你好", "input": "", "output": "你好！", "history": [["在吗", "在"]]},
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}]},
        {"Question": "Q", "Answer": "A"},
        {"instruct": "I", "query": "Q", "answer": "A"},
    ]
    (tmp_path / "ok.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    recs = load_records(tmp_path / "ok.jsonl")
    assert [len(r.messages) for r in recs] == [4, 2, 3, 2, 2]
    assert recs[4].messages[0]["content"] == "I\nQ"
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "x", "output": 3}))
    with pytest.raises(UserError, match=r"bad.jsonl:line 2: field 'output' must be a string"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], {"conversations": [{"from": "alien", "value": "x"}]}]))
    with pytest.raises(UserError, match=r"bad.json:record 1: conversations\[0\]"):
        load_records(tmp_path / "bad.json")


def test_shared_sft_sets_prepare(tmp_path, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    oaast = shared_file(SHARED_DATA / "sft" / "oaast_sft_zh.json")
    meta = prepare_sft(oaast, tok, tmp_path / "oaast", max_len=512)
    assert meta["records"] == 689 and meta["train_records"] + meta["val_records"] + meta["dropped"] == 689
    cmrc = shared_file(SHARED_DATA / "sft" / "cmrc2018" / "cmrc2018_dev.json")
    recs = load_records(cmrc)
    assert len(recs) == 3219 and recs[0].messages[0]["content"].startswith("阅读下面的文章")


@pytest.mark.parametrize("template", ["miniglm", "chatml"])
@pytest.mark.parametrize("default_system", [None, "你是侠客。"])
def test_jinja_templates_render_the_same_ids(hf_tok, template, default_system):
    """The exported Jinja chat_template renders a 2-turn chat (with a system prompt, or the run's default)
    to the same text and, tokenized as a whole, the same ids as render()."""
    import jinja2

    from miniglm.sft.templates import jinja_template

    opts = TemplateOptions(system=default_system)
    jinja = jinja_template(template, opts)
    chat = CHAT[:-1] if default_system is None else CHAT[1:-1]
    text = jinja2.Environment().from_string(jinja).render(messages=chat, add_generation_prompt=True)
    ours = render(template, chat, hf_tok, add_generation_prompt=True, opts=opts).ids
    assert text == hf_tok.decode(ours)
    assert hf_tok.tok(text, add_special_tokens=False)["input_ids"] == ours
    assert jinja_template("chatglm") is None  # layouts Jinja does not express are left out


def test_end_of_turn_ids_come_from_the_template(hf_tok):
    from miniglm.sft.templates import end_of_turn_ids

    assert end_of_turn_ids("miniglm", hf_tok) == [hf_tok.special("<|end|>")]
    assert end_of_turn_ids("chatml", hf_tok) == [hf_tok.special("<|im_end|>")]
    assert end_of_turn_ids("chatglm", hf_tok) == [hf_tok.special("<eop>")]
    assert end_of_turn_ids("alpaca", hf_tok) == []  # </s> is the tokenizer's end-of-text already


def test_prepare_holds_out_raw_test_records(tmp_path, world_dir, bpe_dir):
    from miniglm.cli import main
    from miniglm.evaluate import load_examples

    args = ["sft", "prepare", "--data", str(world_dir / "sft_train.jsonl"), "--tokenizer", str(bpe_dir),
            "--max-len", "64", "--out", str(tmp_path / "data")]
    assert main([*args, "--test-count", "5"]) == 2  # a held-out share needs somewhere to go
    assert main([*args, "--test-out", str(tmp_path / "test.jsonl"), "--test-count", "5"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["test_records"] == 5
    assert meta["train_records"] + meta["val_records"] + meta["dropped"] + 5 == meta["records"]
    examples = load_examples(tmp_path / "test.jsonl")  # unrendered: what `miniglm eval --data` reads
    assert len(examples) == 5 and all("fact" in ex.extra and ex.references[0] for ex in examples)
    assert main([*args, "--test-out", str(tmp_path / "t2.jsonl"), "--test-fraction", "0.1"]) == 0
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["test_records"] == round(meta["records"] * 0.1)
