"""MVTec layout, preprocessing and the synthetic generator, on files the tests write."""

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import CategoryDataset, DataError, Preprocess, load_rgb, open_image, resolve_categories
from synthetic import make_synthetic_category


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_synthetic_category_is_mvtec_layout_and_deterministic(tmp_path):
    a = make_synthetic_category(tmp_path / "a", "toy", n_train=3, n_test_good=2, n_per_defect=2, size=64, seed=7)
    b = make_synthetic_category(tmp_path / "b", "toy", n_train=3, n_test_good=2, n_per_defect=2, size=64, seed=7)
    assert _digest(a) == _digest(b)
    assert len(list((a / "train" / "good").glob("*.png"))) == 3
    for defect in ("scratch", "spot", "stain"):
        for image in (a / "test" / defect).glob("*.png"):
            mask = np.asarray(Image.open(a / "ground_truth" / defect / f"{image.stem}_mask.png"))
            assert set(np.unique(mask)) == {0, 255}


def test_items_labels_and_masks(synthetic_root):
    test = CategoryDataset(synthetic_root, "widget", "test", Preprocess(72, 64))
    assert len(test) == 3 + 3 * 2
    image, label, mask, path, defect = test[0]
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    labels = [test[i][1] for i in range(len(test))]
    assert labels.count(0) == 3 and labels.count(1) == 6
    for i in range(len(test)):
        _, label, mask, path, defect = test[i]
        assert path.startswith("widget/test/") and (label == 1) == (defect != "good")
        assert (mask.sum() > 0) == bool(label)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_masks_are_paired_by_name_not_position(tmp_path):
    cat = tmp_path / "cat"
    (cat / "train" / "good").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(cat / "train" / "good" / "0.png")
    (cat / "test" / "hole").mkdir(parents=True)
    (cat / "ground_truth" / "hole").mkdir(parents=True)
    for name, column in (("b", 0), ("a", 16)):  # masks written in the opposite order to the images
        Image.new("RGB", (32, 32)).save(cat / "test" / "hole" / f"{name}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[:, column : column + 16] = 255
        Image.fromarray(mask).save(cat / "ground_truth" / "hole" / f"{name}_mask.png")
    test = CategoryDataset(tmp_path, "cat", "test", Preprocess(32, 32))
    for i in range(len(test)):
        _, _, mask, path, _ = test[i]
        left_half_defective = bool(mask[0, :, :16].all())
        assert left_half_defective == path.endswith("b.png")


def test_missing_mask_names_the_expected_path(tmp_path):
    cat = tmp_path / "cat"
    for folder in ("train/good", "test/crack", "ground_truth/crack"):
        (cat / folder).mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(cat / "test" / "crack" / "007.png")
    with pytest.raises(DataError, match=r"007\.png has no mask: expected .*ground_truth/crack/007_mask\.png \(or no .* folder at all\)"):
        CategoryDataset(tmp_path, "cat", "test", Preprocess(32, 32))


def test_resolve_categories(synthetic_root, tmp_path):
    assert resolve_categories(synthetic_root, "all") == ["widget"]
    assert resolve_categories(synthetic_root, "widget") == ["widget"]
    with pytest.raises(DataError, match="bottle.*found: widget"):
        resolve_categories(synthetic_root, "widget,bottle")
    with pytest.raises(DataError, match="does not exist"):
        resolve_categories(tmp_path / "nowhere", "bottle")


def test_preprocess_resizes_shorter_side_then_crops_and_binarises_masks():
    pre = Preprocess(resize=40, image_size=32)
    assert pre.image(Image.new("RGB", (120, 80), (255, 0, 0))).shape == (3, 32, 32)
    red = pre.image(Image.new("RGB", (120, 80), (255, 0, 0)))[:, 0, 0]
    assert torch.allclose(red, (torch.tensor([1.0, 0, 0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    values = np.array([[0, 100, 127, 128, 200, 255]] * 6, np.uint8).repeat(8, axis=1).repeat(8, axis=0)
    mask = pre.mask(Image.fromarray(values), (48, 48))  # 48x48 -> nearest 40x40 -> crop 32x32
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}


def test_non_image_files_are_skipped_with_one_note(tmp_path, capsys):
    make_synthetic_category(tmp_path, "toy", n_train=2, n_test_good=1, n_per_defect=1, size=48)
    (tmp_path / "toy" / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "toy" / "train" / "good" / "Thumbs.db").write_bytes(b"\0\1")
    assert len(CategoryDataset(tmp_path, "toy", "train", Preprocess(48, 48))) == 2
    assert "skipped 2 non-image file(s)" in capsys.readouterr().err


def test_sixteen_bit_greyscale_is_rescaled_not_saturated(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "g16.png")
    assert np.asarray(load_rgb(tmp_path / "g16.png"))[0, 0].tolist() == [128, 128, 128]


def test_truncated_image_stops_before_work_naming_the_file(tmp_path):
    make_synthetic_category(tmp_path, "toy", n_train=2, n_test_good=1, n_per_defect=1, size=48)
    broken = tmp_path / "toy" / "train" / "good" / "001.png"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cannot read image .*001\.png"):
        CategoryDataset(tmp_path, "toy", "train", Preprocess(48, 48))


def test_empty_train_good_is_an_error(tmp_path):
    (tmp_path / "toy" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in .*train/good"):
        CategoryDataset(tmp_path, "toy", "train", Preprocess(48, 48))


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("grey.png", lambda: Image.fromarray(np.full((8, 8), 90, np.uint8)), [90, 90, 90]),
        ("rgba.png", lambda: Image.fromarray(np.dstack([np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8), np.uint8)])), [200] * 3),
        (
            "palette.png",
            lambda: Image.fromarray(np.full((8, 8, 3), (10, 120, 250), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE),
            [10, 120, 250],
        ),
        ("grey16.png", lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), [255, 255, 255]),
        ("grey16.tif", lambda: Image.fromarray(np.full((8, 8), 16448, np.uint16)), [64, 64, 64]),
        ("grey.jpg", lambda: Image.fromarray(np.full((8, 8), 100, np.uint8)), [100, 100, 100]),
        ("rgb.bmp", lambda: Image.fromarray(np.full((8, 8, 3), (1, 2, 3), np.uint8)), [1, 2, 3]),
    ],
)
def test_image_modes_become_8bit_rgb(tmp_path, name, make, expected):
    make().save(tmp_path / name)
    rgb = load_rgb(tmp_path / name)
    assert rgb.mode == "RGB"
    np.testing.assert_allclose(np.asarray(rgb)[4, 4], expected, atol=2)  # JPEG may round


def test_16_bit_images_are_scaled_by_their_mode_not_their_content(tmp_path):
    """Two 16-bit frames with the same pixel value 200, one whose largest value is 250 and one 300, give that pixel the
    same 8-bit value, 200 * 255 / 65535 rounded = 1 (issue 28, item 3); hand-computed values of each mode."""
    for name, top in (("dark.png", 250), ("brighter.png", 300)):
        values = np.full((8, 8), 200, np.uint16)
        values[0, 0] = top
        Image.fromarray(values).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == "I;16"
        assert np.asarray(load_rgb(tmp_path / name))[4, 4].tolist() == [1, 1, 1], name
    # v * 255 / 65535 rounded half up: 128 -> 0.498, 129 -> 0.502, 32767 -> 127.498, 32768 -> 127.502, 65535 -> 255
    sixteen = np.array([[0, 128, 129, 32767, 32768, 65535]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "ramp.tif")
    assert np.asarray(load_rgb(tmp_path / "ramp.tif"))[0, :, 0].tolist() == [0, 0, 1, 127, 128, 255]
    wide = np.array([[-5, 200, 16448, 70000]], np.int32)  # PIL's 32-bit mode 'I', read as 16-bit: clipped to 0..65535
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    assert Image.open(tmp_path / "wide.tif").mode == "I"
    assert np.asarray(load_rgb(tmp_path / "wide.tif"))[0, :, 0].tolist() == [0, 1, 64, 255]
    floats = np.array([[-1.0, 0.2, 0.5, 0.8, 1.0, 2.0, 200.0]], np.float32)  # mode F on 0..1, whatever its largest value
    Image.fromarray(floats).save(tmp_path / "float.tif")
    assert np.asarray(load_rgb(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 51, 128, 204, 255, 255, 255]


def _category_with_mask(tmp_path, mask_image):
    cat = tmp_path / "cat"
    for folder in ("train/good", "test/crack", "ground_truth/crack"):
        (cat / folder).mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(cat / "train" / "good" / "0.png")
    Image.new("RGB", (64, 64)).save(cat / "test" / "crack" / "0.png")
    mask_image.save(cat / "ground_truth" / "crack" / "0_mask.png")
    return CategoryDataset(tmp_path, "cat", "test", Preprocess(64, 64))


def test_mask_of_another_size_is_resized_nearest(tmp_path):
    values = np.zeros((32, 32), np.uint8)
    values[:, :16] = 255  # left half defective, at half the image's resolution
    mask = _category_with_mask(tmp_path, Image.fromarray(values))[0][2][0]
    assert mask.shape == (64, 64) and mask[:, :32].all() and not mask[:, 32:].any()


def test_mask_values_are_binarised_at_half_range(tmp_path):
    values = np.array([[0, 100, 127, 128, 200, 255]], np.uint8).repeat(64, 0).repeat(11, 1)[:, :64]
    mask = _category_with_mask(tmp_path, Image.fromarray(values))[0][2][0]
    assert mask[0, :33].sum() == 0 and mask[0, 33:].all()  # columns 0..32 hold 0/100/127, the rest >= 128
    sixteen = np.full((64, 64), 40000, np.uint16)  # 16-bit mask above half of 65535
    assert _category_with_mask(tmp_path / "b", Image.fromarray(sixteen))[0][2].all()


@pytest.mark.parametrize("protocol, defective_from", [("paper", 128), ("official", 255)])
def test_masks_at_the_original_resolution_follow_the_protocols_rule(tmp_path, protocol, defective_from):
    values = np.tile(np.array([0, 1, 127, 128, 200, 254, 255, 255], np.uint8).repeat(8), (64, 1))  # 8 columns per value
    test = _category_with_mask(tmp_path, Image.fromarray(values))
    test.transform = Preprocess(64, 64, protocol)
    mask = test.original_mask(0)
    np.testing.assert_array_equal(mask, values >= defective_from)  # paper: half range; official: exactly 1.0 after ToTensor
    assert np.array_equal(mask, test[0][2][0].numpy() > 0.5)  # at 64 px with no resize, the model-grid mask is the same


def test_float_masks_on_a_0_to_1_scale_keep_their_defects(tmp_path):
    test = _category_with_mask(tmp_path, Image.new("L", (64, 64)))
    for top in (1.0, 255.0):  # a 0..1 float mask, and one on the 8-bit scale
        values = np.zeros((64, 64), np.float32)
        values[:, 40:] = top  # the right part is defective
        tif = tmp_path / "cat" / "ground_truth" / "crack" / f"0_mask_{top:g}.tif"
        Image.fromarray(values).save(tif)
        assert open_image(tif).mode == "F"
        test.samples = [dataclasses.replace(test.samples[0], mask=tif)]  # PNG stores no floats: point the sample at the TIFF
        for mask in (test[0][2][0].numpy(), Preprocess(64, 64).mask(open_image(tif), (64, 64))[0].numpy(), test.original_mask(0)):
            assert mask[:, 40:].all() and not mask[:, :40].any(), top


def test_visa_layout_with_masks_of_value_1(tmp_path):
    from dataset import find_layout, list_categories

    for name, seed in (("candle", 1), ("pcb1", 2)):
        make_synthetic_category(tmp_path, name, n_train=3, n_test_good=2, n_per_defect=1, size=(90, 60), seed=seed, layout="visa")
    assert find_layout(tmp_path) == "visa" and list_categories(tmp_path) == ["candle", "pcb1"]
    assert resolve_categories(tmp_path, "all") == ["candle", "pcb1"]
    stored = np.asarray(Image.open(next((tmp_path / "candle" / "Data" / "Masks" / "Anomaly").glob("*.png"))))
    assert set(np.unique(stored)) == {0, 1}  # as VisA stores them: a half-range threshold would lose every defect
    train = CategoryDataset(tmp_path, "candle", "train", Preprocess(64, 48))
    assert len(train) == 3 and {s.defect for s in train.samples} == {"good"}
    for protocol in ("paper", "official"):
        test = CategoryDataset(tmp_path, "candle", "test", Preprocess(64, 48, protocol))
        items = [test[i] for i in range(len(test))]
        assert [item[1] for item in items] == [0, 0, 1, 1, 1] and {item[4] for item in items} == {"good", "anomaly"}
        assert items[0][3].startswith("candle/Data/Images/Normal/") and test.unmasked_defects == []
        if protocol == "paper":
            assert all((item[2].sum() > 0) == bool(item[1]) for item in items)  # every defect kept
        else:  # the 0/1 masks are made 0/255 first, else "exactly 1.0" would leave nothing; the thin scratch goes, as in their code
            assert [int(item[2].sum() > 0) for item in items] == [0, 0, 0, 1, 1]


def test_a_folder_of_own_parts_without_ground_truth(tmp_path):
    make_synthetic_category(tmp_path, "parts", n_train=2, n_test_good=1, n_per_defect=1, size=48, layout="folder")
    assert not (tmp_path / "parts" / "ground_truth").exists()
    test = CategoryDataset(tmp_path, "parts", "test", Preprocess(48, 48))
    assert test.unmasked_defects == ["scratch", "spot", "stain"]
    assert [int(test[i][2].sum()) for i in range(len(test))] == [0, 0, 0, 0] and [test[i][1] for i in range(4)] == [0, 1, 1, 1]


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda root: (root / "notes.txt").write_text("x"), "matches no known layout: expected MVTec AD or a folder"),
        (lambda root: _visa_csv(root, "candle,train,weird,a.JPG,\n"), "line 2: label 'weird', split 'train'; expected label normal or"),
        (lambda root: _visa_csv(root, "candle,test,anomaly,a.JPG,a.png\n"), "line 2: the image file .*a.JPG does not exist"),
        (lambda root: _visa_csv(root, "candle;train\n", header="object;split\n"), "must have the columns image,label,mask,object,split"),
    ],
)
def test_bad_layouts_say_what_was_expected_where(tmp_path, break_it, message):
    break_it(tmp_path)
    with pytest.raises(DataError, match=message):
        resolve_categories(tmp_path, "all")


def _visa_csv(root, row, header="object,split,label,image,mask\n"):
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(header + row)


def test_few_shot_draws_k_images_with_the_seed(synthetic_root):
    train = CategoryDataset(synthetic_root, "widget", "train", Preprocess(72, 64))
    draws = {seed: [s.image.name for s in train.few_shot(2, seed).samples] for seed in range(4)}
    assert all(len(names) == 2 and len(set(names)) == 2 for names in draws.values())
    assert [s.image.name for s in train.few_shot(2, 0).samples] == draws[0] and len({tuple(d) for d in draws.values()}) > 1
    assert len(train) == 6  # the full set is untouched
    with pytest.raises(DataError, match="--shots 7: widget's train split holds 6 images; give 1 to 6"):
        train.few_shot(7, 0)


def test_without_the_crop_the_whole_image_is_the_input_and_masks_follow_it(tmp_path):
    values = np.zeros((60, 90), np.uint8)
    values[:, 60:] = 255  # the right third of a 90x60 image is defective
    mask = Preprocess(64, 48, crop="none").mask(Image.fromarray(values), (90, 60))[0]
    image = Preprocess(64, 48, crop="none").image(Image.new("RGB", (90, 60)))
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert mask[:, 33:].all() and not mask[:, :31].any()  # columns 60/90 of 48 = 32: the whole width is kept
    cropped = Preprocess(64, 48).mask(Image.fromarray(values), (90, 60))[0]  # center crop: width 96 -> 48 in the middle
    assert cropped[:, :8].sum() == 0 and cropped[:, -8:].all()


def test_without_the_crop_image_size_may_exceed_resize():
    """--crop none resizes the whole image to image_size, so resize plays no part; the center crop must fit in it."""
    from patchcore import PatchCoreConfig

    assert PatchCoreConfig(crop="none", image_size=320).image_size == 320
    with pytest.raises(ValueError, match="at most --resize"):
        PatchCoreConfig(crop="center", image_size=320)
    with pytest.raises(ValueError, match="must be positive"):
        PatchCoreConfig(crop="none", image_size=0)


def test_visa_csv_is_read_once_for_every_category_and_split(tmp_path, monkeypatch):
    import csv

    import dataset

    for name, seed in (("candle", 1), ("pcb1", 2)):
        make_synthetic_category(tmp_path, name, n_train=3, n_test_good=2, n_per_defect=1, size=(90, 60), seed=seed, layout="visa")
    reads, reader = [], csv.DictReader
    monkeypatch.setattr(dataset.csv, "DictReader", lambda *a, **k: reads.append(1) or reader(*a, **k))
    categories = resolve_categories(tmp_path, "all")
    sizes = {(c, s): len(CategoryDataset(tmp_path, c, s, Preprocess(64, 64))) for c in categories for s in ("train", "test")}
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    assert len(reads) == 1 and sizes == {key: sum(line.startswith(",".join(key) + ",") for line in lines) for key in sizes}
    csv_path.write_text("\n".join(line for line in lines if not line.startswith("candle,train")) + "\n")  # a changed file is read anew
    with pytest.raises(dataset.DataError, match="lists no train images of 'candle'"):
        CategoryDataset(tmp_path, "candle", "train", Preprocess(64, 64))
    assert len(reads) == 2
