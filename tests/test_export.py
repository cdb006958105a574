import pytest
import torch

from miniglm.checkpoint import save_checkpoint
from miniglm.cli import main
from miniglm.hf_weights import from_hf
from miniglm.model import MiniGLM, ModelConfig
from tests.helpers import tiny


@pytest.mark.parametrize("style,tied", [("gpt2", True), ("llama", True), ("llama", False)])
def test_export_to_transformers_keeps_logits(tmp_path, style, tied, bpe_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miniglm.tokenizer import load_tokenizer

    model = tiny(style, vocab_size=400, tie_embeddings=tied).eval()  # the test BPE's 400 ids
    with torch.no_grad():  # non-zero norm weights so a mix-up would show
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(tmp_path / "run" / "ckpt", model, model.config, {"step": 0})
    load_tokenizer(bpe_dir).save(tmp_path / "run" / "tokenizer")
    (tmp_path / "run" / "chat.json").write_text('{"template": "miniglm"}')
    assert main(["export", "--run", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        want = model(idx)[0]
        # transformers' modules sum the same products in other orders (and other BLAS kernels, which differ
        # between CPUs): a few float32 roundings (eps 1.2e-7) of the logits' size (here ~1): 1e-5 of it
        # leaves ~100 roundings of room; a mis-mapped weight (transposed, q/k unpermuted) moves them by O(1).
        torch.testing.assert_close(hf(idx).logits, want, rtol=0, atol=1e-5 * want.abs().max().item())
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok.eos_token == "<|endoftext|>"
    # the run's chat template travels as a Jinja chat_template that renders the same text
    from miniglm.sft.templates import render

    chat = [{"role": "system", "content": "你是侠客。"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "幸会。"}, {"role": "user", "content": "师父是谁？"}]
    ours = load_tokenizer(bpe_dir)
    expected = ours.decode(render("miniglm", chat, ours, add_generation_prompt=True).ids)
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    back = from_hf(tmp_path / "hf").eval()  # and back again
    with torch.no_grad():
        # Back to MiniGLM: the weights copied bit for bit and the same code, so equal on one machine (0 here);
        # 1e-6 of the logits' size leaves a few roundings, far below what any mis-mapped weight would do.
        torch.testing.assert_close(back(idx)[0], want, rtol=0, atol=1e-6 * want.abs().max().item())


def test_from_hf_refuses_other_architectures(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from miniglm.fileio import UserError

    OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16)).save_pretrained(
        str(tmp_path / "opt"))
    with pytest.raises(UserError, match="not a MiniGLM architecture"):
        from_hf(tmp_path / "opt")


def test_gguf_export_reads_back(tmp_path, bpe_dir):
    import gguf
    import numpy as np

    from miniglm.export import permute_for_gguf
    from miniglm.tokenizer import load_tokenizer

    tok = load_tokenizer(bpe_dir)
    tok.save(tmp_path / "run" / "tokenizer")
    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(style="llama", vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4,
                                n_kv_head=2, n_embd=32)).eval()
    save_checkpoint(tmp_path / "run" / "ckpt", model, model.config, {"step": 0})
    assert main(["export", "--run", str(tmp_path / "run"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {f.name: f for f in r.fields.values()}

    def scalar(name):
        f = fields[name]
        return f.parts[f.data[0]][0]

    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert scalar("llama.block_count") == 2 and scalar("llama.attention.head_count_kv") == 2
    assert scalar("tokenizer.ggml.eos_token_id") == tok.eot_id
    assert len(fields["tokenizer.ggml.tokens"].data) == tok.vocab_size
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors and len(tensors) == 2 + 9 * 2
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    k = model.model.layers[1].self_attn.k_proj.weight.detach()
    got_q = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(q.shape)
    got_k = np.asarray(tensors["blk.1.attn_k.weight"].data).reshape(k.shape)
    # F32 tensors are the weights copied (q/k rows reordered), so equal: np.allclose's default rtol=1e-5 is
    # relative to each weight and far below what a wrong permutation or transpose changes (whole weights).
    assert np.allclose(got_q, permute_for_gguf(q, 4).numpy()) and np.allclose(got_k, permute_for_gguf(k, 2).numpy())
    emb = np.asarray(tensors["token_embd.weight"].data).reshape(tok.vocab_size, 32)
    assert np.allclose(emb, model.model.embed_tokens.weight.detach().numpy())

    # Q8_0: matrices quantized in blocks of 32 (dequantized within half a step of the weights), norms F32
    out = str(tmp_path / "q8.gguf")
    assert main(["export", "--run", str(tmp_path / "run"), "--to", "gguf", "--outtype", "q8_0", "--out", out]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    t = tensors["blk.1.attn_k.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    got_k = gguf.quants.dequantize(t.data, t.tensor_type).reshape(k.shape)
    want = permute_for_gguf(k, 2).numpy().reshape(-1, 32)
    step = np.abs(want).max(1, keepdims=True) / 127  # the block's scale d, computed in float32
    step16 = step.astype(np.float16).astype(np.float32)  # d as stored (f16: off by up to 2^-11 of itself)
    # got = q * d16 with q = round(w / d): |got - w| <= 0.5 d + |q| |d16 - d|, |q| <= 127; all relative to each
    # block's d, plus 1e-4 d for float32 roundings in w / d and q * d16. A transposed or unpermuted tensor
    # is off by hundreds of steps.
    assert (np.abs(got_k.reshape(-1, 32) - want) <= 0.5 * step + 127 * np.abs(step16 - step) + 1e-4 * step).all()


@pytest.mark.parametrize("han_chars", [False, True])
def test_gguf_matches_llama_cpp(tmp_path, bpe_dir, world_dir, han_chars):
    """llama.cpp (llama-cpp-python, an optional extra) tokenizes identically and greedy-decodes the same tokens;
    a --han-chars tokenizer too (its merges never cross a character, so llama.cpp's gpt-2 split agrees)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from miniglm.corpus import load_documents
    from miniglm.engine import Engine, SamplingParams
    from miniglm.tokenizer import load_tokenizer, train_bpe

    tok = load_tokenizer(bpe_dir)
    if han_chars:
        tok = train_bpe(load_documents(world_dir / "corpus.jsonl"), 1000, tmp_path / "han", han_chars=True)
    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(style="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4,
                                n_kv_head=2, n_embd=64)).eval()
    save_checkpoint(tmp_path / "run" / "ckpt", model, model.config, {"step": 0})
    tok.save(tmp_path / "run" / "tokenizer")
    main(["export", "--run", str(tmp_path / "run"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")])
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False)
    text = "司徒沧霄与蔡尘淑是至交好友。Hello 123"
    ids = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    ours = Engine(model, tok).generate([ids], SamplingParams(max_new_tokens=16))[0].ids
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == 16:
            break
    assert theirs == ours


def overfit_chat_run(root, bpe_dir):
    """A tiny llama-style SFT run (native template) that has learnt one 2-turn chat by heart, after the
    first answer's <|end|> too: an export that stops only at <|endoftext|> would run on into turn two.
    Returns the run, the first question's prompt ids and the answer's ids."""
    from miniglm.fileio import write_json
    from miniglm.sft.templates import render
    from miniglm.tokenizer import load_tokenizer

    tok = load_tokenizer(bpe_dir)
    chat = [{"role": "user", "content": "孙悟空的师父是谁？"}, {"role": "assistant", "content": "菩提祖师。"},
            {"role": "user", "content": "他的兵器呢？"}, {"role": "assistant", "content": "金箍棒。"}]
    ids = torch.tensor([render("miniglm", chat, tok).ids])
    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(style="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                                n_kv_head=1, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = root / "run"
    save_checkpoint(run / "ckpt", model.eval(), model.config, {"step": 150})
    tok.save(run / "tokenizer")
    write_json(run / "chat.json", {"template": "miniglm", "template_options": {}})
    prompt = render("miniglm", chat[:1], tok, add_generation_prompt=True).ids
    return run, prompt, tok.encode("菩提祖师。")


def test_exported_chat_model_stops_after_its_answer(tmp_path, bpe_dir, one_thread):
    """transformers' generate on an exported SFT run stops at <|end|> (config and generation_config list
    it beside <|endoftext|>); the GGUF names it as EOT and carries the chat template."""
    import json

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miniglm.sft.templates import jinja_template
    from miniglm.tokenizer import load_tokenizer

    run, prompt, answer = overfit_chat_run(tmp_path, bpe_dir)
    tok = load_tokenizer(bpe_dir)
    end, eot = tok.special("<|end|>"), tok.eot_id
    assert main(["export", "--run", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "hf" / name).read_text())["eos_token_id"] == [eot, end], name
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0].tolist()
    assert out[len(prompt):] == [*answer, end]  # the answer, its end of turn, and nothing after
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    chat = [{"role": "user", "content": "孙悟空的师父是谁？"}]
    rendered = hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    assert list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered) == prompt

    assert main(["export", "--run", str(run), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    eot_field = fields["tokenizer.ggml.eot_token_id"]
    assert eot_field.parts[eot_field.data[0]][0] == end
    assert bytes(fields["tokenizer.chat_template"].parts[-1]).decode() == jinja_template("miniglm")


def test_finetune_takes_a_miniglm_export(tmp_path, bpe_dir, world_dir):
    """A miniglm run exported to transformers fine-tunes with `miniglm finetune`: the data it prepares
    and the training that reads it see one tokenizer (a local folder loads the same way in both)."""
    from .conftest import make_chat_run

    run = make_chat_run(tmp_path, bpe_dir, block_size=64, n_layer=1)
    assert main(["export", "--run", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    argv = ["finetune", "--model", str(tmp_path / "hf"), "--data", str(world_dir / "sft_train.jsonl"), "--template",
            "miniglm", "--out", str(tmp_path / "ft"), "--set", "max_steps=1", "--set", "eval_batches=1"]
    assert main(argv) == 0
    assert (tmp_path / "ft" / "ckpt" / "state.json").exists()
