"""The evaluation report: report.html beside clips.csv and summary.json in a `dubber eval` folder.

While it scores a clip the eval keeps what the report shows (keep_clip):

  series/<clip>.json            per frame: every system's mouth opening, the frames with speech;
                                per system: the sync expert's mean distance at each AV offset;
  videos/<clip>.mp4             the real clip, and videos/<clip>.<system>.mp4 each generated one
                                (H.264 yuv420p + AAC, what browsers play).

write_report(out_dir) draws plots/<clip>.png from the series with matplotlib and writes report.html:
the table of figures, then per clip its metrics, the videos side by side, the plots and the zoomed
mouth sheet. The page refers to those files by relative paths, so the folder is the report (move
it as a whole), and it can be rebuilt from the folder alone, without evaluating again.
"""

import csv
import html
import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from urllib.parse import quote

import numpy as np

from dubber import media
from dubber.errors import DubberError
from dubber.eval.run import BASELINES, COLUMNS, MOUTH_SHEETS, TABLE_NOTE

REPORT = "report.html"
SERIES = "series"
VIDEOS = "videos"
PLOTS = "plots"
SERIES_DECIMALS = 5  # openings are ~0.01-0.5 and distances ~0.5-2: 5 decimals keep every visible step
CLIP_COLUMNS = ("psnr", "ssim", "lmd", "mouth_corr", "mouth_psnr", "mouth_sharpness_ratio", "lse_d", "lse_c",
                "lse_c0", "sync_offset", "av_corr")  # the per-clip tables: the main figures, not every column
BASELINE_NOTES = {
    "ground_truth": "the real video (the ceiling)",
    "static_frame": "its first frame held (a model that does not beat it is not lip syncing)",
    "shifted_audio": "the real video against its audio delayed (sync must drop)",
}
PLOT_WIDTH = 11.0  # inches
PLOT_ROW_HEIGHT = 2.3  # inches per row of time series
PLOT_DPI = 100
REAL_COLOUR, STATIC_COLOUR, SHIFTED_COLOUR = "black", "0.6", "tab:orange"
SYSTEM_COLOURS = ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:cyan")
SPEECH_SHADE = dict(color="gold", alpha=0.25, linewidth=0)


# -- what the eval keeps -----------------------------------------------------------------------


def video_name(clip: str, system: str) -> str:
    """File name under videos/ of a clip's real video (system ground_truth) or a system's."""
    return f"{clip}.mp4" if system == "ground_truth" else f"{clip}.{system.replace(':', '-')}.mp4"


def clear(out_dir: Path) -> None:
    """Remove an earlier run's series, videos and plots (and nothing else), so none of a clip
    this run does not score stays."""
    for folder, pattern in ((SERIES, "*.json"), (VIDEOS, "*.mp4"), (PLOTS, "*.png")):
        for stale in (Path(out_dir) / folder).glob(pattern):
            stale.unlink()


def _floats(values) -> List[Optional[float]]:
    """[N] numbers -> JSON-ready list, NaN/inf as null (strict JSON has no NaN)."""
    return [round(float(v), SERIES_DECIMALS) if math.isfinite(v) else None for v in np.asarray(values, np.float64)]


def keep_clip(out_dir: Path, clip: str, source: Path, fps: float, real_frames: Sequence[np.ndarray],
              speech: Dict[str, np.ndarray], openings: Dict[str, np.ndarray], offset_curves: Dict[str, np.ndarray],
              generated: Dict[str, Path], driving_clip: Optional[str] = None) -> Path:
    """Write a clip's series and videos into the eval folder; return the series file.

    real_frames: BGR [n] as scored (re-encoded with the source's audio, so any source plays);
    speech: bool [n] per speech track ("own", and "driving" for a dub); openings: system ->
    mouth opening [n] (NaN without a face); offset_curves: system -> [O] mean distance, column o
    at audio shift o - O//2 (metrics.lse); generated: system -> its mp4 (copied)."""
    out_dir = Path(out_dir)
    (out_dir / VIDEOS).mkdir(parents=True, exist_ok=True)
    (out_dir / SERIES).mkdir(parents=True, exist_ok=True)
    videos = {"ground_truth": video_name(clip, "ground_truth")}
    height, width = real_frames[0].shape[:2]
    with media.atomic_output(out_dir / VIDEOS / videos["ground_truth"]) as tmp:
        with media.VideoWriter(tmp, fps, width, height, audio_path=source, duration=len(real_frames) / fps) as writer:
            for frame in real_frames:
                writer.write(frame)
    for system, path in generated.items():
        videos[system] = video_name(clip, system)
        with media.atomic_output(out_dir / VIDEOS / videos[system]) as tmp:
            shutil.copyfile(path, tmp)
    centre = max((len(c) for c in offset_curves.values()), default=0) // 2
    series = {
        "clip": clip, "source": str(source), "fps": fps, "frames": len(real_frames), "driving_clip": driving_clip,
        "speech": {track: [int(s) for s in frames] for track, frames in speech.items()},
        "opening": {system: _floats(values) for system, values in openings.items()},
        # AV offsets, frames, positive = the mouth moves after the sound (lse's sign): column o is
        # the audio shifted by o - centre, which finds a mouth trailing by centre - o.
        "offsets": [centre - o for o in range(2 * centre + 1)] if offset_curves else [],
        "offset_curve": {system: _floats(curve) for system, curve in offset_curves.items()},
        "videos": {system: f"{VIDEOS}/{name}" for system, name in videos.items()},
    }
    path = out_dir / SERIES / f"{clip}.json"
    with media.atomic_output(path) as tmp:
        tmp.write_text(json.dumps(series))
    return path


# -- plots -------------------------------------------------------------------------------------


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def _colours(systems: Sequence[str]) -> Dict[str, str]:
    """A colour per system: the baselines fixed, each backbone its own, a dub its backbone's."""
    colours = {"ground_truth": REAL_COLOUR, "static_frame": STATIC_COLOUR, "shifted_audio": SHIFTED_COLOUR}
    backbones = sorted({s.split(":")[0] for s in systems if s not in BASELINES})
    for k, backbone in enumerate(backbones):
        colours[backbone] = colours[f"{backbone}:dub"] = SYSTEM_COLOURS[k % len(SYSTEM_COLOURS)]
    return colours


def _shade_speech(ax, times: np.ndarray, speech: Sequence[int]) -> None:
    ax.fill_between(times, 0, 1, where=np.asarray(speech, bool), transform=ax.get_xaxis_transform(),
                    step="mid", **SPEECH_SHADE)


def plot_clip(series: dict, path: Path) -> Path:
    """plots/<clip>.png: mouth opening over time, real vs generated (a dub in its own row, shaded
    by the speech that drives it), and the sync expert's distance by AV offset for every system."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fps, openings = series["fps"], {s: _array(v) for s, v in series["opening"].items()}
    curves = {s: _array(v) for s, v in series.get("offset_curve", {}).items()}
    colours = _colours(list(openings) + list(curves))
    times = np.arange(series["frames"]) / fps
    dubs = [s for s in openings if s.endswith(":dub")]
    rows = 2 if dubs else 1
    figure = Figure(figsize=(PLOT_WIDTH, PLOT_ROW_HEIGHT * rows + 0.4), dpi=PLOT_DPI, layout="constrained")
    grid = figure.add_gridspec(rows, 2 if curves else 1, width_ratios=[3, 1.25] if curves else None)
    ax = figure.add_subplot(grid[0, 0])
    _shade_speech(ax, times, series["speech"]["own"])
    for system, values in openings.items():
        if system in dubs:
            continue
        style = dict(linestyle=":", linewidth=1.2) if system == "static_frame" else dict(
            linewidth=1.6 if system == "ground_truth" else 1.2)
        label = "real" if system == "ground_truth" else system
        ax.plot(times, values, color=colours[system], label=label, **style)
    ax.set_title("mouth opening (inner-lip gap / eye distance); shaded: speech", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="upper right", ncol=4, framealpha=0.8)
    ax.set_ylabel("opening", fontsize=8)
    ax.tick_params(labelsize=8)
    if dubs:
        dub_ax = figure.add_subplot(grid[1, 0], sharex=ax, sharey=ax)
        _shade_speech(dub_ax, times, series["speech"].get("driving", series["speech"]["own"]))
        for system in dubs:
            dub_ax.plot(times, openings[system], color=colours[system], label=system, linewidth=1.2)
        dub_ax.set_title(f"dubbed with the speech of {series.get('driving_clip') or 'the next clip'} (shaded)",
                         fontsize=9, loc="left")
        dub_ax.legend(fontsize=8, loc="upper right")
        dub_ax.set_ylabel("opening", fontsize=8)
        dub_ax.tick_params(labelsize=8)
        dub_ax.set_xlabel("seconds", fontsize=8)
    else:
        ax.set_xlabel("seconds", fontsize=8)
    if curves:
        offsets = np.asarray(series["offsets"])
        sync_ax = figure.add_subplot(grid[:, 1])
        sync_ax.axvline(0, color="0.8", linewidth=1)
        for system, curve in curves.items():
            if np.all(np.isnan(curve)):
                continue
            best = int(np.nanargmin(curve))
            style = "--" if system == "shifted_audio" or system.endswith(":dub") else "-"
            label = f"{'real' if system == 'ground_truth' else system}: min at {offsets[best]:+d}"
            sync_ax.plot(offsets, curve, style, color=colours[system], linewidth=1.2, label=label)
            sync_ax.plot(offsets[best], curve[best], "o", color=colours[system], markersize=4)
        sync_ax.set_title("sync expert: distance by AV offset", fontsize=9, loc="left")
        sync_ax.set_xlabel("offset, frames (+: mouth after sound)", fontsize=8)
        sync_ax.set_ylabel("mean distance", fontsize=8)
        sync_ax.tick_params(labelsize=8)
        sync_ax.legend(fontsize=7, loc="lower right", framealpha=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with media.atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


# -- the page ----------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 8px; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th:first-child, thead th { text-align: left; }
thead th { position: sticky; top: 0; background: #f4f4f4; white-space: normal; vertical-align: bottom; }
tr.baseline { color: #666; background: #fafafa; }
.note, .meta { color: #555; max-width: 80em; }
nav { display: flex; flex-wrap: wrap; gap: 0.2em 0.9em; }
.videos { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-end; margin: 0.8em 0; }
.videos figure { margin: 0; } .videos video { height: 240px; background: #000; display: block; }
figcaption { font-size: 12px; color: #444; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
img.mouths { image-rendering: pixelated; }
"""

SCRIPT = """
// Play a clip's videos from the start together; only the real clip keeps its sound.
document.querySelectorAll('button.together').forEach(button => button.addEventListener('click', () => {
  button.closest('.videos').querySelectorAll('video').forEach((video, k) => {
    video.pause(); video.currentTime = 0; video.muted = k > 0; video.play();
  });
}));
"""


def _number(value) -> str:
    """A table cell: integers as they are (clip counts, offsets), other numbers to 3 decimals, NaN empty."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return str(int(value))
        except ValueError:
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{number:.3f}" if math.isfinite(number) else ""


def _table(rows: List[dict], columns: Sequence[str], table_id: str = "") -> str:
    """rows: dicts with 'system' and the columns (numbers or CSV strings); columns empty everywhere are left out."""
    shown = [c for c in columns if any(_number(r.get(c)) for r in rows)]
    # A break opportunity after each underscore: 24 long names fit a screen's width on two lines.
    head = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>" for c in ["system", *shown])
    body = []
    for row in rows:
        system = row["system"]
        cells = "".join(f"<td>{_number(row.get(c))}</td>" for c in shown)
        kind = ' class="baseline"' if system in BASELINES else ""
        body.append(f'<tr{kind} data-system="{html.escape(system)}"><th>{html.escape(system)}</th>{cells}</tr>')
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _image(out_dir: Path, relative: str, alt: str, kind: str) -> str:
    if not (out_dir / relative).is_file():
        return ""
    return f'<img class="{kind}" src="{quote(relative)}" alt="{html.escape(alt)}" loading="lazy">'


def _videos(series: dict) -> str:
    figures = []
    for system, relative in series.get("videos", {}).items():
        label = "real" if system == "ground_truth" else system
        if system.endswith(":dub") and series.get("driving_clip"):
            label += f" (speech of {series['driving_clip']})"
        figures.append(f'<figure><video controls preload="metadata" src="{quote(relative)}" '
                       f'data-system="{html.escape(system)}"></video><figcaption>{html.escape(label)}</figcaption></figure>')
    if not figures:
        return ""
    return f'<div class="videos">{"".join(figures)}<button class="together">play together</button></div>'


def _clip_section(out_dir: Path, clip: str, rows: List[dict], series: Optional[dict]) -> str:
    parts = [f'<section class="clip" id="clip-{html.escape(clip)}"><h2>{html.escape(clip)}</h2>']
    if series:
        parts.append(f'<p class="meta">{html.escape(series["source"])}: {series["frames"]} frames at '
                     f'{series["fps"]:g} fps</p>')
    parts.append(_table(rows, CLIP_COLUMNS))
    if series:
        parts.append(_videos(series))
    parts.append(_image(out_dir, f"{PLOTS}/{clip}.png", f"mouth opening and sync-offset curve of {clip}", "plot"))
    parts.append(_image(out_dir, f"sheets/{MOUTH_SHEETS}/{clip}.png", f"zoomed mouths of {clip}", "mouths"))
    if (out_dir / "sheets" / f"{clip}.png").is_file():
        parts.append(f"<details><summary>contact sheet (aligned faces and mouths)</summary>"
                     f"{_image(out_dir, f'sheets/{clip}.png', f'contact sheet of {clip}', 'sheet')}</details>")
    parts.append("</section>")
    return "".join(parts)


def write_report(out_dir: Path) -> Path:
    """(Re)write report.html and plots/ of a `dubber eval` folder from its files; return the page."""
    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise DubberError("not a `dubber eval` folder (no summary.json)", out_dir)
    summary = json.loads(summary_path.read_text())
    if not isinstance(summary.get("systems"), dict):
        raise DubberError("summary.json has no systems table", summary_path)
    rows = []
    if (out_dir / "clips.csv").is_file():
        with open(out_dir / "clips.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
    clips = list(dict.fromkeys(r["clip"] for r in rows))
    for stale in (out_dir / PLOTS).glob("*.png"):
        stale.unlink()
    sections = []
    for clip in clips:
        series_path = out_dir / SERIES / f"{clip}.json"
        series = json.loads(series_path.read_text()) if series_path.is_file() else None
        if series:
            plot_clip(series, out_dir / PLOTS / f"{clip}.png")
        sections.append(_clip_section(out_dir, clip, [r for r in rows if r["clip"] == clip], series))

    systems = [dict(values, system=system) for system, values in summary["systems"].items()]
    failed = summary.get("failed", [])
    meta = (f"{summary.get('clips', len(clips))} clips, {summary.get('mode', 'video')} mode; metrics on "
            f"{summary.get('metric_crop', 'aligned')} crops; {len(failed)} failed; took {summary.get('seconds', 0):.0f} s.")
    baselines = "; ".join(f"<b>{name}</b>: {note}" + (f" by {summary['shift_seconds']:g} s"
                                                      if name == "shifted_audio" and "shift_seconds" in summary else "")
                          for name, note in BASELINE_NOTES.items())
    failures = "".join(f"<li>{html.escape(f['clip'])}: {html.escape(f['error'])}</li>" for f in failed)
    links = "".join(f'<a href="#clip-{quote(c)}">{html.escape(c)}</a>' for c in clips)
    page = "".join([
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>dubber eval: {html.escape(out_dir.resolve().name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>dubber eval</h1><p class=\"meta\">{html.escape(meta)}</p>",
        "<h2>Figures</h2><p class=\"note\">Mean over clips per system (NaNs left out); "
        "per-clip values in <a href=\"clips.csv\">clips.csv</a>.</p>",
        _table(systems, ("clips", *COLUMNS), "summary"),
        f'<p class="note">{baselines}. {html.escape(TABLE_NOTE)}</p>',
        f"<h2>Failed clips</h2><ul>{failures}</ul>" if failed else "",
        f"<h2>Clips</h2><p class=\"note\">Per clip: its figures, the real and generated videos, the mouth "
        f"opening over time and the sync expert's offset curve, and the mouths zoomed at six frames.</p>"
        f"<nav>{links}</nav>",
        *sections,
        f"<script>{SCRIPT}</script></body></html>\n",
    ])
    path = out_dir / REPORT
    with media.atomic_output(path) as tmp:
        tmp.write_text(page)
    return path
