"""`miniglm eval`: answer a test set with a run and score the answers; perplexity over held-out text;
accuracy for label-as-text classification. Every evaluation writes its folder (default RUN/eval):

    predictions.jsonl   prompt, reference, prediction and the per-sample scores
    metrics.json        the averages (and per group, e.g. per fact type), the settings used
    report.md/.html     tables and plots (see miniglm/report.py; `miniglm report RUN` rebuilds them)
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from miniglm import metrics
from miniglm.chat import LoadedRun, generate_batched, load_run
from miniglm.devices import evaluating, model_device
from miniglm.engine import SamplingParams
from miniglm.fileio import UserError, atomic_dir, read_text, write_json, write_jsonl
from miniglm.sft.formats import column_fields, load_records

GROUP_FIELDS = ("fact", "label", "category", "type")  # per-group averages when the data has one of these


@dataclass
class Example:
    messages: list[dict]  # the chat up to the answer
    references: list[str]  # the reference answer (SQuAD-style data may give several)
    extra: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def load_examples(path: str | Path, limit: int = 0, columns: str | None = None,
                  values: dict[str, str] | None = None, encoding: str | None = None) -> list[Example]:
    """columns, values, encoding: as in `sft prepare` (formats.load_records)."""
    examples = []
    for r in load_records(path, columns, values, encoding):
        refs = r.extra.get("answers") or [r.messages[-1]["content"]]
        extra = {k: v for k, v in r.extra.items() if k != "answers"}
        examples.append(Example(r.messages[:-1], [str(x) for x in refs], extra))
    return examples[:limit] if limit else examples


def answer(run: LoadedRun, examples: list[Example], params: SamplingParams, batch_size: int = 32, log=None,
           note=None) -> list[str]:
    """The run's answer to each example's chat, batched through the generation engine. A prompt too long
    to leave room for an answer (max_new_tokens, or half the context if less) loses the end of its last
    user turn, as in training; each answer gets the room its own prompt leaves, whatever its batch."""
    block, max_len = run.engine.model.config.block_size, run.room(params)
    fitted = [run.fitted(e.messages, max_len, keep_end=False) for e in examples]  # as sft prepare fits
    cut = sum(c for _, _, c in fitted)
    if cut and log:
        log(f"{cut} of {len(examples)} prompts cut to fit the context ({max_len} of {block} tokens)")
    params = SamplingParams(**{**params.__dict__, "fit_new_tokens": True})
    completions = generate_batched(run, [(ids, stops) for ids, stops, _ in fitted], params, batch_size, note)
    return [c.text.strip() for c in completions]


def score(predictions: list[str], examples: list[Example], embedder: metrics.Embedder | None = None) -> list[dict]:
    """Per-sample scores; with several references, each score is its best over them."""
    rows = []
    for pred, ex in zip(predictions, examples, strict=True):
        per_ref = [metrics.score_sample(pred, ref) for ref in ex.references]
        rows.append({k: max(s[k] for s in per_ref) for k in per_ref[0]})
    if embedder is not None:
        sims = metrics.cosine_similarities(predictions, [ex.references[0] for ex in examples], embedder)
        for row, sim in zip(rows, sims, strict=True):
            row["similarity"] = sim
    return rows


def summarize(scores: list[dict], examples: list[Example]) -> dict:
    """Averages over all samples, and per group when the examples carry a group field."""
    summary = {"n": len(scores), "all": metrics.mean_scores(scores)}
    group = next((g for g in GROUP_FIELDS if all(g in ex.extra for ex in examples)), None)
    if group:
        by = defaultdict(list)
        for s, ex in zip(scores, examples, strict=True):
            by[str(ex.extra[group])].append(s)
        summary["group_by"] = group
        summary["groups"] = {k: {"n": len(v), **metrics.mean_scores(v)} for k, v in sorted(by.items())}
    return summary


def majority_baseline(train: list[Example], test: list[Example], group: str) -> list[str]:
    """Answer every test question with the most frequent training answer of its group (e.g. fact type):
    what guessing from a small answer set scores, without knowing anything about the subject."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for ex in train:
        counts[str(ex.extra.get(group))][ex.references[0]] += 1
    overall = Counter(ex.references[0] for ex in train)
    return [(counts.get(str(ex.extra.get(group))) or overall).most_common(1)[0][0] for ex in test]


def write_results(out: Path, examples: list[Example], predictions: list[str], scores: list[dict],
                  summary: dict) -> None:
    rows = [{"prompt": ex.prompt, "reference": ex.references[0], "prediction": pred, **ex.extra, "scores": s}
            for ex, pred, s in zip(examples, predictions, scores, strict=True)]
    write_jsonl(out / "predictions.jsonl", rows)
    write_json(out / "metrics.json", summary)


def evaluate_generation(run_dir: str | Path, data: str | Path, out: str | Path | None = None,
                        template: str | None = None, params: SamplingParams | None = None,
                        embedder: str | None = "use-multilingual", limit: int = 0, batch_size: int = 32,
                        log=print, columns: str | None = None, values: dict[str, str] | None = None,
                        note=None, encoding: str | None = None, device: str = "auto") -> dict:
    from miniglm.report import write_report

    examples = load_examples(data, limit, columns, values, encoding)
    emb = metrics.Embedder(embedder) if embedder else None  # a bad name fails before the slow part
    run = load_run(run_dir, device)
    if template:
        run.template = template
    params = params or SamplingParams(max_new_tokens=128)
    out = Path(out) if out else Path(run_dir) / "eval"
    t0 = time.perf_counter()
    predictions = answer(run, examples, params, batch_size, log, note)
    gen_s = time.perf_counter() - t0
    scores = score(predictions, examples, emb)
    summary = {"kind": "generation", "run": str(run_dir), "data": str(data), "template": run.template,
               "sampling": {k: v for k, v in params.__dict__.items() if k != "stop_ids"}, "embedder": embedder,
               "generation_seconds": gen_s, **summarize(scores, examples)}
    with atomic_dir(out, keep=True) as tmp:  # predictions, scores and reports are one set
        write_results(tmp, examples, predictions, scores, summary)
        write_report(tmp)
    log(format_summary(summary))
    log(f"wrote {out / 'predictions.jsonl'}, {out / 'report.md'}, {out / 'report.html'}")
    return summary


METRIC_ORDER = ("exact_match", "contained", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "similarity", "accuracy")


def format_summary(summary: dict) -> str:
    a = summary["all"]
    cells = [f"{k} {a[k] * 100 if k in ('exact_match', 'contained') else a[k]:.2f}" + (
        "%" if k in ("exact_match", "contained") else "") for k in METRIC_ORDER if k in a]
    return f"{summary['n']} samples: " + ", ".join(cells)


# --- perplexity ----------------------------------------------------------------------------------
def read_texts(path: str | Path, encoding: str | None = None) -> list[str]:
    """A .txt file (one text), or .jsonl / .json documents with a "text" field (a prepared corpus split)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() in (".jsonl", ".json"):
        from miniglm.fileio import read_jsonl

        return [row["text"] for _, row in read_jsonl(path, encoding) if isinstance(row.get("text"), str)]
    return [read_text(path, encoding)]


@torch.inference_mode()
def perplexity(model, tok, texts: list[str], stride: int = 0) -> dict:
    """Sliding-window perplexity: windows of the model's context, moved by `stride` tokens; each token is
    scored once, by the window that gives it the most context (all but the first window score only
    their last `stride` tokens). Documents are joined with the end-of-text token, as in pretraining.
    On the model's own device, in eval mode while it scores (its own flag restored after)."""
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t) + [tok.eot_id]
    if len(ids) < 2:
        raise UserError("perplexity needs at least two tokens of text")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    window = model.config.block_size
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise UserError(f"--stride must be between 1 and the context length {window}")
    data = torch.tensor(ids, dtype=torch.long, device=model_device(model))
    nll, counted = 0.0, 0
    scored_to, begin = 1, 0  # tokens before scored_to have a score (the first token has no context)
    with evaluating(model):
        while True:
            end = min(begin + window + 1, len(ids))  # inputs ids[begin:end-1], targets ids[begin+1:end]
            x, y = data[begin:end - 1], data[begin + 1:end].clone()
            y[: scored_to - (begin + 1)] = -100  # scored by the previous window, with less context
            n = int((y != -100).sum())
            _, loss = model(x[None], targets=y[None])
            nll += loss.item() * n
            counted += n
            scored_to = end
            if end == len(ids):
                break
            begin += stride
    loss = nll / counted
    return {"tokens": counted, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nll / math.log(2) / n_bytes, "window": window, "stride": stride}


def evaluate_perplexity(run_dir: str | Path, text: str | Path, stride: int = 0, out: str | Path | None = None,
                        log=print, encoding: str | None = None, device: str = "auto") -> dict:
    texts = read_texts(text, encoding)  # a bad file fails before the model loads
    run = load_run(run_dir, device, raw=True)
    result = {"kind": "perplexity", "run": str(run_dir), "text": str(text),
              **perplexity(run.engine.model, run.engine.tokenizer, texts, stride)}
    out = Path(out) if out else Path(run_dir) / "eval"
    with atomic_dir(out, keep=True) as tmp:  # beside a generation eval's files, kept as they are
        write_json(tmp / "perplexity.json", result)
    log(f"{result['tokens']:,} tokens: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
        f"bits/byte {result['bits_per_byte']:.4f} (window {result['window']}, stride {result['stride']}) "
        f"-> {out / 'perplexity.json'}")
    return result


# --- classification ------------------------------------------------------------------------------
def evaluate_classification(run_dir: str | Path, data: str | Path, labels: list[str] | None = None,
                            out: str | Path | None = None, template: str | None = None, batch_size: int = 32,
                            log=print, columns: str | None = None, values: dict[str, str] | None = None,
                            encoding: str | None = None, system: str | None = None, device: str = "auto") -> dict:
    """Generate a short answer per example (greedy), snap it to the closest label, and score accuracy and
    per-class precision/recall against the reference labels. system: an instruction (zero-shot), as the
    template carries a system prompt (plain: a line before the record)."""
    from dataclasses import replace

    from miniglm.report import write_report

    examples = load_examples(data, columns=columns, values=values, encoding=encoding)
    refs = [ex.references[0].strip() for ex in examples]
    labels = labels or sorted(set(refs))
    unknown = sorted(set(refs) - set(labels))
    if unknown:
        raise UserError(f"{data}: reference labels not in --labels: {', '.join(unknown[:5])}")
    run = load_run(run_dir, device)
    if template:
        run.template = template
    if system is not None:
        run.options = replace(run.options, system=system)
    if run.template == "plain":  # named after the data's columns ("Tweet text : … Label : ") unless the run names them
        run.options = column_fields(str(data), columns, run.options)
    longest = max(len(run.engine.tokenizer.encode(label)) for label in labels)
    raw = answer(run, examples, SamplingParams(max_new_tokens=longest + 4), batch_size, log)
    predictions = [metrics.snap_to_label(r, labels) for r in raw]
    report = metrics.classification_report(predictions, refs, labels)
    majority = Counter(refs).most_common(1)[0]
    summary = {"kind": "classification", "run": str(run_dir), "data": str(data), "template": run.template,
               "system": run.options.system,
               "labels": labels, "n": len(examples), "all": {"accuracy": report["accuracy"]},
               "majority_baseline": {"label": majority[0], "accuracy": majority[1] / len(refs)}, **report}
    scores = [{"accuracy": float(p == r)} for p, r in zip(predictions, refs, strict=True)]
    out = Path(out) if out else Path(run_dir) / "eval"
    rows = [{"prompt": ex.prompt, "reference": ref, "prediction": pred, "generated": g, **ex.extra, "scores": s}
            for ex, ref, pred, g, s in zip(examples, refs, predictions, raw, scores, strict=True)]
    with atomic_dir(out, keep=True) as tmp:
        write_jsonl(tmp / "predictions.jsonl", rows)
        write_json(tmp / "metrics.json", summary)
        write_report(tmp)
    log(f"{len(examples)} samples: accuracy {report['accuracy']:.1%} (majority '{majority[0]}': "
        f"{summary['majority_baseline']['accuracy']:.1%}), macro F1 {report['macro_f1']:.3f} -> {out}")
    return summary
