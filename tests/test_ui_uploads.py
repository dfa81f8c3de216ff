"""`peftbooth ui` without a browser: uploads of photos, captions and masks: sanitised names, refused non-images and
oversized files, the photo limit, and masks beside their photo for --masked-loss.

The server runs in this process on a free port (test_ui.py's `serve` fixture) and is spoken to with urllib, as the
page would.
"""

import http.client
import io
import json
import urllib.request

import pytest
from PIL import Image
from test_ui import call, new_run, png_bytes, serve  # noqa: F401 (serve: the fixture)

from peftbooth.ui import files


def test_upload_stores_decoded_images_under_sanitised_names(serve):  # noqa: F811
    base, runs = serve()
    name = new_run(base, "../My Dog!")
    assert name == "My-Dog"
    for filename in ["../../evil.png", "..\\win.png", ".hidden.png", "ok photo.PNG", "ok photo.PNG"]:
        status, r, _ = call(f"{base}/api/runs/{name}/photos?filename={urllib.request.quote(filename)}", "POST",
                            raw=png_bytes())
        assert status == 200, r
    stored = sorted(p.name for p in (runs / name / "photos").iterdir())
    assert stored == ["evil.png", "hidden.png", "ok-photo-1.PNG", "ok-photo.PNG", "win.png"]
    assert not (runs / "evil.png").exists() and not (runs.parent / "evil.png").exists()
    status, r, _ = call(f"{base}/api/runs/{name}")
    assert [p["name"] for p in r["photos"]] == stored


@pytest.mark.parametrize("filename, body, status, message", [
    ("notes.doc", b"hello", 400, "only .jpg, .jpeg, .png, .webp images (and NAME.txt captions) are accepted"),
    ("notes.txt", b"hello", 400, "caption 'notes.txt': there is no photo notes.* for it; upload the photo first"),
    ("fake.png", b"GIF89a not really an image", 400, "'fake.png': not a readable image"),
    ("fake.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 64, 400, "'fake.jpg': not a readable image"),
    ("huge.png", 2 << 20, 413, "upload of 2.0 MB is over the 1 MB limit"),  # read and dropped
    ("huge.png", 64 << 20, 413, "upload of 64.0 MB is over the 1 MB limit"),  # refused from its header alone
])
def test_upload_refuses_non_images_and_oversized_files(serve, monkeypatch, filename, body, status, message):  # noqa: F811
    monkeypatch.setattr(files, "MAX_UPLOAD_BYTES", 1 << 20)
    base, runs = serve()
    name = new_run(base)
    if isinstance(body, int):  # only the header says how big: the server must answer without reading a byte
        conn = http.client.HTTPConnection(base.split("//")[1], timeout=60)
        conn.putrequest("POST", f"/api/runs/{name}/photos?filename={filename}")
        conn.putheader("Content-Length", str(body))
        conn.endheaders()
        if body <= 4 << 20:
            conn.send(b"\0" * body)
        response = conn.getresponse()
        got, r = response.status, json.loads(response.read())
        conn.close()
    else:
        got, r, _ = call(f"{base}/api/runs/{name}/photos?filename={filename}", "POST", raw=body)
    assert got == status and message in r["error"]
    photos = runs / name / "photos"
    assert not photos.exists() or list(photos.iterdir()) == []  # nothing left behind, not even a temp file


def test_upload_count_limit(serve, monkeypatch):  # noqa: F811
    monkeypatch.setattr(files, "MAX_PHOTOS", 2)
    base, runs = serve()
    name = new_run(base)
    for i in range(2):
        assert call(f"{base}/api/runs/{name}/photos?filename={i}.png", "POST", raw=png_bytes())[0] == 200
    status, r, _ = call(f"{base}/api/runs/{name}/photos?filename=3.png", "POST", raw=png_bytes())
    assert status == 400 and "already has 2 photos" in r["error"]
    assert len(list((runs / name / "photos").iterdir())) == 2


def test_captions_are_saved_beside_the_photos(serve):  # noqa: F811
    base, runs = serve()
    name = new_run(base)
    call(f"{base}/api/runs/{name}/photos?filename=a.png", "POST", raw=png_bytes())
    assert call(f"{base}/api/runs/{name}/caption", "PUT", {"photo": "a.png", "caption": "sks dog, on grass"})[0] == 200
    assert (runs / name / "photos" / "a.txt").read_text() == "sks dog, on grass\n"
    status, r, _ = call(f"{base}/api/runs/{name}/caption", "PUT", {"photo": "../../config.png", "caption": "x"})
    assert status == 400 and "no such photo" in r["error"]
    assert call(f"{base}/api/runs/{name}")[1]["photos"] == [{"name": "a.png", "caption": "sks dog, on grass",
                                                             "mask": False}]


def mask_png(size=(40, 32), white=(10, 8, 30, 24)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("L", size, 0)
    if white:
        img.paste(255, white)
    img.save(buf, "PNG")
    return buf.getvalue()


def test_masks_go_beside_their_photo_and_the_masked_loss_check_sees_them(serve, monkeypatch):  # noqa: F811
    monkeypatch.setattr(files, "MAX_PHOTOS", 2)
    base, runs = serve()
    name = new_run(base)
    photos = runs / name / "photos"

    def up(filename, body):
        return call(f"{base}/api/runs/{name}/photos?filename={filename}", "POST", raw=body)

    status, r, _ = up("a.mask.png", mask_png())
    assert status == 400 and r["error"] == ("mask 'a.mask.png': there is no photo a.* for it; upload the photo "
                                            "first (or rename the file if it is a photo)")
    assert not photos.exists() or list(photos.iterdir()) == []
    assert up("a.png", png_bytes())[0] == 200 and up("b.png", png_bytes())[0] == 200
    values = {"model.model": "tiny", "data.instance_prompt": "a photo of sks dog", "data.resolution": "32",
              "data.masked_loss": True}
    status, r, _ = call(f"{base}/api/runs/{name}/check", "POST", {"values": values})
    assert r["errors"] == {"data.masked_loss": ["--masked-loss: a.png has no mask; add a.mask.png beside it (white "
                                                "where the subject is, black elsewhere) or train without "
                                                "--masked-loss"]}
    for filename, body, message in [
        ("a.mask.png", mask_png((64, 64)), "mask 'a.mask.png': mask is 64x64 px but its photo is 40x32 px"),
        ("a.mask.png", mask_png(white=None), "mask 'a.mask.png': mask is black everywhere"),
        ("a.mask.png", b"not a png", "photo 'a.mask.png': not a readable image"),
    ]:
        status, r, _ = up(filename, body)
        assert status == 400 and r["error"].startswith(message), r
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "b.png"]  # nothing left behind
    # a mask is not a photo: the limit of 2 photos does not stop it, and a second one replaces the first
    assert up("a.mask.png", mask_png())[0] == 200
    newer = mask_png(white=(0, 0, 20, 20))  # another case of the suffix: still a.png's mask
    assert up("a.MASK.png", newer)[1] == {"name": "a.mask.png"}
    assert (photos / "a.mask.png").read_bytes() == newer
    assert sorted(p.name for p in photos.iterdir()) == ["a.mask.png", "a.png", "b.png"]
    assert [(p["name"], p["mask"]) for p in call(f"{base}/api/runs/{name}")[1]["photos"]] == [("a.png", True),
                                                                                             ("b.png", False)]
    assert up("b.mask.png", mask_png())[0] == 200
    status, r, _ = call(f"{base}/api/runs/{name}/check", "POST", {"values": values})
    assert r["ok"] is True, r
