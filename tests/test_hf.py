"""Fine-tuning Hugging Face models (miniglm.hf, `miniglm finetune`), offline: tiny random models built from
configs of each family's architecture, saved with save_pretrained and loaded by path."""

import csv
import json
from pathlib import Path

import pytest
import torch

from miniglm.cli import main
from miniglm.fileio import UserError
from miniglm.finetune import FinetuneOptions, finetune
from miniglm.hf import FAMILIES, detect_family, load_model

from .conftest import SHARED_DATA, shared_file

FAMILY_OF = {"bloom": "bloom", "gpt2": "gpt2", "opt": "opt", "llama": "llama", "qwen2": "qwen2",
             "gpt2-chinese": "gpt2-chinese"}
CHINESE = "你好世界酒店房间很大早餐太差干净服务不错位置方便前台热情价格贵一般推荐下次还会来正面负面评论情感"


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_config(arch: str, vocab: int, eos: int, pad: int | None):
    from transformers import BloomConfig, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    common = {"vocab_size": vocab, "eos_token_id": eos, "bos_token_id": eos, "pad_token_id": pad,
              "initializer_range": 0.2}  # wide weights: varied greedy output, not one repeated token
    if arch == "bloom":
        return BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    if arch in ("gpt2", "gpt2-chinese"):
        extra = {"tokenizer_class": "BertTokenizer"} if arch == "gpt2-chinese" else {}  # as uer's config.json
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **extra, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=32, **common)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, **common)


def _tokenizer(arch: str, bpe_dir: Path, root: Path):
    """The repo's byte-level BPE as a PreTrainedTokenizerFast; a BERT-style character vocab for gpt2-chinese."""
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    if arch == "gpt2-chinese":
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"0123456789:,.!?，。！", *"abcdefghijklmnopqrstuvwxyz",
                 "tweet", "text", "label", "question", "answer", *dict.fromkeys(CHINESE)]
        (root / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n", encoding="utf-8")
        return BertTokenizer(vocab=str(root / "vocab.txt"), tokenize_chinese_chars=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    if arch == "bloom":
        tok.pad_token = "<|pad|>"  # the others have no pad: pad = EOS
    if arch == "qwen2":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def make_hf_model(root: Path, arch: str, bpe_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    out = root / arch
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(arch, bpe_dir, out)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(arch, len(tok), eos, tok.pad_token_id))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def write_csv(path: Path, n: int = 24, chinese: bool = False) -> Path:
    """Classification as generation, RAFT-shaped: a text column and a label column."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Tweet text", "Label", "ID"])
        for i in range(n):
            bad = i % 3 != 0
            if chinese:
                text = ("早餐太差" if bad else "房间干净") + "服务" * (i % 4)
                label = "负面" if bad else "正面"
            else:
                text = f"tweet {i}: " + ("the service is bad, fix it" if bad else "thanks, all good")
                label = "complaint" if bad else "no complaint"
            w.writerow([text, label, i])
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, bpe_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    return {arch: make_hf_model(root, arch, bpe_dir) for arch in FAMILY_OF}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models) -> dict[str, Path]:
    """A short LoRA fine-tune of every family on the same task."""
    root = tmp_path_factory.mktemp("hf_runs")
    en, zh = write_csv(root / "en.csv"), write_csv(root / "zh.csv", chinese=True)
    out = {}
    for arch, path in models.items():
        data = zh if arch == "gpt2-chinese" else en
        out[arch] = root / arch
        finetune(FinetuneOptions(model=str(path), data=str(data), out=str(out[arch]), columns="Tweet text,Label",
                                 val_fraction=0.1, max_len=200,
                                 overrides=["max_steps=24", "eval_every=12", "lr=1e-2", "log_every=1",
                                            "warmup_steps=2", "eval_batches=2", "threads=1"]), log=lambda *_: None)
    return out


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_detect_family():
    assert detect_family({"model_type": "bloom"}).name == "bloom"
    assert detect_family({"model_type": "gpt2", "tokenizer_class": "BertTokenizer"}).name == "gpt2-chinese"
    assert detect_family({"model_type": "qwen2"}).template == "chatml"
    assert detect_family({"model_type": "llama"}).template == "alpaca"
    assert detect_family({"model_type": "chatglm", "position_encoding_2d": True}).name == "chatglm"
    assert detect_family({"model_type": "chatglm"}).name == "chatglm2"
    assert FAMILIES["gpt2"].fan_in_fan_out and FAMILIES["bloom"].lora_targets == ("query_key_value",)
    assert detect_family({"model_type": "mistral"}, template="chatml").lora_targets == ("all-linear",)
    with pytest.raises(UserError, match="pass --template"):
        detect_family({"model_type": "mistral"})


@pytest.mark.parametrize("arch", list(FAMILY_OF))
def test_lora_finetune_lowers_loss(arch, runs):
    run = runs[arch]
    ls = losses(run)
    assert ls[24] < ls[1] - 1.0, ls
    meta = json.loads((run / "data" / "meta.json").read_text())
    family = FAMILIES[FAMILY_OF[arch]]
    assert meta["template"] == family.template and meta["padding_side"] == family.train_padding
    ckpt = run / "ckpt"
    assert {"adapter_model.safetensors", "adapter_config.json", "state.json", "optim.pt"} <= {
        p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["hf"]["family"] == family.name and state["base_model"] and state["step"] == 24
    assert json.loads((run / "chat.json").read_text())["template"] == family.template


@pytest.mark.parametrize("arch", list(FAMILY_OF))
def test_left_padded_training_forward_matches_unpadded(arch, models):
    """Training pads left for bloom/gpt2/opt: with the attention mask (and positions counted over real
    tokens, for learned absolute positions), a padded row's logits are the unpadded row's."""
    m = load_model(str(models[arch])).eval()
    short, long = torch.randint(5, m.config.vocab_size, (1, 6)), torch.randint(5, m.config.vocab_size, (1, 10))
    idx = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(idx)
    mask[0, :4] = 0
    padded, _ = m(idx, attention_mask=mask)
    # Other shapes (a batch of 2, 10 positions, masked attention) take other kernels and summation orders,
    # which also differ between CPUs: a few float32 roundings (eps 1.2e-7) of the logits' size (~4), so 1e-5
    # of it (~100 roundings); a pad attended to or a position off by 4 moves the logits by O(1).
    want_short, want_long = m(short)[0][0], m(long)[0][0]
    torch.testing.assert_close(padded[0, 4:], want_short, rtol=0, atol=1e-5 * want_short.abs().max().item())
    torch.testing.assert_close(padded[1], want_long, rtol=0, atol=1e-5 * want_long.abs().max().item())


def test_plain_template_labels_and_truncation(tmp_path, models):
    """Seed 002's layout: "Tweet text : … Label : " then the label and EOS trained; -100 on the prompt;
    a too-long tweet loses its end, never the label; pad = EOS where the tokenizer has none."""
    from miniglm.fileio import read_jsonl
    from miniglm.sft.data import prepare_sft
    from miniglm.sft.templates import TemplateOptions, render
    from miniglm.tokenizer import load_tokenizer

    data = write_csv(tmp_path / "d.csv", 6)
    rows = list(csv.reader(open(data, encoding="utf-8")))
    tok = load_tokenizer(f"hf:{models['gpt2']}")
    assert tok.pad_id == tok.eot_id  # gpt2 has no pad token
    opts = TemplateOptions(prompt_field="Tweet text", label_field="Label")
    max_len = max(len(render("plain", [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tok,
                             opts=opts).ids) for q, a, _ in rows[1:])
    rows[1][0] = "very long tweet " * 40
    with open(data, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    meta = prepare_sft(data, tok, tmp_path / "out", "plain", max_len, 0.0, opts=opts, padding_side="left",
                       columns="Tweet text,Label")
    assert meta["truncated"] == 1 and meta["padding_side"] == "left"
    for _, r in read_jsonl(tmp_path / "out" / "train.jsonl"):
        trained = [t for t in r["labels"] if t != -100]
        assert len(r["ids"]) <= max_len and trained[-1] == tok.eot_id  # the EOS label survives pad = EOS
        assert tok.decode(trained[:-1]) in ("complaint", "no complaint")
        assert tok.decode(r["ids"][:len(r["ids"]) - len(trained)]).startswith("Tweet text : ")
        assert tok.decode(r["ids"][:len(r["ids"]) - len(trained)]).endswith(" Label : ")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft 0.21 on transformers 5: is_gradient_checkpointing
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_save_load_and_merge_keep_logits(arch, tmp_path, models, runs):
    """The adapter as saved reloads to the same logits; `miniglm merge` (merge_and_unload) keeps them, and
    its folder loads with from_pretrained and as a run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from miniglm.chat import load_run
    from miniglm.hf import HFCausalLM, save_checkpoint
    from miniglm.runs import load_model as load_run_model

    m = load_model(str(models[arch]))
    m.add_lora(4, 8, 0.0)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter something to carry
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    m.eval()
    idx = torch.randint(0, 300, (2, 12))
    before = m(idx)[0]
    save_checkpoint(tmp_path / "ckpt", m, {"step": 1, "base_model": str(models[arch])})
    base = AutoModelForCausalLM.from_pretrained(str(models[arch]))
    reloaded = HFCausalLM(PeftModel.from_pretrained(base, str(tmp_path / "ckpt")), m.family).eval()
    scale = before.abs().max().item()  # logits of size ~4
    # The same modules and the adapter's weights saved bit for bit: equal on one machine (0 here); 1e-6 of
    # the logits' size leaves a few float32 roundings, far below a lost or mis-scaled adapter (O(1)).
    torch.testing.assert_close(reloaded(idx)[0], before, rtol=0, atol=1e-6 * scale)
    # Merged: W + s*B@A rounded to float32 and one matmul instead of two, in orders that differ between
    # CPUs: measured ~2e-6 of the logits' size, so 3e-5 of it (~250 float32 roundings).
    torch.testing.assert_close(load_run_model(tmp_path / "ckpt")(idx)[0], before, rtol=0, atol=3e-5 * scale)

    run = runs[arch]
    adapter = load_model(str(models[arch]))
    adapter.model = PeftModel.from_pretrained(adapter.model, str(run / "ckpt"))
    expected = adapter.eval()(idx)[0]
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    # merged weights against the adapter beside them: as above, 3e-5 of the logits' size
    torch.testing.assert_close(merged(input_ids=idx).logits, expected, rtol=0, atol=3e-5 * expected.abs().max().item())
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    out = load_run(tmp_path / "merged")  # the merged folder is a run too: template and tokenizer
    assert out.template == FAMILIES[arch].template and out.engine.tokenizer.eot_id is not None


def test_merge_keeps_the_end_tokens(tmp_path, runs):
    """A qwen2 base stops at <|endoftext|> only; tuned on chatml, the merged folder stops at <|im_end|> too,
    in config.json and generation_config.json (what transformers' generate and vLLM read)."""
    from transformers import AutoTokenizer

    assert main(["merge", str(runs["qwen2"]), "--out", str(tmp_path / "merged")]) == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    want = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    for name in ("config.json", "generation_config.json"):
        assert set(json.loads((tmp_path / "merged" / name).read_text())["eos_token_id"]) == want, name


@pytest.mark.parametrize("arch", list(FAMILY_OF))
def test_batched_generation_equals_one_by_one(arch, runs):
    from miniglm.chat import generate_texts, load_run
    from miniglm.engine import SamplingParams

    run = load_run(runs[arch])
    prompts = (["早餐太差服务服务", "房间干净", "前台热情价格贵一般推荐"] if arch == "gpt2-chinese"
               else ["tweet 1: the service is bad", "hi", "tweet 7: thanks, all good, all good"])
    params = SamplingParams(max_new_tokens=6)
    batched = list(generate_texts(run, prompts, params, batch_size=3))
    single = [next(generate_texts(run, [p], params, batch_size=1)) for p in prompts]
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert [r["completion_tokens"] for r in batched] == [r["completion_tokens"] for r in single]
    assert any(r["completion_tokens"] for r in batched)
    streamed = "".join(run.engine.stream(run.prompt([{"role": "user", "content": prompts[0]}])[0], params))
    assert streamed == single[0]["output"]


def test_gpt2_chinese_decodes_without_spaces_and_stops_at_sep(models):
    from miniglm.chat import LoadedRun
    from miniglm.engine import SamplingParams
    from miniglm.hf_engine import HFEngine
    from miniglm.sft.templates import TemplateOptions
    from miniglm.tokenizer import load_tokenizer

    tok = load_tokenizer(models["gpt2-chinese"])
    assert tok.eot_id == tok.token_id("[SEP]")
    text = "酒店很干净，早餐太差！tweet text"
    assert tok.decode(tok.encode(text)) == text
    model = load_model(str(models["gpt2-chinese"]))
    assert model.family.name == "gpt2-chinese"
    gpt2 = model.model.transformer
    with torch.no_grad():  # every position's hidden state is v, and [SEP]'s (tied) embedding points along v
        v = torch.randn(32)
        gpt2.ln_f.weight.zero_()
        gpt2.ln_f.bias.copy_(v)
        gpt2.wte.weight[tok.eot_id] = 10 * v
    run = LoadedRun(HFEngine(model, tok), "plain", TemplateOptions(), "t")
    from miniglm.chat import generate_texts

    out = next(generate_texts(run, ["房间"], SamplingParams(max_new_tokens=5)))
    assert out["finish_reason"] == "stop" and out["completion_tokens"] == 0 and out["output"] == ""


@pytest.mark.parametrize("lora_r", [0, 4])
def test_resume_continues_exactly(tmp_path, models, monkeypatch, lora_r):
    """A run interrupted after its step-4 checkpoint and rerun logs the losses of an uninterrupted run
    (full fine-tune: the HF model's save_pretrained; LoRA: the PEFT adapter; both with optimizer state)."""
    import miniglm.hf

    data = write_csv(tmp_path / "d.csv", 12)

    def run(out: Path) -> None:
        finetune(FinetuneOptions(model=str(models["opt"]), data=str(data), out=str(out), lora_r=lora_r,
                                 columns="Tweet text,Label", val_fraction=0.2, max_len=40,
                                 overrides=["max_steps=8", "eval_every=4", "lr=1e-3", "log_every=1", "warmup_steps=2",
                                            "eval_batches=1", "threads=1", "batch_size=2", "lora_dropout=0.1"]),
                 log=lambda *_: None)

    run(tmp_path / "a")
    save = miniglm.hf.save_checkpoint

    def save_then_stop(path, model, state, optimizer=None):  # Ctrl-C right after the step-4 checkpoint
        save(path, model, state, optimizer)
        if Path(path).name == "ckpt" and state["step"] == 4 and not (tmp_path / "stopped").exists():
            (tmp_path / "stopped").touch()
            raise KeyboardInterrupt

    monkeypatch.setattr(miniglm.hf, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    weights = "model.safetensors" if lora_r == 0 else "adapter_model.safetensors"
    assert (tmp_path / "b" / "ckpt" / weights).exists() and (tmp_path / "b" / "ckpt" / "optim.pt").exists()
    assert json.loads((tmp_path / "b" / "ckpt" / "state.json").read_text())["step"] == 4
    run(tmp_path / "b")  # the same command again
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(a) == list(b) == list(range(1, 9))
    # Exactly: the resumed run reloads the step-4 weights, optimizer state, RNG (dropout) and data position
    # saved bit for bit, and does the very same float32 operations in this process (one thread) as run a.
    assert a == b, (a, b)


def test_finetune_cli_end_to_end(tmp_path, models, capsys):
    data = write_csv(tmp_path / "d.csv", 12)
    argv = ["finetune", "--model", str(models["bloom"]), "--data", str(data), "--out", str(tmp_path / "run"),
            "--columns", "Tweet text,Label", "--lora-r", "4", "--max-len", "40",
            "--set", "max_steps=3", "--set", "eval_every=3", "--set", "eval_batches=1", "--set", "threads=1"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").exists()
    assert main(["generate", "--run", str(tmp_path / "run"), "--prompt", "tweet 1: bad", "--max-new-tokens", "3"]) == 0
    assert main(argv[:-2] + ["--set", "max_steps=4", "--full"]) == 2  # --full and --lora-r together
    assert "exclude each other" in capsys.readouterr().err


def test_an_architecture_outside_the_registry_needs_a_template(tmp_path, bpe_dir):
    """Mistral is no family here: with --template it fine-tunes (LoRA on all linear layers) and generates."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from miniglm.chat import generate_texts, load_run
    from miniglm.engine import SamplingParams

    path = tmp_path / "mistral"
    tok = _tokenizer("llama", bpe_dir, tmp_path)
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    data = write_csv(tmp_path / "d.csv", 8)
    opts = FinetuneOptions(model=str(path), data=str(data), out=str(tmp_path / "run"), columns="Tweet text,Label",
                           max_len=64, overrides=["max_steps=2", "eval_every=2", "eval_batches=1", "threads=1"])
    with pytest.raises(UserError, match="pass --template"):
        finetune(opts, log=lambda *_: None)
    opts.template = "plain"
    assert finetune(opts, log=lambda *_: None)["steps"] == 2
    state = json.loads((tmp_path / "run" / "ckpt" / "state.json").read_text())
    assert state["hf"]["family"] == "mistral" and state["hf"]["lora"]
    run = load_run(tmp_path / "run")
    assert len(list(generate_texts(run, ["tweet 1: bad"], SamplingParams(max_new_tokens=2)))) == 1


def test_chatglm_needs_trust_remote_code(tmp_path, capsys):
    (tmp_path / "chatglm").mkdir()
    (tmp_path / "chatglm" / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "position_encoding_2d": True,
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}}))
    data = write_csv(tmp_path / "d.csv", 4)
    code = main(["finetune", "--model", str(tmp_path / "chatglm"), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--columns", "Tweet text,Label"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--trust-remote-code" in err and "transformers 5" in err


def test_serve_refuses_hf_runs(runs):
    from miniglm.chat import load_run
    from miniglm.serve import create_app

    with pytest.raises(UserError, match="miniglm merge"):
        create_app(load_run(runs["gpt2"]))


def test_shared_classification_csvs():
    """Seed 002's two data sets as SFT records: RAFT's columns come from its task.json; ChnSentiCorp's
    1/0 labels become words to condition generation on, and its one empty review is skipped."""
    from miniglm.sft.formats import load_records

    raft = load_records(shared_file(SHARED_DATA / "classify" / "raft_twitter_complaints" / "train.csv"))
    assert len(raft) == 50 and {r.messages[1]["content"] for r in raft} == {"complaint", "no complaint"}
    assert raft[2].extra["id"] == "2" and raft[2].messages[0]["content"].startswith("If I can't get my 3rd pair")
    hotel = shared_file(SHARED_DATA / "classify" / "ChnSentiCorp_htl_all.csv")
    with pytest.raises(UserError, match="--columns"):
        load_records(hotel)
    records = load_records(hotel, "label,review", {"1": "正面", "0": "负面"})
    assert len(records) == 7765 and {r.messages[0]["content"] for r in records} == {"正面", "负面"}


def test_a_local_path_typo_never_goes_to_the_hub(tmp_path, monkeypatch):
    """What reads as a local path and is not there is one line at once (it went to the hub: a long wait
    offline, then "(OSError)"); an ORG/NAME stays a hub name."""
    from miniglm.hf import read_hf_config
    from miniglm.hf_weights import check_model_ref, from_hf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for ref in ("runs/tpyo", "./model", "a/b/c", str(tmp_path / "nope")):
        for load in (read_hf_config, from_hf):
            with pytest.raises(UserError, match="no such model folder"):
                load(ref)
    assert check_model_ref("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"
