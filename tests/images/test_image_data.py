"""The offline image-caption data: deterministic built-in scenes with held-out compositions, the bundled digits,
the user's JSONL and datasets, and one clear error per bad input."""
import io
import json

import pytest
from PIL import Image

from rewards import build_reward
from rlprefix.images.data import (combinations, digits_task, from_dataset, load_caption_jsonl, load_image,
                                       load_image_captions, shapes_task)


def test_image_shapes_heldout_compositions_are_unseen_but_their_parts_are_seen():
    train, held = combinations("train"), combinations("heldout")
    assert len(train) == 48 and len(held) == 12 and not set(train) & set(held)
    for axis in range(3):
        assert {c[axis] for c in held} <= {c[axis] for c in train}


def test_image_shapes_are_deterministic_and_captioned_from_their_labels():
    a, b = shapes_task("train", 5, seed=3), shapes_task("train", 5, seed=3)
    assert [x.image.tobytes() for x in a] == [x.image.tobytes() for x in b]
    assert shapes_task("train", 1, seed=4)[0].image.tobytes() != a[0].image.tobytes()
    ex = a[0]
    assert ex.image.mode == "RGB" and ex.image.size == (64, 64)
    assert ex.caption == f"a {ex.labels['colour']} {ex.labels['shape']} at the {ex.labels['position']}"
    held = {tuple(x.labels.values()) for x in shapes_task("heldout")}
    assert held == set(combinations("heldout"))


def test_image_shapes_draw_the_colour_where_the_caption_says():
    ex = next(x for x in shapes_task("train") if x.labels == {"colour": "red", "shape": "square",
                                                               "position": "bottom right"})
    img = ex.image
    assert img.getpixel((47, 47)) == (220, 40, 40)           # in the bottom-right quadrant
    assert img.getpixel((17, 17)) == (235, 235, 235)         # background at the top left


def test_image_digits_are_real_and_split_one_in_five():
    train, held = digits_task("train"), digits_task("heldout")
    assert len(train) + len(held) == 1797 and len(held) == 360
    assert held[0].caption == "the digit zero" and held[0].labels == {"digit": 0}
    assert held[0].image.mode == "RGB" and held[0].image.size == (32, 32)
    assert held[0].image.convert("L").getextrema()[1] > 200   # strokes, not a blank image


def _write(tmp_path, lines):
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_image_jsonl_reads_paths_relative_to_the_file_and_converts_modes(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("L", (5, 7), 128).save(tmp_path / "imgs" / "a.png")
    Image.new("P", (3, 3)).save(tmp_path / "imgs" / "b.png")
    path = _write(tmp_path, [json.dumps({"image": "imgs/a.png", "caption": "grey"}), "",
                             json.dumps({"image": "imgs/b.png", "caption": "palette"})])
    rows = load_caption_jsonl(path)
    assert [r.caption for r in rows] == ["grey", "palette"]
    assert rows[0].image.mode == "RGB" and rows[0].image.size == (5, 7) and rows[0].image.getpixel((0, 0)) == (128,) * 3
    assert len(load_image_captions(str(path), n=1)) == 1


@pytest.mark.parametrize("setup,line,message", [
    (lambda d: None, {"image": "missing.png", "caption": "x"}, "not found"),
    (lambda d: (d / "bad.png").write_bytes(b"not an image"), {"image": "bad.png", "caption": "x"}, "cannot read"),
    (lambda d: (d / "cut.png").write_bytes(_png_bytes()[:60]), {"image": "cut.png", "caption": "x"}, "cannot read"),
    (lambda d: Image.new("F", (4, 4)).save(d / "f.tiff"), {"image": "f.tiff", "caption": "x"}, "mode 'F'"),
    (lambda d: Image.new("RGB", (4, 4)).save(d / "ok.png"), {"image": "ok.png"}, "caption"),
])
def test_image_bad_input_names_the_file_and_the_line(tmp_path, setup, line, message):
    setup(tmp_path)
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    path = _write(tmp_path, [json.dumps({"image": "good.png", "caption": "fine"}), json.dumps(line)])
    with pytest.raises(ValueError, match=message) as err:
        load_caption_jsonl(path)
    assert f"{path}, line 2" in str(err.value)


def _png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_datasets_column_accepts_pil_bytes_and_names_the_bad_row():
    rows = [{"image": Image.new("RGBA", (2, 2)), "caption": "a"}, {"image": {"bytes": _png_bytes()}, "caption": "b"}]
    out = from_dataset(rows)
    assert [x.image.mode for x in out] == ["RGB", "RGB"] and out[1].image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="dataset row 1"):
        from_dataset([rows[0], {"image": b"junk", "caption": "c"}])
    with pytest.raises(ValueError, match="image bytes: cannot read"):
        load_image(Image.new("RGB", (1, 1)).tobytes())
    with pytest.raises(ValueError, match="expected an image"):
        from_dataset([{"image": 3, "caption": "c"}])
    with pytest.raises(ValueError, match="builtin:shapes"):
        load_image_captions("builtin:cats")


def test_image_correctness_reward_scores_the_builtin_captions():
    reward = build_reward("caption_correctness")
    refs = ["a red circle at the top left", "a blue square in the centre", "the digit seven", "a photo of a cat"]
    completions = ["A red circle, top left.", "A blue square at the top right", "It is a 7.", "a cat"]
    scores = reward(["describe"] * 4, completions, captions=refs, images=[None] * 4)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(2 / 3 - 0.5)            # wrong position named: penalised
    assert scores[2] == pytest.approx(1.0) and scores[3] is None
    assert reward(["p"], ["red blue green yellow circle"], captions=["a red circle at the top left"])[0] == 0.0
    held = shapes_task("heldout")
    assert reward([""] * len(held), [x.caption for x in held], captions=[x.caption for x in held]) == [1.0] * 12
    with pytest.raises(ValueError, match="captions"):
        reward(["p"], ["x"])
