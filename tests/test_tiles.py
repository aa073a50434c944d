"""High resolution by tiles (issue 30, item 3): the tile geometry against a brute-force owner of each cell, stitched
features and tile-by-tile scores against a hand-made stitch and a float64 brute-force search, the seams, a small
defect on a large image found with tiles and lost at 224 px, and the one-line refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_export import TRAINING_STACK, run_without

from deploy.onnx_export import export_onnx
from method.tiles import kept_cells, tile_starts, tiles_of
from patchcore import PatchCore
from plumbing.bank import BankError, load_bank, save_bank
from plumbing.image_io import working_size
from scripts import SMALL, one_line_error, run
from synthetic import _normal_part, make_synthetic_scene


def owner(cell: int, starts: list[int], tile: int) -> int:
    """The tile whose centre is nearest the cell's centre, among those holding it (ties: the first): brute force."""
    holding = [i for i, s in enumerate(starts) if s <= cell < s + tile]
    return min(holding, key=lambda i: (abs(starts[i] + tile / 2 - (cell + 0.5)), i))


@pytest.mark.parametrize("length, tile, overlap", [(2048, 512, 64), (1000 // 32 * 32, 256, 96), (384, 384, 64), (416, 128, 0)])
def test_each_cell_is_kept_once_by_the_tile_whose_centre_is_nearest(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile and all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    cell = 8
    kept = kept_cells([s // cell for s in starts], tile // cell, length // cell)
    assert kept[0][0] == 0 and kept[-1][1] == length // cell and all(a[1] == b[0] for a, b in zip(kept, kept[1:]))
    for i, (first, end) in enumerate(kept):
        for c in range(first, end):
            assert owner(c, [s // cell for s in starts], tile // cell) in (i, i - 1 if c == first else i)  # a tie may go either way
            if 0 < i:  # a kept cell sits at least overlap / 2 pixels inside its tile's inner edges
                assert (c - starts[i] // cell) * cell >= overlap // 2 - cell
            if i < len(kept) - 1:
                assert (starts[i] // cell + tile // cell - 1 - c) * cell >= overlap // 2 - cell


def test_working_sizes_keep_the_aspect_on_multiples_of_32():
    assert working_size((4190, 3040), 2048) == (2048, 1472)  # 3040 * 2048 / 4190 = 1485.9 -> 1472 (46 x 32)
    assert working_size((800, 600), 800) == (800, 608) and working_size((100, 4000), 256) == (32, 256)
    assert working_size((2048, 2048), 224) == (224, 224)


def tiled_model(**fields):
    settings = dict(weights="none", device="cpu", seed=0, backbone="resnet18", crop="none", image_size=256, tile_size=128,
                    tile_overlap=64, calibration_holdout=0, coreset_ratio=0.05)  # fmt: skip
    return PatchCore(**{**settings, **fields})


def test_stitched_features_are_each_tiles_own_features_where_it_keeps_them():
    model = tiled_model()
    images = torch.randn(2, 3, 192, 256)
    patches, grid = model.features(images)
    assert grid == (24, 32) and patches.shape == (2, 24 * 32, 384)
    tiles, _ = tiles_of(192, 256, 128, 64, 8)
    expected = torch.full((2, 24, 32, 384), float("nan"))
    for t in tiles:  # by hand: each tile alone through the untiled features, its kept cells copied
        own, _ = model.features.untiled(images[:, :, t.y : t.y + 128, t.x : t.x + 128])
        expected[:, t.rows, t.cols] = own.reshape(2, 16, 16, -1)[:, t.own_rows, t.own_cols]
    assert not expected.isnan().any() and torch.equal(patches, expected.flatten(1, 2))
    one, _ = tiled_model(image_size=128, tile_size=128).features(images[:, :, :128, :128])  # one tile: the untiled features
    assert torch.equal(one, model.features.untiled(images[:, :, :128, :128])[0])


@pytest.mark.parametrize("reweight_b", [0, 9])
def test_scores_a_tile_at_a_time_are_a_brute_force_search_over_the_stitched_features(reweight_b):
    model = tiled_model(reweight_b=reweight_b)
    bank = torch.randn(300, 384) * 0.5 + model.features(torch.randn(1, 3, 192, 256))[0][0, :1]
    model.set_memory_bank(bank)
    images = torch.randn(2, 3, 192, 256)
    scores, maps = model.predict(images)
    patches, grid = model.features(images)
    distances = torch.cdist(patches.double(), bank.double())  # float64 brute force
    patch_scores, nearest = distances.min(dim=2)
    s_star, worst = patch_scores.max(dim=1)
    expected = s_star
    if reweight_b:  # Eq. 7, literally
        m_test = patches[torch.arange(2), worst].double()
        m_star = bank.double()[nearest[torch.arange(2), worst]]
        support = torch.cdist(m_star[:, None], bank.double()[None].expand(2, -1, -1))[:, 0].topk(reweight_b, largest=False).indices
        d = torch.stack([torch.linalg.norm(m_test[i] - bank.double()[support[i]], dim=1) for i in range(2)])
        expected = (1 - torch.exp(s_star - torch.logsumexp(d, dim=1))) * s_star
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5)
    assert maps.shape == (2, 192, 256)
    untiled_maps = model.scorer.maps(patch_scores.float(), grid, (192, 256)).numpy()
    np.testing.assert_allclose(maps, untiled_maps, rtol=1e-5, atol=1e-5)


def test_the_overlap_keeps_tile_borders_away_from_the_kept_patches():
    """Seams: against the features of the whole image in one run, tiles that overlap differ less than tiles that do not
    (measured on this random-init network: about 4x less at these sizes)."""
    images = torch.randn(1, 3, 256, 256)
    whole = tiled_model(tile_size=0, image_size=256).features.untiled(images)[0]
    errors = {}
    for overlap in (0, 64):
        stitched, _ = tiled_model(tile_overlap=overlap).features(images)
        errors[overlap] = float((stitched - whole).norm() / whole.norm())
    assert errors[64] < 0.5 * errors[0], errors


def small_defect_images(root, size=2048, side=16):
    """Three good 2048 x 2048 parts and one with a dark 16 x 16 square 200 px from its left border."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        image = _normal_part(rng, size, size)
        if i == 3:
            ImageDraw.Draw(image).rectangle((200, size // 2, 200 + side - 1, size // 2 + side - 1), fill=(10, 10, 10))
        paths.append(root / f"{i}.png")
        image.save(paths[-1])
    return paths


def test_a_16_pixel_defect_on_a_2048_pixel_image_is_found_with_tiles_and_lost_at_224(tmp_path):
    from dataset import ImageFiles

    paths = small_defect_images(tmp_path)
    found = {}
    for name, fields in {"tiles": dict(image_size=2048, tile_size=512, coreset_ratio=0.01),
                         "224": dict(image_size=224, tile_size=0)}.items():  # fmt: skip
        model = tiled_model(**fields)
        train = torch.utils.data.DataLoader(ImageFiles(paths[:3], model.config.preprocess()), batch_size=1)
        model.fit(train)
        _, maps = model.predict(ImageFiles(paths[3:], model.config.preprocess())[0][0][None])
        peak = np.unravel_index(maps[0].argmax(), maps[0].shape)
        scale = 2048 / maps[0].shape[0]  # the peak on the 2048 px image
        found[name] = abs(peak[0] * scale - 1032) <= 24 and abs(peak[1] * scale - 208) <= 24
    assert found == {"tiles": True, "224": False}


def test_tiles_on_an_mvtec_ad2_scene_end_to_end(tmp_path):
    make_synthetic_scene(tmp_path / "data", "scene", n_train=3, n_validation=3, n_test_good=2, n_test_bad=2, n_private=2,
                         size=(320, 224), defect_px=12)  # fmt: skip
    common = ["--data_path", tmp_path / "data", "--category", "scene", "--output_dir", tmp_path / "out", *SMALL]
    trained = run("train.py", *common, "--weights", "none", "--backbone", "resnet18", "--image_size", "320", "--tile_size", "128",
                  "--tile_overlap", "32", "--coreset_ratio", "0.05")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    evaluated = run("evaluate.py", *common)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = (tmp_path / "out" / "scene" / "metrics.json").read_text()
    assert '"tile_size": 128' in metrics and '"au_pro_0.05"' in metrics
    maps = np.load(tmp_path / "out" / "scene" / "anomaly_maps.npz")
    assert all(maps[name].shape == (224, 320) for name in maps.files)
    # the export: its graph takes the training images' working size (320 x 224) and scores as evaluate.py --images,
    # run by predict_onnx.py without torch
    exported = run("export.py", "--output_dir", tmp_path / "out", "--category", "scene")
    assert exported.returncode == 0, exported.stderr
    assert "input: images, uint8 RGB [batch, 224, 320, 3]" in exported.stdout
    images = f"{tmp_path}/data/scene/test_public/*/*.png"
    expected = run("evaluate.py", *common, "--images", images)
    assert expected.returncode == 0, expected.stderr
    expected = json.loads((tmp_path / "out" / "scene" / "inference" / "scores.json").read_text())["images"]
    model = tmp_path / "out" / "scene" / "patchcore.onnx"
    ran = run_without(TRAINING_STACK, "predict_onnx.py", model, images, "--output_dir", tmp_path / "onnx", "--batch_size", "3")
    assert ran.returncode == 0, ran.stderr
    got = json.loads((tmp_path / "onnx" / "scores.json").read_text())["images"]
    assert [r["path"] for r in got] == [r["path"] for r in expected] and len(got) == 4
    assert [r["decision"] for r in got] == [r["decision"] for r in expected]
    for mine, theirs in zip(got, expected):
        assert mine["score"] == pytest.approx(theirs["score"], rel=1e-4)  # as the untiled export's check (measured: 5.6e-7)
    # an image of another aspect takes another working size, which the graph cannot take: one line, nothing written
    Image.new("RGB", (224, 320)).save(tmp_path / "portrait.png")
    refused = run_without(TRAINING_STACK, "predict_onnx.py", model, tmp_path / "portrait.png", "--output_dir", tmp_path / "refused")
    assert "portrait.png becomes 224x320 pixels at image size 320, but patchcore.onnx takes 320x224" in one_line_error(refused)
    assert not (tmp_path / "refused").exists()
    # a tiled bank from before banks recorded their images' size cannot tell the graph's input: refused in one line
    bank, header = load_bank(tmp_path / "out" / "scene" / "memory_bank.npz")
    header["train"].pop("input_size")
    fields = {k: v for k, v in header.items() if k not in ("format", "format_version", "sha256")}
    save_bank(tmp_path / "old" / "memory_bank.npz", bank, fields)
    with pytest.raises(BankError, match="before banks recorded their training images' size"):
        export_onnx(tmp_path / "old" / "memory_bank.npz", tmp_path / "old" / "patchcore.onnx")


@pytest.mark.parametrize("extra, expected, code", [
    (["--tile_size", "512", "--image_size", "256"], "--tile_size 512 is larger than the image, whose longer side --image_size", 2),
    (["--tile_size", "100", "--image_size", "1024"], "--tile_size must be 0 (off) or a multiple of 32 from 64 on, got 100", 2),
    (["--tile_size", "128", "--crop", "center"], "--tile_size cuts the whole image into tiles: add --crop none", 2),
])  # fmt: skip
def test_bad_tile_settings_are_one_line_before_any_work(synthetic_root, tmp_path, extra, expected, code):
    from scripts import train

    result = train(synthetic_root, tmp_path, *extra, *([] if "--crop" in extra else ["--crop", "none"]))
    assert expected in one_line_error(result, code)
    assert not (tmp_path / "widget").exists()


def test_a_tile_larger_than_a_wide_images_short_side_is_one_line(tmp_path):
    from scripts import train
    from synthetic import make_synthetic_category

    make_synthetic_category(tmp_path / "data", "widget", n_train=2, n_test_good=1, n_per_defect=1, size=(400, 40))
    line = one_line_error(train(tmp_path / "data", tmp_path / "out", "--crop", "none", "--image_size", "512", "--tile_size", "128"))
    assert "--tile_size 128 is larger than the image: widget's train images become 512x64 pixels at --image_size 512" in line
    assert not (tmp_path / "out" / "widget").exists()


def test_a_run_that_needs_more_memory_than_the_machine_has_says_so_before_starting(synthetic_root, tmp_path):
    from scripts import train

    result = train(synthetic_root, tmp_path, "--crop", "none", "--image_size", "20480", "--tile_size", "512")
    line = one_line_error(result)
    assert "this run would need about" in line and "more than the" in line and "lower --image_size" in line
    assert not (tmp_path / "widget").exists()
