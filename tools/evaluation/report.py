"""The evaluation report: PNG plots (matplotlib, Agg) and one static HTML page.

Curators read this, not metrics.json: each plot answers one question —
what does answering more photos cost (risk–coverage), can the confidence be
trusted (reliability), which species need more photos (accuracy against
training count), and what gets mistaken for what (top confusions).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from biolit_id.server.decision.bundle import Bundle

DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_risk_coverage(path: Path, curve: dict, metrics: dict) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(curve["coverage"], curve["risk"], color="#1f77b4", lw=2,
            label=f"this bundle ({metrics.get('routing', 'seed')}), one cut on its confidence")
    if metrics["accuracy_global"] is not None:
        ax.scatter([metrics["coverage"]], [1 - metrics["accuracy_global"]], color="#1f77b4",
                   zorder=3, s=50, edgecolors="black", label="this bundle as calibrated")
    seed, compared = curve.get("seed"), metrics.get("compare_seed")
    if seed is not None:
        ax.plot(seed["coverage"], seed["risk"], color="#ff7f0e", lw=2, ls="--",
                label=seed.get("label", "seed's method"))
        if compared and compared["accuracy_global"] is not None:
            ax.scatter([compared["coverage"]], [1 - compared["accuracy_global"]],
                       color="#ff7f0e", zorder=3, s=50, edgecolors="black",
                       label="seed's method at its thresholds")
    risks = [r for c in (curve, seed) if c is not None for r in c["risk"]]
    ax.set_xlabel("coverage (share of photos answered)")
    ax.set_ylabel("risk (error rate among answers)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.05, float(np.nanmax(risks)) * 1.1 if len(risks) else 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Risk–coverage")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_reliability(path: Path, metrics: dict) -> None:
    plt = _pyplot()
    bins = metrics["reliability"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    acc = [b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins]
    ax.bar(centers, acc, width=width * 0.95, color="#1f77b4", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    conf = [(c, b["confidence"]) for c, b in zip(centers, bins, strict=True)
            if b["confidence"] is not None]
    if conf:
        ax.plot(*zip(*conf, strict=True), "o", color="#d62728", ms=4, label="mean confidence")
    ax.set_ylabel("accuracy of answers")
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability of accepted answers (ECE {metrics['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax2.bar(centers, [b["count"] for b in bins], width=width * 0.95, color="#7f7f7f")
    ax2.set_xlabel("decision confidence")
    ax2.set_ylabel("photos")
    ax2.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_per_species(path: Path, metrics: dict) -> None:
    plt = _pyplot()
    rows = [r for r in metrics["per_species"] if r["known"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for is_common, colour, label in ((True, "#1f77b4", "common (head)"),
                                     (False, "#ff7f0e", "rare (prototypes)")):
        sel = [r for r in rows if r["common"] == is_common]
        if sel:
            ax.scatter([max(r["train_count"], 1) for r in sel], [r["accuracy_all"] for r in sel],
                       s=[12 + 4 * min(r["test_count"], 30) for r in sel], alpha=0.6,
                       color=colour, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training photos (log scale)")
    ax.set_ylabel("accuracy, rejections counted wrong")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Per-species accuracy against training count (dot size: test photos)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_confusions(path: Path, metrics: dict) -> None:
    plt = _pyplot()
    pairs = metrics["top_confusions"]
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.4 * len(pairs) + 1.2)))
    if pairs:
        labels = [f"{p['true']}  →  {p['predicted']}" for p in pairs][::-1]
        ax.barh(range(len(pairs)), [p["count"] for p in pairs][::-1], color="#d62728")
        ax.set_yticks(range(len(pairs)), labels, fontsize=8)
        ax.set_xlabel("wrong answers")
    else:
        ax.text(0.5, 0.5, "no wrong answers", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Top confusions (true → answered)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_methods(path: Path, metrics: dict) -> None:
    plt = _pyplot()
    names = list(metrics["per_method"])
    counts = [metrics["per_method"][n]["count"] for n in names]
    right = [metrics["per_method"][n]["correct"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = np.arange(len(names))
    ax.bar(x, counts, color="#c7c7c7", label="photos")
    ax.bar(x, right, color="#2ca02c", label="right (taxon: right taxon)")
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("photos")
    ax.legend(fontsize=8)
    ax.set_title("Decisions by method (taxon: rank-level answer instead of a rejection)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


PLOTS = (
    ("risk_coverage.png", plot_risk_coverage, "What answering more photos costs."),
    ("reliability.png", plot_reliability, "Whether the confidence shown to users can be trusted."),
    ("per_species.png", plot_per_species, "Which species need more training photos."),
    ("confusions.png", plot_confusions, "What gets mistaken for what."),
    ("methods.png", plot_methods, "Which part of the hybrid answered, and how well."),
)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _at(coverage: str, key: str):
    return lambda m: (m.get("at_coverage") or {}).get(coverage, {}).get(key)


HEADLINE_ROWS = (
    ("routing", lambda m: m.get("routing")),
    ("coverage (as calibrated)", lambda m: m["coverage"]),
    ("accuracy (answers, all species)", lambda m: m["accuracy_global"]),
    ("accuracy (answers, common)", lambda m: m["accuracy_common"]),
    ("accuracy (answers, rare)", lambda m: m["accuracy_rare"]),
    ("accuracy (rejections wrong)", lambda m: m["accuracy_all"]),
    ("accuracy at coverage 0.74", _at("0.74", "accuracy")),
    ("  common / rare at 0.74", lambda m: _pair(_at("0.74", "accuracy_common")(m),
                                                _at("0.74", "accuracy_rare")(m))),
    ("accuracy at coverage 0.88", _at("0.88", "accuracy")),
    ("  common / rare at 0.88", lambda m: _pair(_at("0.88", "accuracy_common")(m),
                                                _at("0.88", "accuracy_rare")(m))),
    ("ECE of answers", lambda m: m["ece"]),
    ("AURC (lower is better)", lambda m: m.get("aurc")),
    ("rank answers (photos)", lambda m: m.get("rank_answers")),
    ("rank answers right", lambda m: m.get("rank_answer_precision")),
)


def _pair(a, b) -> str:
    return f"{_fmt(a)} / {_fmt(b)}"


def write_report(out: Path, metrics: dict, curve: dict, bundle: Bundle) -> Path:
    out = Path(out)
    for name, fn, _ in PLOTS:
        if fn is plot_risk_coverage:
            fn(out / name, curve, metrics)
        else:
            fn(out / name, metrics)
    seed = metrics.get("compare_seed")
    columns = [metrics] + ([seed] if seed else [])
    head = "<tr><th></th><th>this bundle</th>" + ("<th>seed's method</th>" if seed else "")
    rows = head + "</tr>" + "".join(
        f"<tr><th>{html.escape(label)}</th>"
        + "".join(f"<td>{_fmt(get(m))}</td>" for m in columns) + "</tr>"
        for label, get in HEADLINE_ROWS
    ) + (f"<tr><th>photos</th><td>{metrics['samples']}</td></tr>"
         f"<tr><th>species unknown to the bundle (photos)</th>"
         f"<td>{metrics['unknown_species_samples']}</td></tr>")
    methods = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['count']}</td><td>{_fmt(v['accuracy'])}</td></tr>"
        for k, v in metrics["per_method"].items()
    )
    species_rows = "".join(
        f"<tr><td>{html.escape(r['species'])}</td><td>{'common' if r['common'] else 'rare'}</td>"
        f"<td>{r['train_count']}</td><td>{r['test_count']}</td><td>{_fmt(r['coverage'])}</td>"
        f"<td>{_fmt(r['accuracy_all'])}</td></tr>"
        for r in sorted(metrics["per_species"], key=lambda r: (r["accuracy_all"], r["species"]))
    )
    figures = "".join(
        f'<figure><img src="{name}" alt="{name}"><figcaption>{html.escape(caption)}'
        f"</figcaption></figure>"
        for name, _, caption in PLOTS
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>biolit-id evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:left}}figure{{display:inline-block;margin:0.5em;vertical-align:top}}
img{{max-width:520px}}</style></head><body>
<h1>Evaluation of bundle {html.escape(bundle.bundle_id)}</h1>
<p>Model {html.escape(bundle.model_id)}; {len(bundle.species)} species, {len(bundle.common)}
with the head. Accuracies over answers follow the seed's convention; "rejections wrong"
counts every "don't know" as an error. Test set fingerprint {metrics['test_fingerprint']}
{"(the split recorded in the bundle)" if metrics["test_is_bundle_split"] else ""}.</p>
<table>{rows}</table>
<h2>Plots</h2>{figures}
<h2>Methods</h2><table><tr><th>method</th><th>photos</th><th>accuracy</th></tr>{methods}</table>
<h2>Per species (worst first)</h2>
<table><tr><th>species</th><th>group</th><th>train</th><th>test</th><th>coverage</th>
<th>accuracy</th></tr>{species_rows}</table>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, "utf-8")
    return path
