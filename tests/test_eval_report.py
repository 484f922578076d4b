"""`dubber eval`'s report (dubber.eval.report): what the eval keeps for it (per-clip series and
videos), the page, its rebuild from the folder alone, and the page in a real browser (headless
Chromium through playwright; skipped when either is missing)."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import helpers
from dubber import media
from dubber.errors import DubberError
from dubber.eval import report

SYSTEMS = ["ground_truth", "static_frame", "shifted_audio", "dck", "dck:dub"]


@pytest.fixture(scope="module")
def evaluated(dck_eval):
    """The shared two-clip eval folder (conftest.dck_eval)."""
    return dck_eval[0]


def _local_references(page: str):
    return sorted(set(re.findall(r'(?:src|href)="([^"#:]+)"', page)))


@pytest.mark.slow
def test_eval_keeps_series_and_videos_consistent_with_the_table(evaluated):
    rows = {(r["clip"], r["system"]): r for r in csv.DictReader(open(evaluated / "clips.csv"))}
    for clip in ("clips_clip0", "clips_clip1"):
        series = json.loads((evaluated / "series" / f"{clip}.json").read_text())
        n = series["frames"]
        assert n == int(rows[clip, "ground_truth"]["frames"]) == 35 and series["fps"] == 25
        assert set(series["opening"]) == {"ground_truth", "static_frame", "dck", "dck:dub"}
        assert all(len(v) == n for v in series["opening"].values())
        assert len(set(series["opening"]["static_frame"])) == 1  # a still mouth
        real = np.array(series["opening"]["ground_truth"], float)
        assert np.ptp(real) > 0  # the made face's mouth moves
        assert len(series["speech"]["own"]) == n and len(series["speech"]["driving"]) == n
        assert series["driving_clip"] == ("clips_clip1" if clip == "clips_clip0" else "clips_clip0")
        # The curve behind the table's sync_offset: its minimum is at that offset, for every system.
        offsets = series["offsets"]
        assert offsets == list(range(15, -16, -1))
        assert set(series["offset_curve"]) == {"ground_truth", "shifted_audio", "dck", "dck:dub"}
        for system, curve in series["offset_curve"].items():
            curve = np.array([np.nan if v is None else v for v in curve])
            assert curve.shape == (31,) and np.all((curve[np.isfinite(curve)] >= 0) & (curve[np.isfinite(curve)] <= 2))
            assert offsets[int(np.nanargmin(curve))] == int(float(rows[clip, system]["sync_offset"]))
        # Videos: the real clip re-encoded with its audio, each generated one as the eval scored it.
        assert set(series["videos"]) == {"ground_truth", "dck", "dck:dub"}
        for system, relative in series["videos"].items():
            info = media.probe(evaluated / relative)
            assert info.has_video and info.has_audio and (info.width, info.height) == (192, 160)
        source = helpers.decode_frames(series["source"])
        kept = helpers.decode_frames(evaluated / series["videos"]["ground_truth"])
        assert len(kept) == n and np.mean([helpers.psnr(a, b) for a, b in zip(kept, source)]) > 35


@pytest.mark.slow
def test_report_page_shows_the_table_plots_sheets_and_videos(evaluated):
    page = (evaluated / "report.html").read_text()
    summary = json.loads((evaluated / "summary.json").read_text())["systems"]
    table = re.search(r'<table id="summary">.*?</table>', page).group(0)
    assert re.findall(r'data-system="([^"]+)"', table) == SYSTEMS
    assert f"{summary['dck']['lmd']:.3f}" in table
    references = _local_references(page)
    assert references and all((evaluated / r).is_file() for r in references), references
    for clip in ("clips_clip0", "clips_clip1"):
        assert f"plots/{clip}.png" in references and f"sheets/mouths/{clip}.png" in references
        assert {f"videos/{clip}.mp4", f"videos/{clip}.dck.mp4", f"videos/{clip}.dck-dub.mp4"} <= set(references)
    assert page.count("<video") == 6
    from PIL import Image

    with Image.open(evaluated / "plots" / "clips_clip0.png") as plot:
        assert plot.width >= 800 and len(np.unique(np.asarray(plot.convert("L")))) > 20  # drawn, not blank


@pytest.mark.slow
def test_report_rebuilds_from_the_folder_alone(evaluated, tmp_path):
    copy = tmp_path / evaluated.name  # same folder name: the page's title is the folder's
    shutil.copytree(evaluated, copy)
    (copy / "report.html").unlink()
    shutil.rmtree(copy / "plots")
    assert report.write_report(copy) == copy / "report.html"
    assert (copy / "report.html").read_text() == (evaluated / "report.html").read_text()
    assert sorted(p.name for p in (copy / "plots").iterdir()) == ["clips_clip0.png", "clips_clip1.png"]
    # A folder from before the report kept series and videos: the table and the sheets still show.
    shutil.rmtree(copy / "series")
    shutil.rmtree(copy / "videos")
    page = report.write_report(copy).read_text()
    assert 'id="summary"' in page and "<video" not in page and "sheets/mouths/clips_clip0.png" in page
    assert not list((copy / "plots").iterdir())  # no series, no plots; none of the earlier ones stays


@pytest.mark.slow
def test_a_rerun_replaces_the_report_files(evaluated, tmp_path):
    """Fewer clips, no backbone, no expert: nothing of the earlier run's clips stays, and the plot
    has no offset panel to draw."""
    copy = tmp_path / "eval"
    shutil.copytree(evaluated, copy)
    clips = json.loads((copy / "series" / "clips_clip0.json").read_text())["source"]
    code, _, err = helpers.run_cli_subprocess(
        ["eval", "--dataset", "folder", "--root", Path(clips).parent, "--limit", "1", "--no-sync-expert",
         "--out", copy, "-q"])
    assert code == 0, err
    assert sorted(p.name for p in (copy / "videos").iterdir()) == ["clips_clip0.mp4"]
    assert sorted(p.name for p in (copy / "series").iterdir()) == ["clips_clip0.json"]
    assert sorted(p.name for p in (copy / "plots").iterdir()) == ["clips_clip0.png"]
    series = json.loads((copy / "series" / "clips_clip0.json").read_text())
    assert series["offset_curve"] == {} and series["offsets"] == [] and "dck" not in series["opening"]
    page = (copy / "report.html").read_text()
    assert page.count("<video") == 1 and "clips_clip1" not in page


def test_report_of_a_folder_that_is_not_an_eval_says_so(tmp_path):
    with pytest.raises(DubberError, match="not a `dubber eval` folder"):
        report.write_report(tmp_path)


def _chromium():
    import os

    for name in (os.environ.get("DUBBER_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = name and shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.slow
def test_report_in_headless_chromium(evaluated, tmp_path):
    """The page as a person sees it: the table, every plot and sheet drawn, every video decoded and playing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto((evaluated / "report.html").as_uri())
            systems = page.eval_on_selector_all("#summary tbody tr", "rows => rows.map(r => r.dataset.system)")
            assert systems == SYSTEMS
            cells = page.eval_on_selector_all("#summary tbody tr:first-child td", "cells => cells.map(c => c.textContent)")
            assert "100.000" in cells  # ground truth's PSNR (capped)
            images = page.locator("img.plot, img.mouths")
            assert images.count() == 4
            for k in range(images.count()):
                images.nth(k).scroll_into_view_if_needed()  # lazy images load when seen
                images.nth(k).evaluate("img => img.complete || new Promise(done => img.onload = done)")
                assert images.nth(k).evaluate("img => img.naturalWidth") > 0
            videos = page.locator("video")
            assert videos.count() == 6
            page.wait_for_function("Array.from(document.querySelectorAll('video')).every(v => v.readyState >= 1)",
                                   timeout=30000)
            sizes = videos.evaluate_all("vs => vs.map(v => [v.videoWidth, v.videoHeight, v.duration])")
            assert all(w == 192 and h == 160 and d > 1 for w, h, d in sizes), sizes
            # The browser decodes them: "play together" (a click, so sound is allowed) starts them all.
            page.locator("button.together").first.click()
            page.wait_for_function("Array.from(document.querySelector('.videos').querySelectorAll('video'))"
                                   ".every(v => v.currentTime > 0.3)", timeout=15000)
            page.evaluate("window.scrollTo(0, 0)")
            shot = page.screenshot(path=str(tmp_path / "report.png"))
        finally:
            browser.close()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
