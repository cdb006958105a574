"""SFT preparation figures: padding efficiency with and without packing (oaast_sft_zh.json and the
world's Q&A), and how many records each template truncates at --max-len 512.

A byte-level BPE is trained on the SFT text itself, with the special tokens of every template, so
each template renders with its own markers.

    .venv/bin/python bench/sft_prepare.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, record, table  # noqa: E402

from miniglm import world  # noqa: E402
from miniglm.sft.data import prepare_sft  # noqa: E402
from miniglm.sft.formats import load_records  # noqa: E402
from miniglm.sft.templates import TEMPLATES  # noqa: E402
from miniglm.tokenizer import load_tokenizer  # noqa: E402

EXTRA = ["[gMASK]", "<sop>", "<eop>", "sop", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]


def tokenizer_for(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from miniglm.tokenizer import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=SPECIAL_TOKENS + EXTRA,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<|pad|>").save_pretrained(str(out))
    return load_tokenizer(out)


def main() -> None:
    oaast = SHARED_DATA / "sft" / "oaast_sft_zh.json"
    if not oaast.exists():
        sys.exit(f"{oaast} is absent")
    tmp = Path(tempfile.mkdtemp(prefix="miniglm-sft-"))
    world.build_world(tmp / "world", characters=500, bios_per_character=1)
    texts = [m["content"] for r in load_records(oaast) for m in r.messages]
    tok = tokenizer_for(texts + [m["content"] for r in load_records(tmp / "world" / "sft_train.jsonl")
                                 for m in r.messages], tmp / "tok")

    rows = []
    for name, data in [("oaast_sft_zh.json", oaast), ("world sft_train.jsonl", tmp / "world" / "sft_train.jsonl")]:
        t0 = time.perf_counter()
        m = prepare_sft(data, tok, tmp / "packed", "miniglm", max_len=512, packing=True)
        rows.append([name, m["records"], f"{m['tokens']:,}", f"{m['padding_efficiency']:.1%}",
                     f"{m['packed_padding_efficiency']:.1%}", m["sequences"], f"{time.perf_counter() - t0:.1f}"])
    body = table(["data (miniglm template, max-len 512)", "records", "tokens", "padding eff.", "packed eff.",
                  "packed sequences", "s"], rows)
    trunc = []
    for template in TEMPLATES:
        if template == "hf":
            continue  # needs a tokenizer with a chat_template
        m = prepare_sft(oaast, tok, tmp / template, template, max_len=512)
        trunc.append([template, m["records"], m["truncated"], m["dropped"], f"{m['tokens']:,}"])
    body += "\n\noaast_sft_zh.json at --max-len 512, per template:\n\n"
    body += table(["template", "records", "truncated", "dropped", "tokens"], trunc)
    body += ("\n\npadding efficiency = real tokens / (sequences x 512); a BPE (8192) trained on the SFT text "
             "with every template's special tokens")
    record("SFT preparation (bench/sft_prepare.py)", body)


if __name__ == "__main__":
    main()
