"""Evaluation reports: report.md (with PNG plots beside it) and a self-contained report.html (plots
inlined) from an eval folder, and the side-by-side comparison of two runs.

    miniglm report RUN            rebuild RUN/eval/report.{md,html}
    miniglm report RUN_A RUN_B    compare: RUN_A/eval/compare-<RUN_B>.{md,html}
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from miniglm.fileio import UserError, atomic_path, read_jsonl, write_text

PERCENT = ("exact_match", "contained", "accuracy", "similarity")  # shown ×100 like the ROUGE/BLEU scores
SHOWN = ("exact_match", "contained", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "similarity", "accuracy")


def fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{value * 100:.2f}" if key in PERCENT else f"{value:.2f}"
    return str(value)


class Doc:
    """Markdown and HTML built side by side from the same few blocks."""

    def __init__(self, title: str, out_dir: Path):
        self.md, self.html = [f"# {title}\n"], [f"<h1>{html.escape(title)}</h1>"]
        self.out_dir, self.images = out_dir, []

    def heading(self, text: str) -> None:
        self.md.append(f"\n## {text}\n")
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, headers: list[str], rows: list[list]) -> None:
        def md_cell(c) -> str:
            return str(c).replace("|", "\\|").replace("\n", " ")

        self.md.append("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
                       + "".join("| " + " | ".join(md_cell(c) for c in r) + " |\n" for r in rows))
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                                   for r in rows) + "</table>")

    def figure(self, name: str, fig) -> None:
        """A matplotlib figure: a PNG file for the markdown, inlined as base64 in the HTML."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.images.append((name, buf.getvalue()))
        self.md.append(f"![{name}]({name})\n")
        self.html.append(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')

    def save(self, stem: str) -> tuple[Path, Path]:
        for name, png in self.images:
            with atomic_path(self.out_dir / name) as tmp:
                tmp.write_bytes(png)
        md_path, html_path = self.out_dir / f"{stem}.md", self.out_dir / f"{stem}.html"
        write_text(md_path, "\n".join(self.md))
        write_text(html_path, HTML_PAGE.format(title=html.escape(stem), body="\n".join(self.html)))
        return md_path, html_path


HTML_PAGE = """<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, "Noto Sans CJK SC", sans-serif; max-width: 1000px; margin: 24px auto; padding: 0 16px;
        color: #1f2937; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }}
th, td {{ border: 1px solid #d1d5db; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f3f4f6; }} img {{ max-width: 100%; }}
</style></head><body>
{body}
</body></html>
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["font.sans-serif"] = ["Noto Sans CJK SC", "WenQuanYi Zen Hei", "DejaVu Sans"]
    return plt


def load_eval(eval_dir: Path) -> tuple[dict, list[dict]]:
    path = eval_dir / "metrics.json"
    if not path.exists():
        raise UserError(f"{eval_dir}: no metrics.json; run `miniglm eval` first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        summary = None
    if not isinstance(summary, dict) or not isinstance(summary.get("all"), dict):
        raise UserError(f"{path}: the file is incomplete; rerun `miniglm eval`")
    preds = [r for _, r in read_jsonl(eval_dir / "predictions.jsonl")] if (eval_dir / "predictions.jsonl").exists() \
        else []
    return summary, preds


def loss_figure(runs: list[tuple[str, Path]]):
    """Train and val loss of each run's metrics.jsonl, or None when no run has one."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = False
    for label, run in runs:
        if not (run / "metrics.jsonl").exists():
            continue
        from miniglm.runs import read_metrics

        rows = read_metrics(run)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), lw=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", lw=1.5, label=f"{label} val")
        drawn = drawn or bool(train or val)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def histogram_figure(preds: list[dict], keys: list[str]):
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [p["scores"][key] * (100 if key in PERCENT else 1) for p in preds if key in p["scores"]]
        ax.hist(values, bins=20, range=(0, 100), color="#2563eb")
        ax.set_title(key)
        ax.set_xlabel("score")
    axes[0][0].set_ylabel("samples")
    fig.tight_layout()
    return fig


def metric_rows(summary: dict) -> tuple[list[str], list[list]]:
    keys = [k for k in SHOWN if k in summary["all"]]
    rows = [["all", summary["n"], *(fmt(k, summary["all"][k]) for k in keys)]]
    for name, g in summary.get("groups", {}).items():
        rows.append([name, g["n"], *(fmt(k, g[k]) for k in keys)])
    for name, b in summary.get("baselines", {}).items():
        rows.append([f"baseline: {name}", summary["n"], *(fmt(k, b[k]) if k in b else "-" for k in keys)])
    return ["", "n", *keys], rows


def write_report(eval_dir: str | Path) -> tuple[Path, Path]:
    """report.md + report.html of an eval folder (its run's loss curves when it sits in a run folder)."""
    eval_dir = Path(eval_dir)
    summary, preds = load_eval(eval_dir)
    run = eval_dir.parent
    doc = Doc(f"Evaluation of {run.name}", eval_dir)
    doc.para(f"data: {summary.get('data', '-')} · template: {summary.get('template') or 'raw text'} · "
             f"samples: {summary.get('n', len(preds))}")
    if "sampling" in summary:
        doc.para("sampling: " + ", ".join(f"{k}={v}" for k, v in summary["sampling"].items() if v is not None))
    doc.heading("Scores")
    if summary.get("kind") == "classification":
        base = summary["majority_baseline"]
        doc.para(f"accuracy {summary['accuracy']:.1%}, macro F1 {summary['macro_f1']:.3f}; majority baseline "
                 f"('{base['label']}') {base['accuracy']:.1%}")
        doc.table(["label", "precision", "recall", "f1", "support"],
                  [[k, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
                   for k, v in summary["per_class"].items()])
        cols = sorted({p for row in summary["confusion"].values() for p in row})
        doc.para("confusion (rows: reference, columns: prediction)")
        doc.table(["", *cols], [[ref, *(row.get(c, 0) for c in cols)] for ref, row in summary["confusion"].items()])
    else:
        doc.para("exact_match, contained and similarity in %; ROUGE-1/2/L F1 on jieba words and BLEU-4 on "
                 "characters ×100")
        doc.table(*metric_rows(summary))
    ppl = eval_dir / "perplexity.json"
    if ppl.exists():
        try:
            p = json.loads(ppl.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{ppl}: the file is incomplete; rerun `miniglm eval ppl`") from None
        doc.para(f"perplexity {p['perplexity']:.2f} (loss {p['loss']:.4f}, {p['bits_per_byte']:.4f} bits/byte) on "
                 f"{p['tokens']:,} tokens of {p['text']}")
    fig = loss_figure([(run.name, run)])
    if fig is not None:
        doc.heading("Loss curves")
        doc.figure("loss.png", fig)
    keys = [k for k in ("rouge-l", "bleu-4", "similarity") if preds and k in preds[0]["scores"]]
    if keys:
        doc.heading("Score distributions")
        doc.figure("scores.png", histogram_figure(preds, keys))
    if preds:
        key = "rouge-l" if "rouge-l" in preds[0]["scores"] else "accuracy"
        worst = sorted(preds, key=lambda p: p["scores"][key])[:10]
        doc.heading(f"Worst examples (by {key})")
        doc.table(["prompt", "reference", "prediction", key],
                  [[p["prompt"][:200], p["reference"][:200], p["prediction"][:200], fmt(key, p["scores"][key])]
                   for p in worst])
    return doc.save("report")


def write_comparison(run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Two runs' evaluations side by side: metric table with differences, both loss curves, and the
    samples where they disagree most."""
    a, b = Path(run_a), Path(run_b)
    sa, pa = load_eval(a / "eval")
    sb, pb = load_eval(b / "eval")
    out = Path(out_dir) if out_dir else a / "eval"
    doc = Doc(f"{a.name} vs {b.name}", out)
    doc.para(f"A: {a} (data {sa.get('data')}) · B: {b} (data {sb.get('data')})")
    if sa.get("data") != sb.get("data"):
        doc.para("note: the two runs were evaluated on different data")
    keys = [k for k in SHOWN if k in sa["all"] and k in sb["all"]]
    doc.heading("Scores")
    doc.table(["metric", a.name, b.name, "B - A"],
              [[k, fmt(k, sa["all"][k]), fmt(k, sb["all"][k]), fmt(k, sb["all"][k] - sa["all"][k])] for k in keys])
    groups = sorted(set(sa.get("groups", {})) & set(sb.get("groups", {})))
    if groups and keys:
        k = "exact_match" if "exact_match" in keys else keys[0]
        doc.para(f"{k} per {sa.get('group_by')}")
        doc.table([sa.get("group_by", "group"), a.name, b.name],
                  [[g, fmt(k, sa["groups"][g][k]), fmt(k, sb["groups"][g][k])] for g in groups])
    fig = loss_figure([("A", a), ("B", b)])
    if fig is not None:
        doc.heading("Loss curves")
        doc.figure(f"compare-{b.name}-loss.png", fig)
    by_prompt = {(p["prompt"], p["reference"]): p for p in pb}
    key = "rouge-l" if keys and "rouge-l" in keys else (keys[0] if keys else None)
    pairs = [(p, by_prompt[(p["prompt"], p["reference"])]) for p in pa if (p["prompt"], p["reference"]) in by_prompt]
    if key and pairs:
        pairs.sort(key=lambda ab: -abs(ab[0]["scores"][key] - ab[1]["scores"][key]))
        doc.heading(f"Largest differences (by {key})")
        doc.table(["prompt", "reference", f"A: {a.name}", f"B: {b.name}"],
                  [[x["prompt"][:160], x["reference"][:160], x["prediction"][:160], y["prediction"][:160]]
                   for x, y in pairs[:10] if x["scores"][key] != y["scores"][key]])
    return doc.save(f"compare-{b.name}")
