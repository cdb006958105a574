import os

import pytest
import torch

from miniglm.engine import Engine, SamplingParams
from miniglm.fileio import UserError
from miniglm.model import MiniGLM, ModelConfig
from miniglm.tokenizer import load_tokenizer
from tests.helpers import favours_special_tokens, tiny


def engine(bpe_dir, style="llama", block_size=96) -> Engine:
    return Engine(tiny(style, vocab_size=400, block_size=block_size), load_tokenizer(bpe_dir))


def no_cache_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_greedy_equals_argmax_of_full_forward(bpe_dir, style):
    eng = engine(bpe_dir, style)
    prompt = eng.tokenizer.encode("司徒沧霄的师父是")
    out = eng.generate([prompt], SamplingParams(max_new_tokens=30))[0]
    assert out.ids == no_cache_greedy(eng.model, prompt, 30)
    assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_batch_equals_one_at_a_time(bpe_dir, style):
    eng = engine(bpe_dir, style)
    prompts = [eng.tokenizer.encode(t) for t in ["天下", "司徒沧霄与蔡尘淑是至交好友。他的兵器", "江湖上称"]]
    params = SamplingParams(max_new_tokens=20)
    batched = eng.generate(prompts, params)
    for p, b in zip(prompts, batched, strict=True):
        assert eng.generate([p], params)[0].ids == b.ids


def test_stop_token_and_string_end_a_sequence(bpe_dir):
    eng = engine(bpe_dir)
    prompt = eng.tokenizer.encode("天下大势")
    free = eng.generate([prompt], SamplingParams(max_new_tokens=20))[0]
    stop = free.ids[5]
    out = eng.generate([prompt], SamplingParams(max_new_tokens=20, stop_ids=[stop]))[0]
    assert out.ids == free.ids[:free.ids.index(stop)] and out.finish_reason == "stop"
    assert stop not in out.ids
    text = free.text
    needle = text[len(text) // 2:len(text) // 2 + 2]
    out = eng.generate([prompt], SamplingParams(max_new_tokens=20, stop_strings=[needle]))[0]
    assert out.text == text[:text.find(needle)] and out.finish_reason == "stop"
    chunks = list(eng.stream(prompt, SamplingParams(max_new_tokens=20, stop_strings=[needle])))
    assert "".join(chunks) == out.text


def test_stream_joins_to_the_whole_and_never_splits_characters(bpe_dir):
    eng = engine(bpe_dir)
    for seed in range(5):
        params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed)
        prompt = eng.tokenizer.encode("龘")
        whole = eng.generate([prompt], params)[0]
        chunks = list(eng.stream(prompt, params))
        shown = [i for i in whole.ids if i not in eng.tokenizer.all_special_ids]
        # the sampler keeps the text valid; a character the token limit cut short is dropped, not shown as U+FFFD
        assert "".join(chunks) == whole.text == eng.tokenizer.decode(shown).removesuffix("\ufffd")
        assert not any("\ufffd" in c for c in chunks)


def test_sampling_is_seeded_and_filters_work(bpe_dir):
    eng = engine(bpe_dir)
    prompt = eng.tokenizer.encode("天下")
    p = SamplingParams(max_new_tokens=15, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)
    assert eng.generate([prompt], p)[0].ids == eng.generate([prompt], p)[0].ids
    p2 = SamplingParams(max_new_tokens=15, temperature=0.9, top_k=1, seed=1)
    assert eng.generate([prompt], p2)[0].ids == eng.generate([prompt], SamplingParams(max_new_tokens=15))[0].ids


def test_prompt_past_the_context(bpe_dir):
    eng = engine(bpe_dir, block_size=32)
    long = list(range(10, 40))
    with pytest.raises(UserError, match="past the context"):
        eng.generate([long], SamplingParams(max_new_tokens=8))
    out = eng.generate([long], SamplingParams(max_new_tokens=8, trim_prompt=True))[0]
    assert len(out.ids) == 8 and out.prompt_tokens == 24


def test_int8_engine_runs_and_stays_close(bpe_dir):
    eng = engine(bpe_dir)
    q = Engine(eng.model, eng.tokenizer, int8=True)  # a decoding copy quantized again: fine
    prompt = eng.tokenizer.encode("司徒沧霄的师父是")
    with torch.no_grad():
        full = eng.model(torch.tensor([prompt]))[0][0, -1]
        quant = q.model(torch.tensor([prompt]))[0][0, -1]
    assert torch.allclose(full, quant, atol=0.05)  # int8 weights and activations: small logit changes
    assert len(q.generate([prompt], SamplingParams(max_new_tokens=10))[0].ids) == 10


def test_int8_greedy_tokens_mostly_agree_with_fp32():
    """A trained-looking model (random weights would make near-ties everywhere): a tiny model memorises one
    sequence, then int8 decoding follows fp32's greedy tokens at >= 95% of the positions."""
    from miniglm.engine import Int8Linear

    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(vocab_size=128, block_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    seq = torch.randint(1, 128, (1, 100))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(seq[:, :-1], targets=seq[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = SamplingParams(max_new_tokens=90)
    fp32 = Engine(model, _Ids()).generate([seq[0, :10].tolist()], params)[0].ids
    int8 = Engine(model, _Ids(), int8=True)
    assert isinstance(int8.model.lm_head, Int8Linear)
    got = int8.generate([seq[0, :10].tolist()], params)[0].ids
    assert sum(a == b for a, b in zip(got, fp32, strict=True)) >= 0.95 * len(fp32)


class _Ids:
    pad_id = eot_id = 0
    vocab_size = 128
    all_special_ids: frozenset[int] = frozenset()

    def token_bytes(self, i: int) -> bytes:
        return b"x"


@pytest.mark.parametrize("int8", [False, True])
def test_decode_step_equals_the_models_forward(int8):
    """DecodeStep (the engine's flat step) gives the decoding copy's MiniGLM.forward logits, at batch 1
    and over left-padded rows."""
    from miniglm.model import KVCache

    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    with torch.no_grad():  # as a trained model: norms' scales not 1, attention sharp enough that RoPE matters
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20)
    eng = Engine(model, _Ids(), int8=int8)
    idx = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    for rows in (idx[:1], idx):
        a, b = (KVCache(model.config, len(rows), 12) for _ in range(2))
        m = None if len(rows) == 1 else mask
        with torch.no_grad():
            eng.model(rows, attention_mask=m, cache=a)
            eng.model(rows, attention_mask=m, cache=b)
            for t in range(6):
                nxt = torch.full((len(rows),), 10 + t)
                want = eng.model(nxt[:, None], cache=a)[0][:, -1]
                got = eng.forward_step(nxt, b)
                # The two paths sum the same products in other orders and other BLAS kernels (which differ
                # between CPUs, AMD and Intel): each value is off by a few float32 roundings (eps 1.2e-7)
                # of sums whose size is that of the largest values: 1e-5 of it leaves ~100 roundings of room.
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(b.k, a.k, rtol=0, atol=1e-5 * a.k.abs().max().item())  # the same reasoning
        assert a.pos == b.pos


def test_special_tokens_stay_out_of_the_text(bpe_dir):
    """A random model made to favour special tokens: generate and stream leave them out of the text by
    default (as vLLM's skip_special_tokens), and keep them when asked."""
    tok = load_tokenizer(bpe_dir)
    eng = Engine(favours_special_tokens(tok), tok)
    prompt = tok.encode("天下大势")
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)  # a seed whose sample has some
    out = eng.generate([prompt], params)[0]
    assert set(out.ids) & tok.all_special_ids  # the model did produce some
    assert "<|" not in out.text and "".join(eng.stream(prompt, params)) == out.text
    kept = eng.generate([prompt], SamplingParams(**{**params.__dict__, "skip_special_tokens": False}))[0]
    assert kept.ids == out.ids and kept.text == tok.decode(out.ids).removesuffix("\ufffd") and "<|" in kept.text


def test_decoding_copy_keeps_logits_and_the_callers_model():
    """for_decoding's copy: the same logits in either weight layout, the caller's model untouched and
    sharing no storage with it."""
    from miniglm import engine as engine_mod

    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(style="llama", vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2,
                                n_embd=32)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = model(x)[0]
        for transposed in (True, False):
            fast = engine_mod.for_decoding(model, transposed)
            qkv = fast.model.layers[0].self_attn.qkv_proj
            assert qkv.weight.shape == ((32, 64) if transposed else (64, 32))
            for rows in (x[:, :1], x):
                assert torch.allclose(fast(rows)[0], want[:, :rows.size(1)], atol=1e-5)
            mine = {p.data_ptr() for p in model.parameters()}
            assert not mine & {p.data_ptr() for p in fast.parameters()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.skipif(not os.environ.get("MINIGLM_COMPILE_TESTS"), reason="compiles for tens of seconds: set "
                    "MINIGLM_COMPILE_TESTS=1 (bench/decode.py --compile measures it)")
def test_compiled_step_gives_the_eager_tokens():
    """--compile: the same greedy tokens as eager decoding, across a length bucket (256) and with padding."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(vocab_size=97, block_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    prompts, params = [[5, 6, 7, 8, 9], [3, 4, 5]], SamplingParams(max_new_tokens=280)
    eager = Engine(model, _Ids(), device=device, graphs=False).generate(prompts, params)
    compiled = Engine(model, _Ids(), device=device, compile=True).generate(prompts, params)
    assert [c.ids for c in compiled] == [e.ids for e in eager]
    if device == "cpu":  # int8: the compiled step fuses the activations' quantization; the same logits to rounding
        eager8 = Engine(model, _Ids(), int8=True)
        compiled8 = Engine(model, _Ids(), int8=True, compile=True)
        want, got = (eng.generate(prompts, SamplingParams(max_new_tokens=40)) for eng in (eager8, compiled8))
        assert [g.ids for g in got] == [w.ids for w in want]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_graph_steps_give_the_plain_tokens(device):
    """graphs=True (CUDA's default: each step replayed as a CUDA graph; on the CPU the same static buffers
    without one): the plain step's greedy tokens, across a length bucket (256), with left padding, twice
    (the kept cache emptied and reused, its graphs replayed), and for two streams read in turn (the second
    gets a cache of its own)."""
    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(vocab_size=97, block_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    prompts, params = [[5, 6, 7, 8, 9], [3, 4, 5]], SamplingParams(max_new_tokens=280)
    plain = Engine(model, _Ids(), device=device, graphs=False)
    graphed = Engine(model, _Ids(), device=device, graphs=True)
    want = [c.ids for c in plain.generate(prompts, params)]
    for _ in range(2):
        assert [c.ids for c in graphed.generate(prompts, params)] == want
    assert list(graphed.caches) == [(2, 300)] and len(graphed.decode_step.captured) == 2  # buckets 256 and 300
    short = SamplingParams(max_new_tokens=20)
    one, two = graphed.stream([5, 6, 7], short), graphed.stream([3, 4], short)
    a, b = zip(*[(next(one, ""), next(two, "")) for _ in range(25)], strict=True)
    assert "".join(a) == plain.generate([[5, 6, 7]], short)[0].text
    assert "".join(b) == plain.generate([[3, 4]], short)[0].text
