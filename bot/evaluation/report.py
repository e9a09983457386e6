"""The report three ways: a table for the terminal, report.json for the record, report.png for people."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = [  # (heading, path into a variant's figures, format)
    ("F1", ("accuracy", "f1"), "{:.2f}"),
    ("sim", ("accuracy", "similarity"), "{:.2f}"),
    ("correct", ("accuracy", "correct"), "{:.0%}"),
    ("unsupported", ("hallucination", "unsupported_sentences"), "{:.0%}"),
    ("answered-unans.", ("hallucination", "answered_unanswerable"), "{:.0%}"),
    ("transparent", ("transparency", "cited_support"), "{:.0%}"),
    ("style", ("style", "margin"), "{:+.3f}"),
    ("dynamism s", ("dynamism", "seconds"), "{:.1f}"),
    ("prompt tok", ("cost", "prompt_tokens"), "{:.0f}"),
    ("compl. tok", ("cost", "completion_tokens"), "{:.0f}"),
    ("s/answer", ("cost", "seconds_per_answer"), "{:.2f}"),
    ("train s", ("cost", "training_seconds"), "{:.0f}"),
]


def figure(variant: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = variant
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _cell(variant: dict[str, Any], path: tuple[str, ...], fmt: str) -> str:
    value = figure(variant, path)
    if value is None:
        if path[0] == "dynamism" and variant.get("dynamism"):
            return "never"  # measured, and fewer than half came back correct after the update
        return "–"
    return fmt.format(value)


def table(report: dict[str, Any]) -> str:
    headings = ["variant"] + [c[0] for c in COLUMNS]
    rows = [[name] + [_cell(v, path, fmt) for _, path, fmt in COLUMNS] for name, v in report["variants"].items()]
    widths = [max(len(r[i]) for r in [headings] + rows) for i in range(len(headings))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(headings), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"{report['questions']} questions, persona {report['persona']}; "
               "higher is better except unsupported, answered-unans., dynamism s and the costs")
    out += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(out)


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = Path(out) / "report.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


PANELS = [  # (title, [(label, path)], y-limits or None)
    ("Accuracy (higher is better)", [("token F1", ("accuracy", "f1")), ("similarity", ("accuracy", "similarity")),
                                     ("correct", ("accuracy", "correct"))], (0, 1.15)),
    ("Hallucination (lower is better)", [("unsupported sentences", ("hallucination", "unsupported_sentences")),
                                         ("answered unanswerable", ("hallucination", "answered_unanswerable"))], (0, 1.15)),
    ("Transparency (higher is better)", [("citation holds the answer", ("transparency", "cited_support"))], (0, 1.15)),
    ("Style vs neutral persona (higher is better)", [("voice margin", ("style", "margin"))], None),
    ("Dynamism: seconds to learn a new doc (lower is better)", [("seconds", ("dynamism", "seconds"))], None),
    ("Cost: seconds per answer (lower is better)", [("s/answer", ("cost", "seconds_per_answer"))], None),
]


def write_png(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (title, series, limits) in zip(axes.flat, PANELS):
        width = 0.8 / len(series)
        for s, (label, path) in enumerate(series):
            values = [figure(report["variants"][n], path) for n in names]
            xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(xs, [v or 0 for v in values], width, label=label)
            for bar, value, name in zip(bars, values, names):
                ax.annotate(_note(report["variants"][name], path, value), (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)), names, fontsize=9)
        if limits:
            ax.set_ylim(*limits)
        ax.axhline(0, color="black", linewidth=0.6)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"personabot eval: persona {report['persona']}, {report['questions']} questions", fontsize=12)
    fig.tight_layout()
    path = Path(out) / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _note(variant: dict[str, Any], path: tuple[str, ...], value: Any) -> str:
    if value is None:
        return "never" if path[0] == "dynamism" and variant.get("dynamism") else "n/a"
    if path == ("cost", "seconds_per_answer"):
        cost = variant["cost"]
        extra = f"\n{cost['prompt_tokens'] or 0:.0f}+{cost['completion_tokens'] or 0:.0f} tok"
        if cost.get("training_seconds"):
            extra += f"\ntrain {cost['training_seconds']:.0f}s"
        return f"{value:.2f}{extra}"
    if path[0] == "dynamism":
        return f"{value:.1f} ({variant['dynamism']['update']})"
    return f"{value:.2f}"
