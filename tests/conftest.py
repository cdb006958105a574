from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
CL100K_FILE = SHARED_DATA / "tokenizers" / "cl100k_base.tiktoken"
SMOLLM2_GGUF = SHARED_DATA / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SAMPLE_ZH = (
    "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。及秦灭之后，楚、汉分争，又并入于汉。"
    "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。青山依旧在，几度夕阳红。"
    "白发渔樵江渚上，惯看秋月春风。一壶浊酒喜相逢。古今多少事，都付笑谈中。"
    "Mixed English text, numbers 12345 and emoji 🙂 too."
)


def shared_file(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) imported once per session: a real pretrained llama-style run."""
    from miniglm.gguf_import import import_gguf

    out = tmp_path_factory.mktemp("smollm2") / "run"
    import_gguf(shared_file(SMOLLM2_GGUF), out)
    return out


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    from miniglm.world import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, characters=60, bios_per_character=3, seed=7)
    return out


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, world_dir) -> Path:
    """A small byte-level BPE: its vocab is too small for many characters, so they split into bytes."""
    from miniglm.corpus import load_documents
    from miniglm.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok") / "bpe"
    texts = [r for r in load_documents(world_dir / "corpus.jsonl")] + [SAMPLE_ZH] * 3
    train_bpe(texts, 400, out)
    return out


def make_chat_run(root: Path, bpe_dir: Path, block_size: int, n_layer: int) -> Path:
    """A random-weight MiniGLM run folder with the test BPE and the native chat template."""
    import torch

    from miniglm.checkpoint import save_checkpoint
    from miniglm.fileio import write_json
    from miniglm.model import MiniGLM, ModelConfig
    from miniglm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = MiniGLM(ModelConfig(vocab_size=400, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=32))
    save_checkpoint(root / "run" / "ckpt", model, model.config, {"step": 1})
    load_tokenizer(bpe_dir).save(root / "run" / "tokenizer")
    write_json(root / "run" / "chat.json", {"template": "miniglm", "template_options": {}})
    return root / "run"


def chat_run_fixture(block_size: int, n_layer: int, scope: str = "module"):
    """A test module's `run_dir` fixture: a make_chat_run run of this size, made once per scope.
    Assign it in the module: `run_dir = chat_run_fixture(block_size=64, n_layer=1)`."""

    @pytest.fixture(scope=scope, name="run_dir")
    def run_dir(tmp_path_factory, bpe_dir) -> Path:
        return make_chat_run(tmp_path_factory.mktemp("run"), bpe_dir, block_size=block_size, n_layer=n_layer)

    return run_dir


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is far faster than two fighting for it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
