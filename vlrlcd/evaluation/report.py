"""One self-contained RUN/report.html: summary table, training curves, per-prompt browser.

Everything is inline (CSS, PNGs as base64 data URIs) and there is no JavaScript. Every piece of model
or dataset text, file name and key goes through `esc` (model output is untrusted input). Missing
pieces (no summary, no rollouts, no evaluation yet) become a note in the page, never an exception.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_write
from vlrlcd.evaluation.metrics import normalize_answer
from vlrlcd.evaluation.plots import write_curves
from vlrlcd.evaluation.rundir import method_names, read_json, read_records, read_rows, resolve_image
from vlrlcd.evaluation.stats import DIFF_KEYS, LEVEL, REFERENCE, RESAMPLES, SEED, PairedDiff, diff_vs_reference

IMAGE_MAX_SIDE = 256

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #d6dae0;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6570;font-size:12px}
nav a{margin-right:14px}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff6dd;border:1px solid #ecd58c;border-radius:4px;padding:6px 10px;margin:8px 0;color:#5c4a00}
.curves{max-width:100%;background:#fff;border:1px solid #dde1e6}
details.prompt{background:#fff;border:1px solid #dde1e6;border-radius:5px;margin:6px 0}
details.prompt>summary{cursor:pointer;padding:6px 10px;font-size:13px}
details.prompt[open]>summary{border-bottom:1px solid #eceff2}
.card{display:flex;gap:16px;padding:10px}
.card .thumb{flex:0 0 auto}
.card .body{flex:1 1 auto;min-width:0}
img.thumb{width:112px;height:112px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccd;background:#fafafa}
img.small{width:56px;height:56px;object-fit:contain;image-rendering:pixelated}
.text{white-space:pre-wrap;overflow-wrap:anywhere}
.label{color:#5b6570;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.anchor{background:#eef6ee;border-left:3px solid #4c9a4c;padding:4px 8px;margin:2px 0 8px}
table.candidates{width:100%}
table.candidates td:nth-child(2){max-width:480px}
tr.best td{background:#f1f7ff}
.bar{position:relative;width:170px;height:14px;background:#eef0f3;border-radius:2px}
.bar .fill{position:absolute;top:0;bottom:0;border-radius:2px}
.bar.margin .axis{position:absolute;left:50%;top:-2px;bottom:-2px;border-left:1px solid #7a8590}
.bar.margin .fill.pos{left:50%;background:#3f9d5d}
.bar.margin .fill.neg{right:50%;background:#cf5a4e}
.bar.dx .fill{left:0;background:#3f73c0}
.barcell{display:flex;align-items:center;gap:6px;font-variant-numeric:tabular-nums;font-size:12px}
.ok{color:#227a3a;font-weight:600}.bad{color:#b3362b;font-weight:600}
.final{margin-top:8px}
"""


def esc(x) -> str:
    """HTML-escape anything (quotes too, so it is safe inside attributes)."""
    return html.escape("" if x is None else str(x), quote=True)


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return esc(v)
    if isinstance(v, (int, float)):
        x = float(v)
        return esc(int(x)) if x.is_integer() and abs(x) < 1e15 else esc(f"{x:.4g}")
    if isinstance(v, (dict, list)):
        return esc(json.dumps(v, ensure_ascii=False))
    return esc(v)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


class _Images:
    """Images as data URIs (re-encoded as PNG, at most IMAGE_MAX_SIDE px), cached by path."""

    def __init__(self) -> None:
        self.cache: dict[Path, str | None] = {}

    def uri(self, path: Path | None) -> str | None:
        if path is None:
            return None
        if path not in self.cache:
            self.cache[path] = self._encode(path)
        return self.cache[path]

    @staticmethod
    def _encode(path: Path) -> str | None:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((IMAGE_MAX_SIDE, IMAGE_MAX_SIDE))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
        except Exception:  # a missing or broken image becomes a note, never a crash
            return None
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def tag(self, path: Path | None, alt: str, cls: str = "thumb") -> str:
        if path is None:
            return ""
        uri = self.uri(path)
        if uri is None:
            return f'<p class="note">image not readable: {esc(path)}</p>'
        return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}">'


def _summary_section(run_dir: Path, summary: dict | None, why: str | None, methods: list[str]) -> str:
    out = ['<section id="summary"><h2>Summary</h2>']
    if summary is None:
        out.append(note(f"summary.json: {why} (the run has not finished yet?); the table below is "
                        "built from the per-method eval.json files."))
    run_keys = [(k, v) for k, v in (summary or {}).items() if k != "methods"]
    if run_keys:
        out.append('<table class="run"><tbody>')
        out += [f"<tr><th>{esc(k)}</th><td class=\"num\">{_fmt(v)}</td></tr>" for k, v in run_keys]
        out.append("</tbody></table>")
    rows = (summary or {}).get("methods")
    rows = rows if isinstance(rows, dict) else {}
    cols: list[str] = []
    for m in methods:
        r = rows.get(m)
        for k in (r if isinstance(r, dict) else {}):
            if k not in cols and k not in DIFF_KEYS:
                cols.append(str(k))
    evals = {m: read_json(run_dir / m / "eval.json")[0] for m in methods}
    diffs = {m: _method_diff(run_dir, m, rows.get(m)) for m in methods}
    if not methods:
        out.append(note("No methods found: neither summary.json nor any RUN/<method>/ folder."))
    else:
        out.append('<h3>Methods</h3><table class="summary"><thead><tr><th>method</th>')
        out += [f"<th>{esc(c)}</th>" for c in cols]
        out.append("<th>held-out (eval.json)</th><th>n</th><th>Δ vs SFT [95% CI]</th></tr></thead><tbody>")
        for m in methods:
            r = rows.get(m) if isinstance(rows.get(m), dict) else {}
            cells = "".join(f'<td class="num">{_fmt(r.get(c, ""))}</td>' for c in cols)
            ev = evals[m]
            if ev is not None and _num(ev.get("value")) is not None:
                held = f'{esc(ev.get("metric", "metric"))} = {_fmt(ev["value"])}'
                n = _fmt(ev.get("n", ""))
            else:
                held, n = '<span class="meta">no evaluation yet</span>', ""
            out.append(f"<tr><th>{esc(m)}</th>{cells}<td class=\"num\">{held}</td><td class=\"num\">{n}</td>"
                       f"{_diff_cell(m, diffs[m])}</tr>")
        out.append("</tbody></table>")
        out.append(f'<p class="meta">Δ vs SFT: the mean per-prompt held-out score difference against {esc(REFERENCE)} on the '
                   f"prompts both answered (n), with its paired bootstrap {LEVEL:.0%} interval ({RESAMPLES} resamples of "
                   f"the prompts, seed {SEED}); an interval that excludes 0 marks a difference larger than the "
                   "prompt-to-prompt resampling noise.</p>")
    out.append("</section>")
    return "".join(out)


def _method_diff(run_dir: Path, method: str, entry) -> PairedDiff | None:
    """The method's difference to SFT: as summary.json recorded it, else from the predictions files."""
    e = entry if isinstance(entry, dict) else {}
    vals = [_num(e.get(k)) for k in DIFF_KEYS]
    if all(v is not None for v in vals[:3]):
        return PairedDiff(vals[0], vals[1], vals[2], int(vals[3]) if vals[3] is not None else 0)
    try:
        return diff_vs_reference(run_dir, method)
    except ValueError:  # e.g. unreadable scores: the report notes nothing rather than failing
        return None


def _diff_cell(method: str, d: PairedDiff | None) -> str:
    if method == REFERENCE:
        return '<td class="meta">reference</td>'
    if d is None:
        return '<td class="meta">no paired predictions</td>'
    n = f' <span class="meta">n = {d.n}</span>' if d.n else ""
    return f'<td class="num diff">{esc(d.format())}{n}</td>'


def _curves_section(run_dir: Path) -> str:
    out = ['<section id="curves"><h2>Training curves</h2>']
    try:
        png = write_curves(run_dir).read_bytes()
    except Exception as e:  # plotting must not take the report down
        out.append(note(f"could not draw curves.png: {type(e).__name__}: {e}"))
    else:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        out.append(f'<img class="curves" src="{uri}" alt="training curves">')
    skipped = {m: read_rows(run_dir / m / "metrics.jsonl").skipped for m in method_names(run_dir, None)}
    for m, k in skipped.items():
        if k:
            out.append(note(f"{m}/metrics.jsonl: {k} line(s) were not JSON objects and were skipped."))
    out.append("</section>")
    return "".join(out)


def _margin_bar(r: float | None, scale: float) -> str:
    if r is None:
        return '<div class="barcell">?</div>'
    w = 0.0 if scale <= 0 else min(50.0, 50.0 * abs(r) / scale)
    side = "pos" if r >= 0 else "neg"
    return (f'<div class="barcell"><div class="bar margin" title="r = {r:+.4f}"><span class="axis"></span>'
            f'<span class="fill {side}" style="width:{w:.2f}%"></span></div>{r:+.3f}</div>')


def _dx_bar(p: float | None) -> str:
    if p is None:
        return '<div class="barcell">?</div>'
    w = max(0.0, min(100.0, 100.0 * p))
    return (f'<div class="barcell"><div class="bar dx" title="D_x = {p:.4f}">'
            f'<span class="fill" style="width:{w:.2f}%"></span></div>{p:.3f}</div>')


def _correct_mark(v) -> str:
    x = _num(v)
    if x is None:
        return ""
    if x == 1.0:
        return '<span class="ok">✓</span>'
    if x == 0.0:
        return '<span class="bad">✗</span>'
    return f'<span class="meta">score {x:.3g}</span>'


def _rollout_card(run_dir: Path, row: dict, logged: int, pred: dict | None, records: dict,
                  images: _Images, is_open: bool) -> str:
    rid = row.get("id", "?")
    rec = records.get(str(rid))
    prompt = row.get("prompt", rec.prompt if rec else "")
    img_path = resolve_image(run_dir, row["image"]) if row.get("image") else (
        Path(rec.image) if rec and rec.image else None)
    cands = row.get("candidates") if isinstance(row.get("candidates"), list) else []
    margins = row.get("margins") if isinstance(row.get("margins"), list) else []
    target = row.get("target") if isinstance(row.get("target"), list) else []
    rs = [_num(margins[k]) if k < len(margins) else None for k in range(len(cands))]
    ds = [_num(target[k]) if k < len(target) else None for k in range(len(cands))]
    scale = max([abs(r) for r in rs if r is not None] + [0.0])
    best = max(range(len(cands)), key=lambda k: ds[k] if ds[k] is not None else -1.0) if any(
        d is not None for d in ds) else None
    mark = _correct_mark(pred.get("correct")) if pred else ""
    head = (f"<summary><b>{esc(rid)}</b> · step {esc(row.get('step', '?'))} · "
            f"{esc(str(prompt)[:90])} {mark}</summary>")
    body = [f'<div class="card"><div class="thumb">{images.tag(img_path, f"image of {rid}")}'
            + ("" if img_path else '<span class="meta">text only</span>') + "</div><div class=\"body\">"]
    body.append(f'<div class="label">question</div><div class="text question">{esc(prompt)}</div>')
    body.append(f'<div class="label">teacher anchor a</div><div class="text anchor">{esc(row.get("anchor", ""))}</div>')
    if len(margins) != len(cands) or (target and len(target) != len(cands)):
        body.append(note(f"{len(cands)} candidates but {len(margins)} margins and {len(target)} target "
                         "values; missing values show as ?"))
    if cands:
        body.append('<table class="candidates"><thead><tr><th>k</th><th>candidate y_k</th>'
                    "<th>margin r_k = g(x,a,y_k) − g(x,a,a)</th><th>target D_x(k)</th></tr></thead><tbody>")
        anchor = normalize_answer(str(row.get("anchor", "")))
        for k, c in enumerate(cands):
            cls = ' class="best"' if k == best else ""
            same = ' <span class="meta">= anchor</span>' if normalize_answer(str(c)) == anchor else ""
            body.append(f'<tr{cls}><td class="num">{k}</td><td><span class="text candidate">{esc(c)}</span>{same}</td>'
                        f"<td>{_margin_bar(rs[k], scale)}</td><td>{_dx_bar(ds[k])}</td></tr>")
        body.append("</tbody></table>")
    else:
        body.append(note("no candidates logged for this prompt"))
    if pred is not None:
        body.append(f'<div class="final"><span class="label">final answer (held-out evaluation)</span> '
                    f'<span class="text prediction">{esc(pred.get("prediction", ""))}</span> {mark}'
                    f' <span class="meta">reference: {esc(pred.get("reference", ""))}</span></div>')
    if logged > 1:
        body.append(f'<p class="meta">logged at {logged} steps; the latest is shown.</p>')
    body.append("</div></div>")
    return f'<details class="prompt"{" open" if is_open else ""}>{head}{"".join(body)}</details>'


MAIN_METHOD = "ldl_grpo"   # the toolkit's method (README, Methods), shown first when the run's objective is not known


def main_method(run_dir: Path, candidates: list[str]) -> str | None:
    """The method a reader came for among `candidates`: the run's `train.objective` (RUN/config.yaml), else
    LDL-GRPO, else the first one."""
    objective = None
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        objective = ((cfg or {}).get("train") or {}).get("objective")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    for m in (objective, MAIN_METHOD):
        if m in candidates:
            return m
    return candidates[0] if candidates else None


def _rollouts_section(run_dir: Path, methods: list[str], records: dict, images: _Images,
                      max_prompts: int) -> str:
    out = ['<section id="rollouts"><h2>Per-prompt browser (RL rollouts)</h2><p class="meta">'
           "Margin r_k: the student's anchor-conditioned score of candidate k minus that of the anchor "
           "(green: judged better than the anchor, red: worse; bars scaled to the prompt's largest |r|). "
           "D_x(k) ∝ sigmoid(γ·r_k)·exp(r_k/τ): the target distribution over the K candidates; "
           "the highlighted row has the largest D_x.</p>"]
    any_rollouts = False
    logged = {m: read_rows(run_dir / m / "rollouts.jsonl") for m in methods}
    no_candidates = [m for m, rr in logged.items() if rr.rows and not any(r.get("candidates") for r in rr.rows)]
    main = main_method(run_dir, [m for m, rr in logged.items() if rr.rows and m not in no_candidates])
    if no_candidates:
        out.append(note(f"{', '.join(no_candidates)}: no candidates are sampled (the objective trains on the "
                        "anchor alone), so there is nothing to browse."))
    for m in sorted(methods, key=lambda m: m != main):   # the main method first, its first prompt open
        rr = logged[m]
        if not rr.rows or m in no_candidates:
            continue
        any_rollouts = True
        latest: dict[str, dict] = {}
        counts: dict[str, int] = {}
        for row in rr.rows:
            rid = str(row.get("id", "?"))
            counts[rid] = counts.get(rid, 0) + 1
            if rid not in latest or (_num(row.get("step")) or 0) >= (_num(latest[rid].get("step")) or 0):
                latest[rid] = row
        preds = {str(p.get("id")): p for p in read_rows(run_dir / m / "predictions.jsonl").rows}
        out.append(f'<h3 id="rollouts-{esc(m)}">{esc(m)} <span class="meta">{len(latest)} prompts</span></h3>')
        if rr.skipped:
            out.append(note(f"{m}/rollouts.jsonl: {rr.skipped} line(s) were not JSON objects and were skipped."))
        ids = list(latest)
        if len(ids) > max_prompts:
            out.append(note(f"showing the first {max_prompts} of {len(ids)} prompts"))
        for i, rid in enumerate(ids[:max_prompts]):
            out.append(_rollout_card(run_dir, latest[rid], counts[rid], preds.get(rid), records, images,
                                     i == 0 and m == main))
    if not any_rollouts:
        out.append(note("No rollouts.jsonl in any method folder yet: the RL stage has not logged rollouts "
                        "(SFT-only methods log none)."))
    out.append("</section>")
    return "".join(out)


def _predictions_section(run_dir: Path, methods: list[str], records: dict, images: _Images,
                         max_rows: int) -> str:
    out = ['<section id="predictions"><h2>Held-out predictions</h2>']
    preds = {m: {str(p.get("id")): p for p in read_rows(run_dir / m / "predictions.jsonl").rows} for m in methods}
    shown = [m for m in methods if preds[m]]
    if not shown:
        out.append(note("No predictions.jsonl yet: run `vlrlcd eval` (or finish training) to fill this table."))
        out.append("</section>")
        return "".join(out)
    ids: list[str] = []
    for m in shown:
        ids += [i for i in preds[m] if i not in ids]
    if len(ids) > max_rows:
        out.append(note(f"showing the first {max_rows} of {len(ids)} prompts"))
    out.append('<table class="predictions"><thead><tr><th>id</th><th>image</th><th>question</th><th>reference</th>')
    out += [f"<th>{esc(m)}</th>" for m in shown]
    out.append("</tr></thead><tbody>")
    for rid in ids[:max_rows]:
        first = next(preds[m][rid] for m in shown if rid in preds[m])
        rec = records.get(rid)
        img = images.tag(Path(rec.image), f"image of {rid}", "small") if rec and rec.image else ""
        cells = []
        for m in shown:
            p = preds[m].get(rid)
            cells.append("<td></td>" if p is None else
                         f'<td class="text prediction">{esc(p.get("prediction", ""))} {_correct_mark(p.get("correct"))}</td>')
        out.append(f"<tr><td>{esc(rid)}</td><td>{img}</td><td class=\"text\">{esc(first.get('prompt', ''))}</td>"
                   f"<td class=\"text\">{esc(first.get('reference', ''))}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table></section>")
    return "".join(out)


def render_report(run_dir: str | Path, max_prompts: int = 100, max_rows: int = 200) -> str:
    """The report page as a string (also writes RUN/curves.png)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VlrlcdError(f"run directory {run_dir} does not exist; train first (vlrlcd train CONFIG)")
    summary, why = read_json(run_dir / "summary.json")
    methods = method_names(run_dir, summary)
    records: dict = {}
    notes: list[str] = []
    for split in ("train", "eval"):
        recs, problem = read_records(run_dir / "data" / f"{split}.jsonl")
        records.update(recs)
        if problem:
            notes.append(f"data/{split}.jsonl could not be read: {problem}")
    images = _Images()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vlrlcd report: {esc(run_dir.name)}</title><style>{CSS}</style></head><body><main>",
        f'<h1>vlrlcd run report</h1><p class="meta">run directory {esc(run_dir.resolve())} · generated {esc(when)}</p>',
        '<nav><a href="#summary">summary</a><a href="#curves">training curves</a>'
        '<a href="#rollouts">per-prompt browser</a><a href="#predictions">held-out predictions</a></nav>',
        "".join(note(n) for n in notes),
        _summary_section(run_dir, summary, why, methods),
        _curves_section(run_dir),
        _rollouts_section(run_dir, methods, records, images, max_prompts),
        _predictions_section(run_dir, methods, records, images, max_rows),
        "</main></body></html>\n",
    ]
    return "".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html (self-contained: inline CSS, base64 PNGs, no scripts) and RUN/curves.png; a run
    directory that cannot be written is a one-line VlrlcdError saying what to do."""
    run_dir = Path(run_dir)
    out = run_dir / "report.html"
    if run_dir.is_dir():
        _check_writable(run_dir, out.with_name(out.name + ".probe"))
    page = render_report(run_dir)
    try:
        atomic_write(out, page, fsync=False)
    except OSError as e:  # e.g. the disk filled up while writing
        raise _unwritable(run_dir, out, e) from None
    return out


def _check_writable(run_dir: Path, probe: Path) -> None:
    """Fail before any rendering when the report cannot be written beside the run."""
    try:
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as e:
        raise _unwritable(run_dir, run_dir / "report.html", e) from None


def _unwritable(run_dir: Path, out: Path, e: OSError) -> VlrlcdError:
    return VlrlcdError(f"cannot write {out}: {e.strerror or e}; the report is written into the run directory, so "
                       f"make {run_dir} writable or copy it elsewhere (cp -r {run_dir} /tmp/run) and report on the copy")


def main(argv: list[str] | None = None) -> int:
    """`python -m vlrlcd.evaluation.report RUN_DIR`: write the report and print its path."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vlrlcd.evaluation.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(write_report(args[0]))
    except VlrlcdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
