"""report.html and curves.png from fixture run directories; one test renders the page in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from vlrlcd.datasets.records import Record, write_jsonl
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.plots import global_steps, write_curves
from vlrlcd.evaluation.report import render_report, write_report

EVIL = '<script>document.title="pwned"</script>'
EVIL_IMG = '<img src=x onerror="document.title=1">'
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


def _shape_png(path: Path, colour: tuple[int, int, int]) -> None:
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    for x in range(8, 24):
        for y in range(8, 24):
            im.putpixel((x, y), colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")


def make_run(run: Path) -> Path:
    """A complete run directory as the training code writes it: two methods, ldl_grpo with rollouts."""
    data = run / "data"
    _shape_png(data / "images" / "t0.png", (220, 30, 30))
    _shape_png(data / "images" / "t1.png", (30, 30, 220))
    _shape_png(data / "images" / "e0.png", (30, 180, 30))
    write_jsonl([Record("t0", "What color is the shape?", "images/t0.png", "red"),
                 Record("t1", "What color is the shape?", "images/t1.png", "blue")], data / "train.jsonl")
    write_jsonl([Record("e0", "What color is the shape?", "images/e0.png", "green"),
                 Record("e1", "What is 3 + 4?", None, "7")], data / "eval.jsonl")
    (run / "summary.json").write_text(json.dumps({
        "methods": {"sft": {"accuracy": 0.5}, "ldl_grpo": {"accuracy": 1.0, "mean_margin": -0.12}},
        "teacher_calls": 2, "train_prompts": 2, "eval_prompts": 2, "seconds": 12.5}))
    for m, acc in (("sft", 0.5), ("ldl_grpo", 1.0)):
        rows = [{"stage": "sft", "step": s, "loss": 2.0 / s} for s in range(1, 6)]
        if m == "ldl_grpo":
            rows += [{"stage": "rl", "step": s, "loss": 0.5 - 0.05 * s, "kl": 0.01 * s,
                      "margin_mean": -0.5 + 0.1 * s, "dx_entropy": 1.2, "teacher_calls": 2,
                      "seconds": s, "lr": 1e-4} for s in range(1, 5)]
        _jsonl(run / m / "metrics.jsonl", rows, tail='{"stage": "rl", "step": 9, "lo')  # cut-off last line
        (run / m / "eval.json").write_text(json.dumps({"metric": "accuracy", "value": acc, "n": 2}))
        _jsonl(run / m / "predictions.jsonl", [
            {"id": "e0", "prompt": "What color is the shape?", "prediction": "green" if acc == 1 else EVIL_IMG,
             "reference": "green", "correct": acc == 1},
            {"id": "e1", "prompt": "What is 3 + 4?", "prediction": "7", "reference": "7", "correct": True},
            {"id": "t0", "prompt": "What color is the shape?", "prediction": "red", "reference": "red",
             "correct": True}])
    _jsonl(run / "ldl_grpo" / "rollouts.jsonl", [
        {"step": 1, "id": "t0", "prompt": "What color is the shape?", "image": "data/images/t0.png",
         "anchor": "red", "candidates": ["blue", "red", "reed", "green"],
         "margins": [-1.0, 0.0, -0.5, -2.0], "target": [0.2, 0.4, 0.3, 0.1]},
        {"step": 3, "id": "t0", "prompt": "What color is the shape?", "image": "data/images/t0.png",
         "anchor": "red", "candidates": ["red", EVIL, "a red square", "green"],
         "margins": [0.0, -1.5, 0.25, -2.0], "target": [0.35, 0.05, 0.5, 0.1]},
        {"step": 3, "id": "t1", "prompt": "What color is the <b>shape</b>?",
         "image": str((data / "images" / "t1.png").resolve()), "anchor": "blue & bold",
         "candidates": ["blue", "navy"], "margins": [0.1], "target": [0.6, 0.4]},
    ])
    return run


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[tuple[str, dict]] = []
        self.candidate_texts: list[str] = []
        self._in_candidate = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "span" and "candidate" in (a.get("class") or "").split():
            self._in_candidate += 1
            self.candidate_texts.append("")

    def handle_endtag(self, tag):
        if tag == "span" and self._in_candidate:
            self._in_candidate -= 1

    def handle_data(self, data):
        if self._in_candidate:
            self.candidate_texts[-1] += data

    def count(self, tag: str, cls: str | None = None) -> int:
        return sum(1 for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split()))


def _parse(page: str) -> _Dom:
    d = _Dom()
    d.feed(page)
    return d


def test_global_steps_shift_the_rl_stage_past_sft():
    rows = [{"stage": "sft", "step": 1}, {"stage": "sft", "step": 2}, {"stage": "rl", "step": 1},
            {"stage": "rl"}, {"stage": "rl", "step": 3}]
    assert global_steps(rows) == [1, 2, 3, 4, 5]


def test_report_structure_and_escaping(tmp_path):
    run = make_run(tmp_path / "run")
    out = write_report(run)
    assert out == run / "report.html" and (run / "curves.png").stat().st_size > 10_000
    page = out.read_text(encoding="utf-8")
    dom = _parse(page)
    assert dom.count("script") == 0  # no script element at all: the page has no JS and nothing injected
    assert dom.count("table", "summary") == 1
    # one curves PNG + two rollout images + two eval thumbnails (e1 is text only), all embedded
    imgs = [a for t, a in dom.tags if t == "img"]
    assert len(imgs) == 5 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    # t0 shows its latest step (3) with the injected candidate as text; t1 has a missing margin
    assert dom.candidate_texts == ["red", EVIL, "a red square", "green", "blue", "navy"]
    assert dom.count("div", "margin") == 5 and dom.count("div", "dx") == 6
    assert "&lt;img src=x onerror=&quot;document.title=1&quot;&gt;" in page
    assert "What color is the &lt;b&gt;shape&lt;/b&gt;?" in page and "blue &amp; bold" in page
    assert "1 line(s) were not JSON objects" in page  # the cut-off metrics line is reported
    assert "2 candidates but 1 margins" in page
    assert page.count("= anchor</span>") == 1  # candidate "red" for anchor "red" (t1's anchor differs)

    # margin bars: the largest |r| (2.0) fills half the track, to the left
    assert 'class="fill neg" style="width:50.00%"' in page
    assert 'class="fill pos" style="width:6.25%"' in page  # r = 0.25 -> 0.25 / 2 * 50


def test_report_tolerates_an_unfinished_run(tmp_path):
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    _jsonl(run / "sft" / "metrics.jsonl", [{"stage": "sft", "step": 1, "loss": 1.0}])
    page = write_report(run).read_text(encoding="utf-8")
    assert "summary.json: summary.json not found" in page
    assert "No rollouts.jsonl" in page and "No predictions.jsonl" in page and "no evaluation yet" in page
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No methods found" in render_report(empty)
    with pytest.raises(VlrlcdError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(VlrlcdError, match="does not exist"):
        write_curves(tmp_path / "nope")


def test_report_notes_broken_files(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "summary.json").write_text("{not json")
    (run / "data" / "images" / "t0.png").write_bytes(b"\x89PNG broken")
    page = write_report(run).read_text(encoding="utf-8")
    assert "summary.json is not valid JSON" in page
    assert "image not readable" in page
    assert 'table class="summary"' in page  # methods still found from their folders


def _ensure_chromium() -> str:
    if not os.path.exists(CHROMIUM):
        try:
            subprocess.run("apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium",
                           shell=True, check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"chromium missing and could not be installed: {e}")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium missing and could not be installed")
    return CHROMIUM


def _chromium(args: list[str], profile: str) -> subprocess.Popen:
    return subprocess.Popen([_ensure_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_report_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "run")
    url = write_report(run).resolve().as_uri()
    shot = tmp_path / "report.png"
    profiles = [tempfile.mkdtemp(prefix="chromium-", dir=tmp_path) for _ in range(2)]
    # both at once: screenshot and DOM dump each start their own browser
    p_shot = _chromium([f"--screenshot={shot}", "--window-size=1280,1500", url], profiles[0])
    p_dom = _chromium(["--dump-dom", "--virtual-time-budget=2000", url], profiles[1])
    dom_text, dom_err = p_dom.communicate(timeout=60)
    _, shot_err = p_shot.communicate(timeout=60)
    assert p_dom.returncode == 0, dom_err[-2000:]
    assert p_shot.returncode == 0 and shot.exists(), shot_err[-2000:]
    keep = os.environ.get("VLRLCD_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    with Image.open(shot) as im:  # a real rendering, not a blank page
        assert im.size == (1280, 1500)
        assert len(im.convert("RGB").resize((64, 64)).getcolors(64 * 64) or []) > 20
    dom = _parse(dom_text)
    assert dom.count("script") == 0
    assert dom.count("table", "summary") == 1 and dom.count("table", "candidates") == 2
    imgs = [a for t, a in dom.tags if t == "img"]
    assert len(imgs) == 5 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert EVIL in dom.candidate_texts  # the <script> candidate is shown as text
    assert dom.count("span", "fill") == 11 and dom.count("div", "bar") == 11
    assert "pwned" not in dom_text.split("<title>")[1].split("</title>")[0]


def test_resolve_image_tries_run_data_and_working_directory(tmp_path, monkeypatch):
    from vlrlcd.evaluation.rundir import resolve_image

    run = make_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert resolve_image(run, "data/images/t0.png") == run / "data/images/t0.png"
    assert resolve_image(run, "images/t0.png") == run / "data/images/t0.png"
    assert resolve_image(run, "run/data/images/t0.png") == Path("run/data/images/t0.png")
    assert resolve_image(run, "missing.png") == run / "missing.png"
    assert resolve_image(run, None) is None


def test_report_shows_the_paired_difference_against_sft(tmp_path):
    """The summary table's Δ vs SFT column: from summary.json when write_summary recorded it, else from the two
    predictions files (make_run: ldl_grpo fixes e0, so d = [1, 0, 0] on the 3 shared prompts)."""
    from vlrlcd.evaluation.stats import paired_bootstrap
    from vlrlcd.summary import write_summary

    run = make_run(tmp_path / "run")
    want = paired_bootstrap([0.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    page = render_report(run)
    assert "<th>Δ vs SFT [95% CI]</th>" in page and "reference</td>" in page
    assert f'<td class="num diff">{want.format()} <span class="meta">n = 3</span></td>' in page
    assert "paired bootstrap 95% interval (2000 resamples" in page
    summary = json.loads((run / "summary.json").read_text())
    write_summary(run, summary)
    summary["methods"]["ldl_grpo"].update(diff_vs_sft=0.25, diff_low=-0.5, diff_high=0.75)  # recorded numbers win
    (run / "summary.json").write_text(json.dumps(summary))
    page = render_report(run)
    assert "+0.250 [-0.500, +0.750]" in page and "<th>diff_low</th>" not in page
    (run / "ldl_grpo" / "predictions.jsonl").unlink()
    (run / "summary.json").write_text(json.dumps({"methods": {"sft": {}, "ldl_grpo": {}}}))
    assert "no paired predictions" in render_report(run)


def test_browser_opens_on_the_main_method_and_skips_methods_without_candidates(tmp_path):
    run = make_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["methods"] = {"sft": {"accuracy": 0.5}, "sft2": {"accuracy": 0.5},
                          "anchor_rank_dpo": {"accuracy": 0.5}, "ldl_grpo": {"accuracy": 1.0}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text("train:\n  objective: ldl_grpo\n")
    _jsonl(run / "sft2" / "rollouts.jsonl", [{"step": 1, "id": "t0", "prompt": "p", "anchor": "red",
                                              "candidates": [], "margins": [], "target": []}])
    _jsonl(run / "anchor_rank_dpo" / "rollouts.jsonl", [
        {"step": 1, "id": "t1", "prompt": "p", "anchor": "blue", "candidates": ["blue", "red"],
         "margins": [0.0, -1.0], "target": [0.7, 0.3]}])
    page = render_report(run)
    browser = page[page.index('id="rollouts"'):page.index('id="predictions"')]
    assert browser.index('id="rollouts-ldl_grpo"') < browser.index('id="rollouts-anchor_rank_dpo"')
    assert 'id="rollouts-sft2"' not in browser and "sft2: no candidates are sampled" in browser
    assert "no candidates logged for this prompt" not in browser
    first_open = browser.index('<details class="prompt" open>')
    assert browser.index('id="rollouts-ldl_grpo"') < first_open < browser.index('id="rollouts-anchor_rank_dpo"')
    assert browser.count('<details class="prompt" open>') == 1
    # without a config, LDL-GRPO is still the one shown first
    (run / "config.yaml").unlink()
    page = render_report(run)
    assert page.index('id="rollouts-ldl_grpo"') < page.index('id="rollouts-anchor_rank_dpo"')
