"""The report itself: report.md (links to out_dir/plots/) and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path

import pandas as pd

from cdm.io import atomic_write_text
from cdm.report import ablation as A
from cdm.report.tables import against_teacher, metrics_table, to_html, to_markdown
from cdm.world.prompts import ATTRIBUTES

TITLE = "CDM distillation report"
TEACHER_COLUMNS = ("alignment", *ATTRIBUTES, "fd")
STATUS = {True: "held", False: "did not hold", None: "not measured"}
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table.metrics { border-collapse: collapse; font-size: 0.9em; }
table.metrics th, table.metrics td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; }
table.metrics td { text-align: right; }
.finding { margin: 0.8em 0; padding: 0.5em 0.8em; border-left: 4px solid #999; }
.held { border-color: #2a7; } .did-not-hold { border-color: #c33; } .not-measured { border-color: #aaa; }
.mixed, .within-noise { border-color: #d90; }
code { background: #f3f3f3; padding: 0 0.2em; }
img { max-width: 100%; }
""".strip()


def _status(finding: dict) -> str:
    return STATUS[finding["held"]]


def _link(image: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(Path(image).resolve(), out_dir.resolve())).as_posix()


def teacher_table(teacher: dict) -> pd.DataFrame:
    """The teacher check (results/teacher.json): one row with CFG, one without."""
    rows = []
    for name, label in (
        ("cfg", f"with CFG {teacher.get('cfg_scale', '')}".strip()),
        ("nocfg", "without CFG"),
    ):
        row = {"sampling": label, "steps": teacher.get("steps", math.nan)}
        row |= {k: teacher.get(f"{k}_{name}", math.nan) for k in TEACHER_COLUMNS}
        rows.append(row)
    return pd.DataFrame(rows, columns=["sampling", "steps", *TEACHER_COLUMNS])


def teacher_note(teacher: dict) -> str:
    """One sentence: how many pairs, the judge's accuracy, the teacher's size."""
    accuracy = teacher.get("judge_accuracy") or {}
    judged = ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
    parts = [f"{teacher.get('n_pairs', '?')} held-out prompt/seed pairs"]
    if judged:
        parts.append(f"judge accuracy on fresh renders: {judged}")
    if "teacher_parameters" in teacher:
        parts.append(f"{teacher['teacher_parameters']:,} teacher parameters")
    return "Teacher check (`results/teacher.json`): " + "; ".join(parts) + "."


def report_markdown(
    out_dir: Path,
    metrics: dict,
    findings: list,
    images: dict[str, Path],
    teacher: dict | None = None,
    ablation: dict | None = None,
    context: dict | None = None,
) -> str:
    """Markdown text: findings, metrics table, teacher check, figures linked relative to out_dir."""
    lines = [f"# {TITLE}", "", *provenance_lines(context), ""]
    if ablation:
        lines += ["## Findings over distillation seeds", "", _ablation_intro(ablation), ""]
        lines += [to_markdown(A.findings_frame(ablation))]
        for f in ablation["findings"]:
            lines += [f"- **({f['id']})** {f['claim']}"]
            lines += [
                f"  - {s} steps, {v['verdict']}: {v['text']}" for s, v in f["by_steps"].items()
            ]
        lines += ["", "### Mean +- std over seeds", "", to_markdown(A.summary_frame(ablation))]
        lines += ["## " + SINGLE_NUMBERS, ""]
        for f in findings:
            lines += [f"- **({f['id']})** {f['claim']}  ", f"  {f['numbers']}"]
    else:
        lines += ["## " + SINGLE_TITLE, "", *_skipped(context)]
        for f in findings:
            lines += [f"- **({f['id']}) {_status(f)}**: {f['claim']}  ", f"  {f['text']}"]
    lines += ["", "## Metrics", "", to_markdown(metrics_table(metrics))]
    lines += [
        "## Students against the teacher",
        "",
        AGAINST,
        "",
        to_markdown(against_teacher(metrics)),
    ]
    lines += since_markdown(context)
    if teacher:
        lines += ["## Teacher", "", teacher_note(teacher), "", to_markdown(teacher_table(teacher))]
    return "\n".join(lines + _md_figures(images, out_dir))


AGAINST = (
    "Each student's judge alignment and FD at every step count it was sampled at, beside the "
    "teacher with CFG at the same step count and at its own step count (one distillation seed: "
    "the pipeline's run)."
)


def _ablation_intro(ablation: dict) -> str:
    return (
        f"Every preset distilled with seeds {ablation['seeds']} (`make ablation`, "
        f"`results/ablation.json`) on this run's teacher and params, each sampled on the "
        "evaluation pairs: these are the findings' verdicts, one per step count. "
        f"Rule: {ablation['rule']}. "
        "A finding *held* when the claimed side is better beyond that margin on at least one "
        "metric (alignment, FD; finding 2: FD to the CFG-free teacher set against every other "
        "student) and worse beyond it on none; *did not hold* when worse beyond it and better on "
        "none; *within noise* or *mixed* otherwise."
    )


# The seeded measurement, when it ran on this run's teacher and params, gives every verdict;
# the single run then shows its numbers only. Otherwise the single run's verdicts stand, and
# its caveat (one seed) is said once, in the title.
SINGLE_NUMBERS = "The single-seed run's numbers (the verdicts above are over seeds)"
SINGLE_TITLE = "Findings (one distillation seed; `make ablation` measures them over seeds)"


def _skipped(context: dict | None) -> list[str]:
    """Why results/ablation.json, present, gives no verdicts here (a paragraph), if it does not."""
    reason = (context or {}).get("ablation_skipped")
    return [f"`results/ablation.json` is not shown: {reason}.", ""] if reason else []


def provenance_lines(context: dict | None) -> list[str]:
    """The provenance block, as Markdown bullet lines."""
    if not context:
        return []
    p = context["provenance"]
    changed = p["params_changed_since_commit"]
    listed = ", ".join(f"`{k}`: {a} -> {b}" for k, (a, b) in changed.items()) or "none"
    packages = ", ".join(f"{k} {v}" for k, v in p["packages"].items() if v)
    stages = ", ".join(
        f"{s['stage']} {s['seconds']} s / {s['max_rss_mb']:.0f} MB" for s in p["stages"]
    )
    return [
        f"- commit `{p['commit'][:12]}`{' (dirty tree)' if p['dirty'] else ''}, "
        f"{p['date_utc']} UTC; backend `{p['backend']}`, teacher `{p['teacher']}`"
        + (f"; students trained by {p['training']}" if p.get("training") else ""),
        f"- params that differ from the committed params.yaml: {listed}",
        f"- {p['device']}; Python {p['python']}, CUDA {p['cuda']}; {packages}",
        f"- stage wall time / peak RSS (Snakemake benchmarks): {stages or 'not recorded'}",
        f"- {_timings(p.get('timings') or {})}",
    ]


def _timings(timings: dict) -> str:
    """The stages' own timings (kept out of the metrics files: they vary with the load)."""
    parts = [f"teacher check {v} s" for v in timings.get("prepare_teacher", {}).values()]
    if timings.get("score"):
        parts.append("images per second of every set in the metrics table")
    shown = "; ".join(parts) or "not recorded"
    return f"timings (`logs/timings/`, not metrics: they vary with the machine's load): {shown}"


def since_markdown(context: dict | None) -> list[str]:
    if not context or context["since"].empty:
        return []
    table = context["since"]
    flagged = int((table["moved"] == "yes").sum())
    return [
        "## Since the last committed run",
        "",
        f"Every metric beside its value in the committed `results/metrics.json`; {flagged} "
        "moved by more than their margin (the interval's half-width, or one binomial standard "
        "error for a world fraction; FD has none and is not flagged).",
        "",
        to_markdown(table),
    ]


def _inline(text: str) -> str:
    """Escape text for HTML, rendering `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))


def _html_provenance(context: dict | None) -> list[str]:
    lines = provenance_lines(context)
    if not lines:
        return []
    items = "".join(f"<li>{_inline(line[2:])}</li>" for line in lines)
    return [f'<ul class="provenance">{items}</ul>']


def _html_since(context: dict | None) -> list[str]:
    md = since_markdown(context)
    if not md:
        return []
    return [
        "<h2>Since the last committed run</h2>",
        f"<p>{_inline(md[2])}</p>",
        to_html(context["since"]),
    ]


NATURAL_SIZES = (
    '<script>addEventListener("load", () => { for (const i of document.images) '
    'i.dataset.natural = i.naturalWidth + "x" + i.naturalHeight; });</script>'
)


def _html_head() -> list[str]:
    return [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(TITLE)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(TITLE)}</h1>",
    ]


def _md_figures(images: dict[str, Path], out_dir: Path) -> list[str]:
    """A Figures section, each PNG linked relative to the report's folder."""
    lines = ["## Figures", ""]
    for name, image in images.items():
        lines += [f"### {name}", "", f"![{name}]({_link(image, out_dir)})", ""]
    return lines


def _html_figures(images: dict[str, Path]) -> list[str]:
    """A Figures section, each PNG embedded as a data URI."""
    parts = ["<h2>Figures</h2>"]
    for name, image in images.items():
        alt = html.escape(name, quote=True)
        parts += [f"<h3>{alt}</h3>", f'<img src="{_data_uri(image)}" alt="{alt}">']
    # Each image's decoded size as data-natural="WxH": a browser that could not decode one
    # says 0x0 (what the suite's headless-Chromium test reads from the DOM).
    parts.append(NATURAL_SIZES)
    return parts


def _data_uri(image: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode("ascii")


def report_html(
    metrics: dict,
    findings: list,
    images: dict[str, Path],
    teacher: dict | None = None,
    ablation: dict | None = None,
    context: dict | None = None,
) -> str:
    """Self-contained HTML: inline CSS, tables as HTML, PNGs embedded as data URIs."""
    parts = [
        *_html_head(),
        *_html_provenance(context),
    ]
    if ablation:
        parts += [
            "<h2>Findings over distillation seeds</h2>",
            f"<p>{_inline(_ablation_intro(ablation))}</p>",
            to_html(A.findings_frame(ablation)),
        ]
        for f in ablation["findings"]:
            for steps, v in f["by_steps"].items():
                parts.append(
                    f'<div class="finding {v["verdict"].replace(" ", "-")}"><b>({f["id"]}) '
                    f"{steps} steps, {v['verdict']}</b>: {_inline(v['text'])}</div>"
                )
        parts += ["<h3>Mean +- std over seeds</h3>", to_html(A.summary_frame(ablation))]
        parts.append(f"<h2>{_inline(SINGLE_NUMBERS)}</h2>")
        for f in findings:
            parts.append(
                f'<div class="finding numbers"><b>({f["id"]})</b> {_inline(f["claim"])}<br>'
                f"{_inline(f['numbers'])}</div>"
            )
    else:
        parts.append(f"<h2>{_inline(SINGLE_TITLE)}</h2>")
        parts += [f"<p>{_inline(line)}</p>" for line in _skipped(context) if line]
        for f in findings:
            status = _status(f)
            parts.append(
                f'<div class="finding {status.replace(" ", "-")}"><b>({f["id"]}) {status}</b>: '
                f"{_inline(f['claim'])}<br>{_inline(f['text'])}</div>"
            )
    parts += ["<h2>Metrics</h2>", to_html(metrics_table(metrics))]
    parts += [
        "<h2>Students against the teacher</h2>",
        f"<p>{_inline(AGAINST)}</p>",
        to_html(against_teacher(metrics)),
        *_html_since(context),
    ]
    if teacher:
        parts += [
            "<h2>Teacher</h2>",
            f"<p>{_inline(teacher_note(teacher))}</p>",
            to_html(teacher_table(teacher)),
        ]
    parts += [*_html_figures(images), "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(
    out_dir: Path,
    metrics: dict,
    findings: list,
    images: dict[str, Path],
    teacher: dict | None = None,
    ablation: dict | None = None,
    context: dict | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/report.md and out_dir/report.html atomically; return both paths.

    `teacher` (results/teacher.json, optional) adds a section on the teacher check;
    `ablation` (results/ablation.json, optional: only one measured on this run's teacher and
    params) the findings over distillation seeds, which then give every verdict."""
    out_dir = Path(out_dir)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md = report_markdown(out_dir, metrics, findings, images, teacher, ablation, context)
    atomic_write_text(md_path, md)
    page = report_html(metrics, findings, images, teacher, ablation, context)
    atomic_write_text(html_path, page)
    return md_path, html_path


TABLE1_TITLE = "Table 1: the paper's main table, ours beside the authors' published values"


def real_report(
    out_dir: Path,
    metrics: dict,
    findings: list,
    images: dict[str, Path],
    teacher: dict | None,
    context: dict | None = None,
    table1: tuple[pd.DataFrame, list[str]] | None = None,
) -> tuple[Path, Path]:
    """report.md and a self-contained report.html of an sd3 / longcat run (cdm.report.preference);
    `table1` (cdm.report.table1: the table and its protocol lines) comes first."""
    from cdm.report import preference as R

    table = R.metrics_frame(metrics)
    notes = R.conventions_lines(metrics)
    backend = f" ({teacher.get('backend')}, {teacher.get('path')})" if teacher else ""
    intro = (
        f"Sample sets scored with the paper's metrics{backend}: mean and 95% bootstrap interval "
        "over prompts per set. CLIP score follows Hessel et al.: 100 x max(cos(image, text), 0). "
        f"Findings rule: {R.RULE}. Numbers of two runs compare only when the conventions below "
        "match (`metrics.json` keeps them beside every entry)."
    )
    md = [f"# {TITLE}", "", *provenance_lines(context), "", intro, ""]
    first: list[str] = []  # the HTML of Table 1
    if table1 is not None:
        frame, protocol = table1
        md += [f"## {TABLE1_TITLE}", "", to_markdown(frame), "Protocol:", "", *protocol, ""]
        first = [f"<h2>{TABLE1_TITLE}</h2>", to_html(frame), "<p>Protocol:</p><ul>"]
        first += [f"<li>{_inline(line[2:])}</li>" for line in protocol] + ["</ul>"]
    md += ["## Findings", ""]
    for f in findings:
        md += [f"- **({f['id']}) {f['verdict']}**: {f['claim']}  ", f"  {f['text']}"]
    md += ["", "## Metrics", "", to_markdown(table), *since_markdown(context)]
    md += ["## Conventions", "", *notes, ""]
    md += _md_figures(images, Path(out_dir))
    page = [
        *_html_head(),
        *_html_provenance(context),
        f"<p>{_inline(intro)}</p>",
        *first,
        "<h2>Findings</h2>",
    ]
    for f in findings:
        page.append(
            f'<div class="finding {f["verdict"].replace(" ", "-")}"><b>({f["id"]}) '
            f"{f['verdict']}</b>: {_inline(f['claim'])}<br>{_inline(f['text'])}</div>"
        )
    page += ["<h2>Metrics</h2>", to_html(table), *_html_since(context), "<h2>Conventions</h2><ul>"]
    page += [f"<li>{_inline(n[2:].replace('**', ''))}</li>" for n in notes] + ["</ul>"]
    page += [*_html_figures(images), "</body></html>"]
    out_dir = Path(out_dir)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_text(html_path, "\n".join(page) + "\n")
    return md_path, html_path
