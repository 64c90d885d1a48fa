"""What a closed-loop run leaves on disk: the video, the JSON trace and the contact sheet.

Boundaries: reads a ``LoopResult`` and writes files; no decisions. The video goes through PyAV, else
imageio-ffmpeg, else (with a warning) a folder of PNG frames, so a run never loses its video for want
of an encoder. The contact sheet (Pillow) has a row per step in execution order, every attempt of
that step side by side (first, middle and last frame), each framed in the colour of its decision
and captioned with the verdict, so a person sees at a glance what the critic did.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import trace as tr
from .loop import LoopResult
from .trace import AttemptRecord, LoopTrace

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ video
def _check_video(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"write_video: argument 'frames' must be (T, H, W, 3) uint8 with T >= 1, got {frames.dtype} {frames.shape}")
    return frames


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: replicate the last row / column where needed."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_pyav(frames: np.ndarray, path: Path, fps: int) -> None:
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_imageio_ffmpeg(frames: np.ndarray, path: Path, fps: int) -> None:
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1, quality=8)
    writer.send(None)
    try:
        for f in frames:
            writer.send(np.ascontiguousarray(f))
    finally:
        writer.close()


def _write_png_frames(frames: np.ndarray, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"frame_{i:05d}.png")


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Write (T, H, W, 3) uint8 ``frames`` as an mp4 at ``path``; returns where the video went.

    Tries PyAV, then imageio-ffmpeg; if neither is importable (or both fail) it writes PNG frames to
    the folder ``path`` without its suffix and logs a warning. Odd sides are padded by one pixel.
    """
    frames = _pad_even(_check_video(frames))
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"write_video: argument 'fps' must be an int >= 1, got {fps!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for name, writer in (("PyAV", _write_pyav), ("imageio-ffmpeg", _write_imageio_ffmpeg)):
        try:
            writer(frames, path, fps)
            return path
        except ImportError as exc:
            errors.append(f"{name} not importable ({exc})")
        except Exception as exc:  # an encoder failure must not lose the video: fall through to the next writer
            errors.append(f"{name} failed ({type(exc).__name__}: {exc})")
            path.unlink(missing_ok=True)
    folder = path.with_suffix("")
    logger.warning("no mp4 writer worked (%s); wrote %d PNG frames to %s instead "
                   "(pip install av, or imageio-ffmpeg, for mp4)", "; ".join(errors), len(frames), folder)
    _write_png_frames(frames, folder)
    return folder


# ----------------------------------------------------------------------------------- contact sheet
DECISION_COLOURS = {
    tr.ACCEPTED: (46, 160, 67), tr.RETRY: (207, 34, 46), tr.REPLAN: (130, 40, 170), tr.KEPT: (230, 140, 20),
    tr.DROPPED: (150, 150, 150), tr.ABORTED: (20, 20, 20),
}
"""Frame colour of each decision (accepted green, retried red, replanned purple, kept orange, dropped grey)."""
FALLBACK_COLOUR = (225, 190, 0)
"""Frame colour of an attempt accepted because the critic failed."""
DECISION_LABELS = {tr.ACCEPTED: "accepted", tr.RETRY: "rejected -> retry", tr.REPLAN: "rejected -> replan",
                   tr.KEPT: "kept (exhausted)", tr.DROPPED: "speculative, dropped", tr.ABORTED: "aborted", "": "undecided"}


@dataclass
class ContactSheetConfig:
    """Geometry of the contact sheet (pixels)."""

    thumb_height: int = 96
    """Height of a thumbnail; its width follows the video's aspect ratio."""
    thumbs_per_attempt: int = 3
    """Thumbnails per attempt (first ... last frame); at most the attempt's kept thumbnails."""
    label_width: int = 240
    """Width of the step column on the left."""
    caption_lines: int = 4
    """Text lines under each attempt."""
    line_height: int = 14
    """Height of a text line."""
    font_size: int = 11
    """Font size of captions."""
    pad: int = 8
    """Outer margin and gap between cells."""
    border: int = 3
    """Width of the decision-coloured frame around each attempt."""
    header_height: int = 44
    """Height of the title band (goal, counters)."""

    def validate(self) -> None:
        for name in ("thumb_height", "thumbs_per_attempt", "label_width", "caption_lines", "line_height", "font_size",
                     "pad", "header_height"):
            if getattr(self, name) < 1:
                raise ValueError(f"ContactSheetConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.border < 0:
            raise ValueError(f"ContactSheetConfig: border must be >= 0, got {self.border}")


def _rows(trace: LoopTrace) -> list[tuple[int, list[AttemptRecord]]]:
    """(step index, attempts) per step, in order of the step's first attempt."""
    rows: dict[int, list[AttemptRecord]] = {}
    for a in trace.attempts:
        rows.setdefault(a.step_index, []).append(a)
    return list(rows.items())


def _thumb_size(trace: LoopTrace, cfg: ContactSheetConfig) -> tuple[int, int]:
    for a in trace.attempts:
        if a.thumbnails:
            h, w = a.thumbnails[0].shape[:2]
            return max(1, round(w * cfg.thumb_height / h)), cfg.thumb_height
    return cfg.thumb_height, cfg.thumb_height


def contact_sheet_size(trace: LoopTrace, config: ContactSheetConfig | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the contact sheet of ``trace``."""
    cfg = config or ContactSheetConfig()
    rows = _rows(trace)
    tw, th = _thumb_size(trace, cfg)
    cell_w = cfg.thumbs_per_attempt * tw + 2 * cfg.border
    max_cells = max((len(a) for _, a in rows), default=1)
    row_h = th + 2 * cfg.border + cfg.caption_lines * cfg.line_height
    width = cfg.pad + cfg.label_width + max_cells * (cell_w + cfg.pad)
    height = cfg.header_height + max(len(rows), 1) * (row_h + cfg.pad) + cfg.pad
    return width, height


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width_px: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width_px`` pixels; the last kept line ends with an ellipsis if text was cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width_px:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while font.getlength(word) > width_px and len(word) > 1:  # a word longer than a line
            cut = max(1, int(len(word) * width_px / font.getlength(word)) - 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    lines = lines or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and font.getlength(lines[-1] + "…") > width_px:
            lines[-1] = lines[-1][:-1]
        lines[-1] = lines[-1].rstrip() + "…"
    return lines


def _attempt_caption(a: AttemptRecord) -> str:
    v = a.verdict
    head = f"#{a.attempt}{' spec' if a.speculative else ''} {DECISION_LABELS.get(a.decision, a.decision)}"
    if a.critic_fallback:
        return f"{head} | critic failed: accepted unjudged"
    if v is None:
        return head
    kind = f" {v.failure.value}" if v.failure is not None else ""
    text = f"{head} | score {v.score:.2f}{kind}"
    if v.feedback:
        text += f" | {v.feedback}"
    return text


def render_contact_sheet(trace: LoopTrace, config: ContactSheetConfig | None = None):
    """The contact sheet of ``trace`` as a PIL image (see the module docstring)."""
    from PIL import Image, ImageDraw

    cfg = config or ContactSheetConfig()
    cfg.validate()
    rows = _rows(trace)
    width, height = contact_sheet_size(trace, cfg)
    tw, th = _thumb_size(trace, cfg)
    cell_w = cfg.thumbs_per_attempt * tw + 2 * cfg.border
    row_h = th + 2 * cfg.border + cfg.caption_lines * cfg.line_height
    font, bold = _font(cfg.font_size), _font(cfg.font_size + 2)
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)

    c = trace.counters
    draw.text((cfg.pad, 6), _wrap(f"Goal: {trace.goal.text}", bold, width - 2 * cfg.pad, 1)[0], fill=(0, 0, 0), font=bold)
    draw.text((cfg.pad, 6 + cfg.line_height + 4),
              f"{len(trace.executed_steps)} step(s) kept, {len(trace.attempts)} segment(s) generated, {c['retries']} retries, "
              f"{c['replans']} replan(s), {c['speculations_dropped']} speculative drop(s), {len(trace.fallbacks)} fallback(s)"
              + ("" if trace.completed else f" | ABORTED: {trace.error}"), fill=(60, 60, 60), font=font)

    steps_by_index = {s.index: s for s in trace.executed_steps}
    replanned = {s.index: n + 1 for n, r in enumerate(trace.replans) for s in r.new_steps if not r.fallback}
    for r in trace.replans:
        for s in r.old_steps + r.new_steps:
            steps_by_index.setdefault(s.index, s)
    if trace.initial_plan is not None:
        for s in trace.initial_plan.steps:
            steps_by_index.setdefault(s.index, s)

    for k, (index, attempts) in enumerate(rows):
        y = cfg.header_height + k * (row_h + cfg.pad)
        if k % 2:
            draw.rectangle([0, y - cfg.pad // 2, width, y + row_h + cfg.pad // 2], fill=(240, 240, 244))
        step = steps_by_index.get(index)
        label_w = cfg.label_width - 2 * cfg.pad
        max_lines = max(1, row_h // cfg.line_height)
        lines = _wrap(f"step {index}: {step.prompt if step else attempts[0].prompt}", bold, label_w, max(1, max_lines - 2))
        for j, line in enumerate(lines):
            draw.text((cfg.pad, y + j * cfg.line_height), line, fill=(0, 0, 0), font=bold)
        if step is not None:
            origin = f", from replan {replanned[index]}" if index in replanned else ""
            details = f"{step.span_chunks} chunk(s){origin}"
            if step.success_criteria:
                details += " | success: " + "; ".join(step.success_criteria)
            for j, line in enumerate(_wrap(details, font, label_w, max_lines - len(lines))):
                draw.text((cfg.pad, y + (len(lines) + j) * cfg.line_height), line, fill=(90, 90, 90), font=font)
        for j, a in enumerate(attempts):
            x = cfg.pad + cfg.label_width + j * (cell_w + cfg.pad)
            colour = FALLBACK_COLOUR if a.critic_fallback else DECISION_COLOURS.get(a.decision, (0, 0, 0))
            draw.rectangle([x, y, x + cell_w - 1, y + th + 2 * cfg.border - 1], fill=colour)
            for t, frame in enumerate(a.thumbnails[: cfg.thumbs_per_attempt]):
                thumb = Image.fromarray(frame).resize((tw, th), Image.BILINEAR)
                sheet.paste(thumb, (x + cfg.border + t * tw, y + cfg.border))
            ty = y + th + 2 * cfg.border
            caption = _wrap(_attempt_caption(a), font, cell_w, cfg.caption_lines)
            for li, line in enumerate(caption):
                draw.text((x, ty + li * cfg.line_height), line, fill=colour if li == 0 else (40, 40, 40), font=font)
    return sheet


def write_contact_sheet(trace: LoopTrace, path: str | Path, config: ContactSheetConfig | None = None) -> Path:
    """Render the contact sheet of ``trace`` and save it as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_contact_sheet(trace, config).save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------------- all
@dataclass
class OutputPaths:
    """Where ``write_outputs`` put things."""

    video: Path | None
    """The mp4, or the PNG frame folder if no mp4 writer worked; None if the run kept no frames."""
    trace: Path
    """The JSON trace."""
    contact_sheet: Path | None
    """The contact-sheet PNG (None if Pillow failed; the trace says why)."""


def write_trace(trace: LoopTrace, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``trace.to_dict()`` (plus ``extra`` keys) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**trace.to_dict(), **(extra or {})}, indent=2) + "\n")
    return path


def write_outputs(result: LoopResult, out_dir: str | Path, fps: int = 16, *, stem: str = "",
                  sheet_config: ContactSheetConfig | None = None) -> OutputPaths:
    """Write ``video.mp4``, ``trace.json`` and ``contact_sheet.png`` (each prefixed by ``stem``) into ``out_dir``.

    The video is written first; a failure of the contact sheet is logged and recorded, never raised.
    """
    if not isinstance(result, LoopResult):
        raise ValueError(f"write_outputs: argument 'result' must be a LoopResult, got {type(result).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    video_path = None
    if result.video.shape[0] > 0:
        video_path = write_video(result.video, out / f"{stem}video.mp4", fps=fps)
    else:
        result.trace.warn("the run kept no frames; no video written")
        logger.warning(result.trace.warnings[-1])
    sheet_path = None
    try:
        sheet_path = write_contact_sheet(result.trace, out / f"{stem}contact_sheet.png", sheet_config)
    except Exception as exc:
        result.trace.warn(f"contact sheet failed: {type(exc).__name__}: {exc}")
        logger.warning(result.trace.warnings[-1])
    outputs = {"video": str(video_path) if video_path else None,
               "video_is_frame_folder": bool(video_path is not None and video_path.suffix != ".mp4"),
               "contact_sheet": str(sheet_path) if sheet_path else None, "fps": fps}
    trace_path = write_trace(result.trace, out / f"{stem}trace.json", extra={"outputs": outputs})
    return OutputPaths(video=video_path, trace=trace_path, contact_sheet=sheet_path)
