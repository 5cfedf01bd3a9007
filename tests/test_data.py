"""Textual-inversion training data: image decoding, cropping with SDXL size conditioning, aspect-ratio buckets,
captions, templates and the resumable, rank-sharded data orders."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from gm.data.dataset import (
    SDXL_BUCKETS, BucketOrder, DataError, EpochOrder, TextualInversionDataset, bucket_sizes, data_order, load_image,
    to_rgb)
from gm.data.templates import (
    FACE_TEMPLATES, OBJECT_TEMPLATES, STYLE_TEMPLATES, TemplateError, get_templates, load_templates)

TOKEN = "<cat-toy>"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def halves(mode, size, left, right):
    """A `size` (w, h) image of `mode`, colour `left` on the left half and `right` on the right."""
    image = Image.new(mode, size, left)
    image.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("concept")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    halves("RGB", (48, 24), RED, BLUE).save(root / "a_exif.jpg", exif=exif, quality=95)
    Image.new("L", (40, 20), 200).save(root / "b_gray.png")
    palette = Image.new("P", (20, 30), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(root / "c_palette.png")
    halves("LA", (20, 20), (90, 255), (90, 0)).save(root / "d_la.png")
    halves("RGBA", (30, 20), (255, 0, 0, 255), (0, 0, 255, 0)).save(root / "e_rgba.png")
    Image.new("CMYK", (24, 24), (0, 255, 0, 0)).save(root / "f_cmyk.jpg", quality=95)
    sixteen_bit = np.array([[0, 32896], [65535, 65535]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    Image.fromarray(sixteen_bit).save(root / "g_16bit.png")
    Image.new("RGB", (20, 20), BLUE).save(root / "h_pic.webp", lossless=True)
    Image.new("RGB", (20, 20), RED).save(root / "i_pic.bmp")
    Image.new("RGB", (20, 20), WHITE).save(root / "j_upper.JPEG")
    (root / "notes.md").write_text("not an image")
    (root / "k_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "b_gray.txt").write_text(f"  a gray square,\n{TOKEN} on a table \n")
    (root / "sub").mkdir()
    Image.new("RGB", (20, 20), RED).save(root / "sub" / "nested.png")  # not recursive: ignored
    return root


@pytest.fixture(scope="module")
def dataset(folder):
    with pytest.warns(UserWarning, match="k_corrupt.png"):
        return TextualInversionDataset(str(folder), TOKEN, resolution=16)


def names(dataset):
    return [os.path.basename(item.path) for item in dataset.items]


def pixel(array, y, x):
    """RGB uint8 value of a [3, H, W] [-1, 1] array."""
    return tuple(int(round(v)) for v in (array[:, y, x] + 1.0) * 127.5)


def close(found, expected, tolerance=6):
    return all(abs(a - b) <= tolerance for a, b in zip(found, expected))


def test_lists_images_only_and_skips_unreadable(dataset):
    assert names(dataset) == ["a_exif.jpg", "b_gray.png", "c_palette.png", "d_la.png", "e_rgba.png", "f_cmyk.jpg",
                              "g_16bit.png", "h_pic.webp", "i_pic.bmp", "j_upper.JPEG"]
    assert len(dataset) == 10
    assert dataset.items[0].original_size == (48, 24) and dataset.items[4].original_size == (20, 30)
    assert dataset.items[1].caption == f"a gray square, {TOKEN} on a table" and dataset.items[0].caption is None


def test_exif_orientation_is_applied(folder, dataset):
    image = load_image(folder / "a_exif.jpg")
    assert image.size == (24, 48)  # (w, h): stored 48x24 and rotated
    assert close(image.getpixel((12, 5)), RED) and close(image.getpixel((12, 42)), BLUE)
    example = dataset.example(0)
    assert example["original_size_as_tuple"] == (48, 24)
    assert example["crop_coords_top_left"] == (8, 0)  # resized to 16x32 (w x h), centre crop
    assert close(pixel(example["jpg"], 1, 8), RED) and close(pixel(example["jpg"], 14, 8), BLUE)


@pytest.mark.parametrize("index, expected", [
    (1, {(8, 8): (200, 200, 200)}),  # L
    (2, {(8, 8): (0, 255, 0)}),  # P
    (3, {(8, 2): (90, 90, 90), (8, 13): WHITE}),  # LA: transparent half on white
    (4, {(8, 4): RED, (8, 12): WHITE}),  # RGBA
    (5, {(8, 8): (255, 0, 255)}),  # CMYK (0, 255, 0, 0): magenta
    (6, {(2, 2): (0, 0, 0), (2, 13): (128, 128, 128), (13, 8): WHITE}),  # I;16 scaled to 8 bits
    (7, {(8, 8): BLUE}),  # webp
    (8, {(8, 8): RED}),  # bmp
])
def test_every_mode_becomes_rgb_in_range(dataset, index, expected):
    example = dataset.example(index)
    jpg = example["jpg"]
    assert jpg.shape == (3, 16, 16) and jpg.dtype == np.float32
    assert jpg.min() >= -1.0 and jpg.max() <= 1.0
    for (y, x), colour in expected.items():
        assert close(pixel(jpg, y, x), colour), (names(dataset)[index], (y, x), pixel(jpg, y, x))


def test_sixteen_bit_modes_in_memory():
    values = np.array([[0, 257 * 200, 65535]], dtype=np.int32)
    for image in (Image.fromarray(values, "I"), Image.fromarray(values.astype(np.uint16))):
        rgb = to_rgb(image)
        assert rgb.mode == "RGB" and np.array(rgb)[0, :, 0].tolist() == [0, 200, 255]


def test_size_conditioning_and_center_crop(dataset):
    example = dataset.example(4)  # e_rgba: 30x20 (w x h) -> resized 24x16, centre crop
    assert example["original_size_as_tuple"] == (20, 30)
    assert example["crop_coords_top_left"] == (0, 4)
    assert example["target_size_as_tuple"] == (16, 16)


def test_random_crop_is_seeded_and_in_range(folder):
    def crops(seed):
        with pytest.warns(UserWarning):
            data = TextualInversionDataset(str(folder), TOKEN, resolution=16, center_crop=False, seed=seed)
        return [data.example(0, epoch)["crop_coords_top_left"] for epoch in range(12)]  # resized 16x32 (w x h)

    first = crops(3)
    assert all(left == 0 and 0 <= top <= 16 for top, left in first)
    assert len(set(first)) > 1
    assert crops(3) == first and crops(4) != first


def test_flip_mirrors_image_and_crop(folder):
    with pytest.warns(UserWarning):
        plain = TextualInversionDataset(str(folder), TOKEN, resolution=16, center_crop=False, seed=1)
    with pytest.warns(UserWarning):
        flipped = TextualInversionDataset(str(folder), TOKEN, resolution=16, center_crop=False, seed=1, flip_p=1.0)
    for index in (4, 5):  # e_rgba: resized 24x16; f_cmyk: square
        for epoch in range(3):
            a, b = plain.example(index, epoch), flipped.example(index, epoch)
            assert np.array_equal(b["jpg"], a["jpg"][:, :, ::-1])
            width = 24 if index == 4 else 16
            top, left = a["crop_coords_top_left"]
            assert b["crop_coords_top_left"] == (top, width - left - 16)


def test_prompts_from_captions_and_templates(dataset, folder):
    assert dataset.example(1)["txt"] == f"a gray square, {TOKEN} on a table"
    prompts = {dataset.example(0, epoch)["txt"] for epoch in range(30)}
    assert len(prompts) > 1 and prompts <= {t.format(TOKEN) for t in OBJECT_TEMPLATES}
    with pytest.warns(UserWarning):
        multi = TextualInversionDataset(str(folder), TOKEN, resolution=16, learnable_property="style",
                                        placeholder_text=f"{TOKEN} {TOKEN}_1")
    assert multi.example(1)["txt"] == f"a gray square, {TOKEN} {TOKEN}_1 on a table"
    assert multi.example(0)["txt"] in {t.format(f"{TOKEN} {TOKEN}_1") for t in STYLE_TEMPLATES}


def test_batch_stacks_examples(dataset):
    batch = dataset.batch([(0, 0), (4, 2)])
    assert batch["jpg"].shape == (2, 3, 16, 16) and batch["jpg"].dtype == np.float32
    assert len(batch["txt"]) == 2
    assert batch["original_size_as_tuple"].tolist() == [[48, 24], [20, 30]]
    assert batch["crop_coords_top_left"].dtype == np.int64
    assert batch["target_size_as_tuple"].tolist() == [[16, 16], [16, 16]]


def test_caption_without_placeholder_is_an_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a photo of a cat")
    with pytest.raises(DataError, match="x.txt.*<cat-toy>"):
        TextualInversionDataset(str(tmp_path), TOKEN, resolution=8)
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\xfa <cat-toy>")
    with pytest.raises(DataError, match="x.txt is not UTF-8"):
        TextualInversionDataset(str(tmp_path), TOKEN, resolution=8)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="missing"):
        TextualInversionDataset(str(tmp_path / "missing"), TOKEN)
    with pytest.raises(DataError, match="no images.*" + tmp_path.name):
        TextualInversionDataset(str(tmp_path), TOKEN)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    full = Image.new("RGB", (64, 64))
    full.save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    unreadable = "none of the 2 image files in .*" + tmp_path.name
    with pytest.warns(UserWarning) as record, pytest.raises(DataError, match=unreadable):
        TextualInversionDataset(str(tmp_path), TOKEN)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "bad.jpg" in messages[0] and "cut.png" in messages[1]


def test_templates(tmp_path):
    assert get_templates("object") == list(OBJECT_TEMPLATES) and len(OBJECT_TEMPLATES) == 27
    assert get_templates("style") == list(STYLE_TEMPLATES) and len(STYLE_TEMPLATES) == 19
    assert get_templates("face") == list(FACE_TEMPLATES)
    assert all(t.count("{}") == 1 for t in FACE_TEMPLATES)
    with pytest.raises(ValueError, match="object"):
        get_templates("animal")

    good = tmp_path / "good.txt"
    good.write_text("\ufeffa photo of {}\n\n  {} in the snow  \n")
    assert load_templates(str(good)) == ["a photo of {}", "{} in the snow"]
    for name, text, match in [("none.txt", "a photo\n", "line 1"), ("two.txt", "ok {}\n{} and {}\n", "line 2"),
                              ("brace.txt", "a {} with a { brace\n", "line 1"), ("empty.txt", "\n \n", "no templates")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(TemplateError, match=f"{name}.*{match}"):
            load_templates(str(tmp_path / name))
    with pytest.raises(TemplateError, match="not found"):
        load_templates(str(tmp_path / "absent.txt"))


def take(order, steps):
    return [order.next_batch() for _ in range(steps)]


def test_data_order_covers_each_epoch_once():
    order = EpochOrder(10, batch_size=5, seed=7)
    first, second = take(order, 2), take(order, 2)
    for epoch, steps in enumerate((first, second)):
        draws = [d for step in steps for d in step]
        assert sorted(d.index for d in draws) == list(range(10)) and {d.epoch for d in draws} == {epoch}
    assert [d.index for d in first[0] + first[1]] != [d.index for d in second[0] + second[1]]
    assert (order.epoch, order.position) == (2, 0)
    unshuffled = EpochOrder(4, batch_size=3, shuffle=False)
    steps = [[tuple(d) for d in step] for step in take(unshuffled, 2)]
    assert steps == [[(0, 0), (1, 0), (2, 0)], [(3, 0), (0, 1), (1, 1)]]


def test_data_order_resumes_exactly():
    order = EpochOrder(7, batch_size=3, seed=11)
    take(order, 5)
    state = json.loads(json.dumps(order.state_dict()))
    expected = take(order, 6)
    resumed = EpochOrder(7, batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == expected
    assert EpochOrder(7, batch_size=3, seed=11).next_batch() != expected[0]
    with pytest.raises(ValueError, match="n=7"):
        EpochOrder(8, batch_size=3, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        EpochOrder(7, batch_size=3, seed=12).load_state_dict(state)


def test_ranks_get_disjoint_shards():
    ranks = [EpochOrder(12, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    single = EpochOrder(12, batch_size=4, seed=5)
    for _ in range(6):  # two epochs
        steps = [r.next_batch() for r in ranks]
        assert not {tuple(d) for d in steps[0]} & {tuple(d) for d in steps[1]}
        assert steps[0] + steps[1] == single.next_batch()  # the same stream, split
    assert all(r.state_dict() == single.state_dict() for r in ranks)

    small = [EpochOrder(3, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]  # n < global batch
    draws = [d for _ in range(3) for r in small for d in r.next_batch()]
    assert len(draws) == 12 == len(set(draws))  # every draw once, epochs 0..3 each a permutation
    for epoch in range(4):
        assert sorted(d.index for d in draws if d.epoch == epoch) == [0, 1, 2]
    with pytest.raises(ValueError, match="rank"):
        EpochOrder(3, 1, rank=2, world_size=2)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """Two images: one captioned with five comma-separated tags, one without a caption."""
    root = tmp_path_factory.mktemp("tagged")
    Image.new("RGB", (20, 20), RED).save(root / "a.png")
    (root / "a.txt").write_text(f"photo, {TOKEN}, red, on a table, studio light")
    Image.new("RGB", (20, 20), BLUE).save(root / "b.png")
    return str(root)


def test_caption_options_off_draw_what_they_always_drew(tagged):
    """An option draws from the example's generator only when it is on: crops and flips stay the same draws."""
    plain = TextualInversionDataset(tagged, TOKEN, resolution=16, center_crop=False, flip_p=0.5, seed=3)
    assert plain.draw(0, 0).prompt == f"photo, {TOKEN}, red, on a table, studio light"
    both = TextualInversionDataset(tagged, TOKEN, resolution=16, center_crop=False, flip_p=0.5, seed=3,
                                   caption_dropout=0.5, shuffle_caption=True)
    for index in range(2):
        for epoch in range(20):
            assert plain.draw(index, epoch)[:2] == both.draw(index, epoch)[:2]
            if index == 1:  # no caption: the template draw is the same
                assert plain.draw(index, epoch) == both.draw(index, epoch)


def test_caption_dropout_uses_templates_instead(tagged):
    templates = {t.format(TOKEN) for t in OBJECT_TEMPLATES}
    always = TextualInversionDataset(tagged, TOKEN, resolution=16, caption_dropout=1.0)
    assert all(always.draw(0, epoch).prompt in templates for epoch in range(20))
    half = TextualInversionDataset(tagged, TOKEN, resolution=16, caption_dropout=0.5)
    dropped = [half.draw(0, epoch).prompt in templates for epoch in range(400)]
    assert 0.4 < np.mean(dropped) < 0.6
    assert dropped == [half.draw(0, epoch).prompt in templates for epoch in range(400)]  # seeded: resumable
    with pytest.raises(ValueError, match="caption_dropout"):
        TextualInversionDataset(tagged, TOKEN, resolution=16, caption_dropout=1.5)


def test_shuffle_caption_keeps_the_leading_tags(tagged):
    tags = ["photo", TOKEN, "red", "on a table", "studio light"]
    data = TextualInversionDataset(tagged, TOKEN, resolution=16, shuffle_caption=True, keep_tokens=2,
                                   placeholder_text=f"{TOKEN} {TOKEN}_1")
    orders = set()
    for epoch in range(30):
        found = data.draw(0, epoch).prompt.split(", ")
        assert found[:2] == ["photo", f"{TOKEN} {TOKEN}_1"]  # kept in place, the placeholder expanded
        assert sorted(found[2:]) == sorted(tags[2:])
        orders.add(tuple(found))
    assert len(orders) == 6  # every order of the three other tags turns up
    with pytest.raises(ValueError, match="keep_tokens"):
        TextualInversionDataset(tagged, TOKEN, resolution=16, keep_tokens=-1)


def test_captions_of_one_text_encoder(tmp_path):
    """`name.clip_g.txt` / `name.clip_l.txt` give that encoder its own prompt (batch key "txt_clip_g" ...); the
    other encoder reads `name.txt` or a template; caption dropout drops all of an image's captions at once."""
    Image.new("RGB", (20, 20), RED).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(f"a photo of {TOKEN}")
    (tmp_path / "a.clip_g.txt").write_text(f"{TOKEN}, red, plush")
    Image.new("RGB", (20, 20), BLUE).save(tmp_path / "b.png")
    (tmp_path / "b.clip_l.txt").write_text(f"a toy: {TOKEN}")
    data = TextualInversionDataset(str(tmp_path), TOKEN, resolution=16)
    batch = data.batch([(0, 0), (1, 0)])
    template_b = data.draw(1, 0).prompt
    assert template_b in {t.format(TOKEN) for t in OBJECT_TEMPLATES}
    assert batch["txt"] == [f"a photo of {TOKEN}", template_b]
    assert batch["txt_clip_g"] == [f"{TOKEN}, red, plush", template_b]
    assert batch["txt_clip_l"] == [f"a photo of {TOKEN}", f"a toy: {TOKEN}"]
    assert data.example(1)["txt_clip_l"] == f"a toy: {TOKEN}" and "txt_clip_g" not in data.example(1)
    assert "txt_clip_l" not in data.batch([(0, 0)])  # only where an example has an encoder's own caption

    dropped = TextualInversionDataset(str(tmp_path), TOKEN, resolution=16, caption_dropout=1.0)
    assert dropped.draw(0, 0).encoder_prompts == () and dropped.draw(1, 0).encoder_prompts == ()

    (tmp_path / "b.clip_l.txt").write_text("a toy")
    with pytest.raises(DataError, match="b.clip_l.txt must contain the placeholder"):
        TextualInversionDataset(str(tmp_path), TOKEN, resolution=16)


# ------------------------------------------------------------------------------------- aspect-ratio buckets


def test_bucket_sizes():
    """SDXL's 40 training sizes at 1024 px; scaled, each side a multiple of 32 and the area within 15% of res^2."""
    assert bucket_sizes(1024) == list(SDXL_BUCKETS) and len(SDXL_BUCKETS) == 40
    assert {(1024, 1024), (896, 1152), (1152, 896), (1216, 832), (832, 1216), (768, 1344), (1344, 768),
            (640, 1536), (1536, 640), (512, 2048), (2048, 512)} <= set(SDXL_BUCKETS)
    assert bucket_sizes(512) == [(h // 2, w // 2) for h, w in SDXL_BUCKETS]  # halved: multiples of 32 already
    for resolution in range(256, 2049, 32):
        sizes = bucket_sizes(resolution)
        assert len(set(sizes)) == len(sizes) and (resolution, resolution) in sizes
        for h, w in sizes:
            assert h % 32 == 0 and w % 32 == 0, (resolution, h, w)
            assert 0.85 <= h * w / resolution ** 2 <= 1.15, (resolution, h, w)
    # the tiny model's 64 px: few sizes are left, from 1:4 to 4:1
    assert bucket_sizes(64) == [(32, 128), (32, 96), (64, 96), (64, 64), (96, 64), (96, 32), (128, 32)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A wide (121x64, w x h), a tall (41x100) and a square (50x50) image, each red on the left, blue on the right."""
    root = tmp_path_factory.mktemp("shapes")
    for name, size in (("a_wide.png", (121, 64)), ("b_tall.png", (41, 100)), ("c_square.png", (50, 50))):
        halves("RGB", size, RED, BLUE).save(root / name)
    return str(root)


def test_each_image_is_cropped_to_its_bucket(shapes):
    """At 64 px: the wide image goes to 64x96 (h x w; 1.89:1 is nearest 1.5:1), the tall one to 96x32 (0.41:1,
    nearest 1:3), the square one to 64x64. Each is scaled to cover its bucket and centre-cropped; the size
    conditioning says what was done, the crop's left edge counted in the mirrored image when flipped."""
    plain = TextualInversionDataset(shapes, TOKEN, resolution=64, bucketing=True)
    flipped = TextualInversionDataset(shapes, TOKEN, resolution=64, bucketing=True, flip_p=1.0)
    assert plain.target_sizes == [(64, 96), (96, 32), (64, 64)]
    assert plain.bucket_counts() == {(64, 64): 1, (64, 96): 1, (96, 32): 1}
    # wide: 121x64 covers 96x64 unscaled, left = round(25 / 2) = 12, mirrored 121 - 12 - 96 = 13
    # tall: scaled by 96/100 to 39x96, left = round(7 / 2) = 4, mirrored 39 - 4 - 32 = 3
    # square: scaled to 64x64, nothing cropped
    expected = [((64, 121), (0, 12), (0, 13)), ((100, 41), (0, 4), (0, 3)), ((50, 50), (0, 0), (0, 0))]
    for index, (original, crop, mirrored_crop) in enumerate(expected):
        a, b = plain.example(index), flipped.example(index)
        height, width = plain.target_sizes[index]
        assert a["jpg"].shape == (3, height, width) and a["target_size_as_tuple"] == (height, width)
        assert a["original_size_as_tuple"] == b["original_size_as_tuple"] == original
        assert a["crop_coords_top_left"] == crop and b["crop_coords_top_left"] == mirrored_crop
        assert np.array_equal(b["jpg"], a["jpg"][:, :, ::-1])
        assert close(pixel(a["jpg"], height // 2, 0), RED) and close(pixel(a["jpg"], height // 2, width - 1), BLUE)

    batch = plain.batch([(0, 0), (0, 1)])  # a micro-batch of one bucket
    assert batch["jpg"].shape == (2, 3, 64, 96) and batch["target_size_as_tuple"].tolist() == [[64, 96]] * 2

    randomly = TextualInversionDataset(shapes, TOKEN, resolution=64, bucketing=True, center_crop=False, seed=2)
    lefts = {randomly.example(0, epoch)["crop_coords_top_left"] for epoch in range(20)}
    assert {top for top, _ in lefts} == {0} and {left for _, left in lefts} <= set(range(26)) and len(lefts) > 3


def test_bucketing_off_keeps_the_square_and_its_order(shapes):
    square = TextualInversionDataset(shapes, TOKEN, resolution=64)
    assert square.target_sizes == [(64, 64)] * 3 and square.example(0)["jpg"].shape == (3, 64, 64)
    order = data_order(square, 2, seed=5)
    assert isinstance(order, EpochOrder)
    assert [order.next_batch() for _ in range(4)] == take(EpochOrder(3, 2, seed=5), 4)
    assert isinstance(data_order(TextualInversionDataset(shapes, TOKEN, 64, bucketing=True), 2), BucketOrder)


SIZES = [(64, 64)] * 5 + [(64, 96)] * 2 + [(96, 64)]  # images 0-4 square, 5-6 wide, 7 tall


def test_bucket_order_draws_each_batch_from_one_bucket():
    """An epoch: ceil(n_b / 2) steps of each bucket (3 + 1 + 1) in a shuffled order. Each bucket deals its images
    pass after pass, each pass a permutation (the draws' epoch); every batch is full: the lone tall image's with
    itself from its next pass (other random choices)."""
    order = BucketOrder(SIZES, batch_size=2, seed=3)
    epochs = [take(order, 5) for _ in range(4)]
    assert order.epoch == 4 and order.position == 0
    schedules = [[SIZES[step[0].index] for step in steps] for steps in epochs]
    assert all(sorted(s) == sorted([(64, 64)] * 3 + [(64, 96), (96, 64)]) for s in schedules)
    assert len({tuple(s) for s in schedules}) > 1  # the batch order is shuffled per epoch
    draws = [d for steps in epochs for step in steps for d in step]
    assert len(draws) == 40 == len(set(draws))  # no (image, pass) twice: every draw its own random choices
    for step in (step for steps in epochs for step in steps):
        assert len(step) == 2 and len({SIZES[d.index] for d in step}) == 1
    for size, images in {(64, 64): [0, 1, 2, 3, 4], (64, 96): [5, 6], (96, 64): [7]}.items():
        dealt = [d for d in draws if SIZES[d.index] == size]
        assert len(dealt) == 2 * 4 * -(-len(images) // 2)  # its steps' draws in 4 epochs
        for bucket_pass in range(len(dealt) // len(images)):  # its complete passes
            assert sorted(d.index for d in dealt if d.epoch == bucket_pass) == images
    assert [d for step in epochs[0] for d in step if d.index == 7] == [(7, 0), (7, 1)]
    assert take(BucketOrder(SIZES, 2, seed=3), 10) == [step for steps in epochs for step in steps][:10]
    assert take(BucketOrder(SIZES, 2, seed=4), 10) != take(BucketOrder(SIZES, 2, seed=3), 10)


def test_bucket_order_ranks_share_a_bucket_per_step():
    ranks = [BucketOrder(SIZES, batch_size=1, seed=5, rank=r, world_size=2) for r in range(2)]
    single = BucketOrder(SIZES, batch_size=2, seed=5)
    for _ in range(12):
        steps = [r.next_batch() for r in ranks]
        assert steps[0] + steps[1] == single.next_batch()  # the same stream, split
        assert SIZES[steps[0][0].index] == SIZES[steps[1][0].index] and steps[0] != steps[1]
    assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_bucket_order_resumes_exactly():
    order = BucketOrder(SIZES, batch_size=2, seed=11)
    take(order, 7)
    state = json.loads(json.dumps(order.state_dict()))
    expected = take(order, 9)
    resumed = BucketOrder(SIZES, batch_size=2, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 9) == expected
    assert take(BucketOrder(SIZES, batch_size=2, seed=11), 9) != expected
    for other, match in [(BucketOrder(SIZES, 2, seed=12), "seed"), (BucketOrder(SIZES, 3, seed=11), "global_batch"),
                         (BucketOrder(SIZES[:-1], 2, seed=11), "n=8"),
                         (BucketOrder(SIZES[1:] + SIZES[:1], 2, seed=11), "other images in the buckets")]:
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(state)
