"""Real pretrained weights: SmolLM2-135M-Instruct (Q4_1 GGUF) imported as a MiniGLM run, checked against
transformers' own GGUF loader. Skipped when the shared file is absent; the import runs once per session."""

import json

import pytest
import torch

from miniglm.cli import main
from tests.conftest import SMOLLM2_GGUF

pytestmark = pytest.mark.usefixtures("one_thread")  # a shared 2-core machine: one thread each is fastest
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def reference(smollm2_run):
    """transformers' GGUF loader on the same file: (model, tokenizer)."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(SMOLLM2_GGUF.parent), SMOLLM2_GGUF.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def run(smollm2_run):
    from miniglm.chat import load_run

    return load_run(smollm2_run, device="cpu")


def test_logits_match_transformers(run, reference):
    hf, _ = reference
    tok = run.engine.tokenizer
    prompts = [tok.encode("The quick brown fox jumps over the lazy dog. In 2024, 17 + 25 = 42."),
               tok.encode("滚滚长江东逝水，浪花淘尽英雄。"),
               run.prompt([{"role": "user", "content": "def fib(n):\n    return n if n < 2 else fib(n - 1)"}])[0]]
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            ours, theirs = run.engine.model(x)[0], hf(x).logits
            # The same dequantized weights through other code: 30 layers of other summation orders and BLAS
            # kernels (which differ between CPUs) on logits of size ~30-45. Measured ~4e-6 of their size;
            # 3e-5 of it (~250 float32 roundings). A mis-mapped weight moves them by O(their size).
            assert (ours - theirs).abs().max() <= 3e-5 * theirs.abs().max()
            # the same argmax at every position: exact, token ids; safe across CPUs because the closest top two
            # logits in these prompts are ~3e-3 apart, ~30 times the rounding differences above (~1e-4)
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_tokenizer_matches_the_model(run, reference):
    _, hf_tok = reference
    tok = run.engine.tokenizer
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # smollm: every digit alone
    assert tok.encode("in 2024") == [254, 216, 34, 32, 34, 36]
    assert [tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")] == [1, 2]  # control tokens whole
    typed = "<|im_start|>user\nHi<|im_end|>"  # typed as text, they stay text (only the template makes them)
    assert tok.encode(typed) == hf_tok(typed, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not {1, 2} & set(tok.encode(typed)) and tok.decode(tok.encode(typed)) == typed
    for text in ["你好，世界！今天天气很好。", "def f(x):\n    return x ** 2", "emoji 🙂👍🏽 and ü"]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("你好") == [18645, 250, 48392, 138]


def test_chat_prompt_and_greedy_decoding_match_transformers(run, reference):
    from miniglm.engine import SamplingParams

    hf, hf_tok = reference
    ids, stops = run.prompt(FRANCE)  # the model's own template: its default system prompt included
    assert ids == list(hf_tok.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert run.engine.tokenizer.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert stops == [2] and run.engine.tokenizer.token_id("<|im_end|>") == 2

    story, _ = run.prompt([{"role": "user", "content": "Write a long story about a dragon."}])
    ours = run.engine.generate([story], SamplingParams(max_new_tokens=32, stop_ids=stops))[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([story]), max_new_tokens=32, do_sample=False)[0, len(story):].tolist()
    assert len(ours.ids) == 32 and ours.ids == theirs  # token ids, exact: each step's top two >= 0.016 apart


def test_generate_answers_paris_and_stops_at_im_end(smollm2_run, capsys):
    assert main(["generate", "--run", str(smollm2_run), "--prompt", FRANCE[0]["content"], "--jsonl"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["output"] and out["finish_reason"] == "stop"
    assert "<|im_end|>" not in out["output"]


def test_hf_export_keeps_logits(run, smollm2_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", "--run", str(smollm2_run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids, _ = run.prompt(FRANCE)
    with torch.no_grad():
        want = run.engine.model(torch.tensor([ids]))[0]
        # transformers' Llama against ours, as in test_logits_match_transformers: logits of size ~40, measured
        # ~2e-6 of it (an absolute 1e-4 was within 20% of failing); 3e-5 of it, ~250 float32 roundings
        assert (hf(torch.tensor([ids])).logits - want).abs().max() <= 3e-5 * want.abs().max()
    eos = hf.generation_config.eos_token_id
    assert 2 in (eos if isinstance(eos, list) else [eos])  # generate() stops at <|im_end|>
    assert hf.config.bos_token_id == 1  # <|im_start|>, as the GGUF export says (test_gguf_export_reads_back)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = hf_tok.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    assert text == run.engine.tokenizer.decode(ids)


def test_gguf_export_reads_back(run, smollm2_run, tmp_path):
    """f32 only (q8_0 of 135M quantizes for ~14 s; the tensor types are checked on the demo model)."""
    import gguf

    out = tmp_path / "m.gguf"
    assert main(["export", "--run", str(smollm2_run), "--to", "gguf", "--out", str(out)]) == 0
    r = gguf.GGUFReader(str(out))
    keys = ("tokenizer.ggml.pre", "tokenizer.ggml.model", "llama.block_count", "llama.attention.head_count_kv",
            "llama.rope.freq_base", "llama.context_length", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.padding_token_id")
    meta = {k: r.fields[k].contents() for k in keys}
    assert meta == {"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.model": "gpt2", "llama.block_count": 30,
                    "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
                    "llama.context_length": 2048, "tokenizer.ggml.bos_token_id": 1,  # <|im_start|>
                    "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 2,  # <|im_end|>
                    "tokenizer.ggml.padding_token_id": 2}
    # the model's own Jinja template, as the source GGUF carries it
    source = gguf.GGUFReader(str(SMOLLM2_GGUF)).fields["tokenizer.chat_template"].contents()
    assert r.fields["tokenizer.chat_template"].contents() == source == run.engine.tokenizer.tok.chat_template
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 49152
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 + 30 * 9 and "output.weight" not in tensors
    assert list(tensors["token_embd.weight"].shape) == [576, 49152]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [576, 192]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [1536, 576]
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_llama_cpp_reads_our_tokens_and_decodes_as_the_engine(run, smollm2_run, tmp_path):
    """With the [llama] extra: llama.cpp tokenizes like our rebuilt tokenizer (on the original file), and on
    our F32 export greedy-decodes the engine's tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from miniglm.engine import SamplingParams

    tok = run.engine.tokenizer
    original = llama_cpp.Llama(model_path=str(SMOLLM2_GGUF), n_ctx=256, vocab_only=True, verbose=False)
    for text in ["in 2024, 17 + 25 = 42", "你好，世界！今天天气很好。", "def f(x):\n    return x ** 2", "emoji 🙂👍🏽"]:
        assert original.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    out = tmp_path / "m.gguf"
    assert main(["export", "--run", str(smollm2_run), "--to", "gguf", "--out", str(out)]) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=1, verbose=False)
    ids, stops = run.prompt(FRANCE)
    ours = run.engine.generate([ids], SamplingParams(max_new_tokens=24, stop_ids=stops))[0].ids
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if t in stops or len(theirs) == 24:
            break
        theirs.append(t)
    assert theirs == ours
