"""The loss chart of report.html: a line chart drawn with PIL (no plotting dependency), embedded as a data URI so
the page needs no other file and fetches nothing."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw, ImageFont


def loss_curve(points: list[list[float]], size: tuple[int, int] = (720, 260)) -> Image.Image | None:
    """A line chart of loss against step with min/max labels on both axes; None without points."""
    if not points:
        return None
    w, h = size
    left, right, top, bottom = 64, 16, 16, 34
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    s0, s1 = min(steps), max(steps)
    l0, l1 = min(losses), max(losses)
    if s1 == s0:
        s0, s1 = s0 - 1, s1 + 1  # one point: centre it
    if l1 == l0:
        l0, l1 = l0 - 0.5 * abs(l0 or 1), l1 + 0.5 * abs(l1 or 1)

    def xy(step, loss):
        x = left + (step - s0) / (s1 - s0) * (w - left - right)
        y = top + (l1 - loss) / (l1 - l0) * (h - top - bottom)
        return x, y

    draw.rectangle((left, top, w - right, h - bottom), outline=(160, 160, 160))
    for frac in (0.25, 0.5, 0.75):  # light grid lines
        y = top + frac * (h - top - bottom)
        draw.line((left, y, w - right, y), fill=(232, 232, 232))
    xy_points = [xy(s, l) for s, l in points]
    if len(xy_points) > 1:
        draw.line(xy_points, fill=(31, 119, 180), width=2)
    for x, y in xy_points if len(xy_points) <= 60 else []:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 119, 180))
    draw.text((4, top - 4), f"{l1:.4g}", fill="black", font=font)
    draw.text((4, h - bottom - 8), f"{l0:.4g}", fill="black", font=font)
    draw.text((left, h - bottom + 6), f"step {min(steps)}", fill="black", font=font)
    label = f"step {max(steps)}"
    draw.text((w - right - 8 * len(label), h - bottom + 6), label, fill="black", font=font)
    draw.text((w // 2 - 12, h - bottom + 6), "loss", fill=(90, 90, 90), font=font)
    return img


def data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
