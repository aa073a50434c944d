"""The ONNX export and the torch-free runner against independent references: PatchCore.predict with faiss,
dataset.py's own preprocessing, evaluate.py --images, float64 brute force."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_patchcore import _brute_force, _hard_cases

from dataset import IMAGENET_MEAN, IMAGENET_STD, CategoryDataset, Preprocess
from deploy import onnx_export
from deploy.onnx_export import export_onnx
from deploy.onnx_model import DECISION_OUTPUTS, OUTPUTS, DeployedModel, ExportError
from deploy.onnx_search import translation_table
from export import categories as export_categories
from method.search import GraphSearch, gamma
from patchcore import PatchCore
from plumbing.bank import BankError, load_bank, save_bank
from plumbing.image_io import load_rgb, model_input
from scripts import REPO, THREADS, evaluate, one_line_error, run

# what a line PC has: onnxruntime, numpy, Pillow (requirements-deploy.txt); none of the training stack
TRAINING_STACK = ("torch", "torchvision", "faiss", "scipy", "sklearn", "matplotlib", "tqdm", "onnx", "onnxscript", "onnx_ir")


def run_without(modules, script, *args):
    """A project script in a fresh interpreter where `modules` are not installed: importing them fails."""
    code = (
        "import importlib.abc, sys\n"
        "class NotInstalled(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {list(modules)!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch is importable: the check is broken')\n"
        f"sys.argv = {[script, *map(str, args)]!r}\n"
        f"import runpy\nrunpy.run_path({script!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ, **THREADS})


@pytest.fixture(scope="session")
def exported(evaluated):
    """The synthetic category's bank (paper protocol, calibrated) exported by export.py: (data root, output dir, model file, stdout)."""
    root, out, _ = evaluated
    result = run("export.py", "--output_dir", out, "--category", "widget")
    assert result.returncode == 0, result.stderr
    return root, out, out / "widget" / "patchcore.onnx", result.stdout


@pytest.fixture(scope="session")
def other_exports(synthetic_root, tmp_path_factory):
    """Banks of the official protocol and of Eq. 7 (b = 3) on the same category, each exported once: {name: (bank, model file)}."""
    out = tmp_path_factory.mktemp("exports")
    train = CategoryDataset(synthetic_root, "widget", "train", Preprocess(72, 64))
    files = {}
    for name, settings in (("official", {"protocol": "official"}), ("eq7", {"reweight_b": 3})):
        model = PatchCore(weights="none", device="cpu", resize=72, image_size=64, **settings)
        model.fit(torch.utils.data.DataLoader(train, batch_size=4))
        bank = out / name / "memory_bank.npz"
        model.save(bank, category="widget", train={})
        export_onnx(bank, out / name / "patchcore.onnx")
        files[name] = (bank, out / name / "patchcore.onnx")
    return files


def test_export_writes_one_file_with_the_metadata(exported):
    root, out, path, stdout = exported
    assert f"widget: exported {path}" in stdout and "one file, the bank inside" in stdout
    assert "checked: onnxruntime scores 2 probe images as predict() does" in stdout
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith((".", "patchcore"))) == ["patchcore.onnx"]  # no temporaries
    bank, header = load_bank(out / "widget" / "memory_bank.npz")
    model = DeployedModel(path)
    meta = model.metadata
    assert meta["patchcore.format"] == "patchcore-onnx" and meta["patchcore.format_version"] == "1"
    assert model.config == header["config"] and model.calibration == header["calibration"]
    assert float(meta["patchcore.image_threshold"]) == header["calibration"]["image_threshold"]
    assert float(meta["patchcore.pixel_threshold"]) == header["calibration"]["pixel_threshold"]
    assert meta["patchcore.bank_sha256"] == header["sha256"] and meta["patchcore.bank_format_version"] == "2"
    assert meta["patchcore.backbone_sha256"] == header["model"]["backbone_sha256"] and meta["patchcore.bank_rows"] == str(len(bank))
    described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO, capture_output=True, text=True)
    checkout = described.stdout.strip() if described.returncode == 0 else "unknown"  # a copy without .git: 'unknown'
    assert meta["patchcore.project_version"] == checkout and meta["patchcore.torch_version"] == torch.__version__
    pre = model.preprocessing
    assert (pre["resize"], pre["image_size"], pre["crop"]) == (72, 64, "center")
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD)
    # the 16-bit rule, written out for another language (issue 28, item 3): by the mode, and how to compute it
    assert "(v + 128) // 257" in pre["color"] and "floor(clip(v, 0, 1) * 255 + 0.5)" in pre["color"]
    assert "by the mode, whatever the image holds" in pre["color"] and "I;16" in pre["color"]
    assert set(json.loads(meta["patchcore.outputs"])) == {*OUTPUTS, *DECISION_OUTPUTS}
    (images,) = model.session.get_inputs()
    assert (
        images.name == "images" and images.type == "tensor(uint8)" and images.shape[1:] == [64, 64, 3] and isinstance(images.shape[0], str)
    )
    types = {o.name: o.type for o in model.session.get_outputs()}
    assert types == {"scores": "tensor(float)", "maps": "tensor(float)", "normalized_scores": "tensor(float)",
                     "decisions": "tensor(bool)", "defect_masks": "tensor(bool)"}  # fmt: skip


def _test_images(root, resize=72, image_size=64):
    """The category's test images as predict() takes them (dataset.py) and as the model file takes them (image_io.py)."""
    test = CategoryDataset(root, "widget", "test", Preprocess(resize, image_size))
    tensors = torch.stack([test[i][0] for i in range(len(test))])
    uint8 = np.stack([model_input(load_rgb(s.image), resize, image_size, "center") for s in test.samples])
    return tensors, uint8


@pytest.mark.parametrize("name", ["paper", "official", "eq7"])
@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_scores_as_predict_with_faiss(name, batch, exported, other_exports):
    root, out, path, _ = exported
    bank, path = (out / "widget" / "memory_bank.npz", path) if name == "paper" else other_exports[name]
    tensors, uint8 = _test_images(root)
    got = DeployedModel(path)(uint8[:batch])
    # measured largest errors, scores relative to each, maps to the largest value: against faiss (its own rounding)
    # 3.9e-5 and 5.1e-5 (paper, Eq. 7), 5.0e-6 and 2.1e-6 (official); against the exact search 1.5e-6 at most
    for search, tolerance in (("faiss", 1e-4), ("exact", 1e-5)):
        expected_scores, expected_maps = PatchCore.from_bank(bank, device="cpu", search=search).predict(tensors[:batch])
        np.testing.assert_allclose(got["scores"], expected_scores, rtol=tolerance)
        np.testing.assert_allclose(got["maps"], expected_maps, rtol=0, atol=tolerance * np.abs(expected_maps).max())


def test_the_runners_preprocessing_equals_datasets_pixel_for_pixel(tmp_path):
    """image_io.model_input against dataset.Preprocess (torchvision's Resize, CenterCrop, ToTensor, Normalize), undone:
    shapes that round the crop offset both ways, tall and wide, an image already at the right size, and every mode."""
    rng = np.random.default_rng(3)
    files = {
        "wide.png": Image.fromarray(rng.integers(0, 256, (80, 123, 3), dtype=np.uint8)),
        "tall.jpg": Image.fromarray(rng.integers(0, 256, (301, 97, 3), dtype=np.uint8)),
        "odd.png": Image.fromarray(rng.integers(0, 256, (73, 75, 3), dtype=np.uint8)),  # crop offsets (73 - 64) / 2 = 4.5 -> 4
        "exact.png": Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)),
        "grey16.png": Image.fromarray(rng.integers(0, 65536, (90, 70), dtype=np.uint16)),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (64, 100, 4), dtype=np.uint8)),
        "palette.png": Image.fromarray(rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)).convert("P"),
        "grey.bmp": Image.fromarray(rng.integers(0, 256, (50, 60), dtype=np.uint8)),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    for resize, size, crop, tile in ((72, 64, "center", 0), (73, 64, "center", 0), (72, 64, "none", 0), (64, 64, "center", 0),
                                     (72, 96, "none", 64), (72, 160, "none", 64)):  # fmt: skip
        pre = Preprocess(resize, size, crop=crop, tile_size=tile)
        for name in files:
            rgb = load_rgb(tmp_path / name)
            undone = (pre.image(rgb).permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN) * 255
            assert np.abs(undone - np.round(undone)).max() < 1e-3  # dataset.py's values are whole 8-bit levels, undone
            got = model_input(rgb, resize, size, crop, tile)
            assert got.dtype == np.uint8 and np.array_equal(got, np.round(undone).astype(np.uint8)), (name, resize, crop)


def test_the_runner_runs_without_torch_and_decides_as_evaluate(exported, tmp_path):
    root, out, path, _ = exported
    images = f"{root}/widget/test/*/*.png"
    (tmp_path / "widget").mkdir()
    shutil.copy(out / "widget" / "memory_bank.npz", tmp_path / "widget" / "memory_bank.npz")  # evaluate.py --images writes beside it
    result = evaluate(root, tmp_path, "--images", images)
    assert result.returncode == 0, result.stderr
    expected = json.loads((tmp_path / "widget" / "inference" / "scores.json").read_text())
    result = run_without(
        TRAINING_STACK, "predict_onnx.py", path, images, "--output_dir", tmp_path / "onnx", "--heatmaps", "--batch_size", "4"
    )
    assert result.returncode == 0, result.stderr
    assert "thresholds: calibrated on 1 held-out good images for 5% false alarms" in result.stdout
    assert "9 images in" in result.stdout and "onnxruntime" in result.stdout
    got = json.loads((tmp_path / "onnx" / "scores.json").read_text())
    assert got["threshold"] == expected["threshold"] and got["pixel_threshold"] == expected["pixel_threshold"]
    assert got["thresholds_from"] == expected["thresholds_from"] and got["heatmap_scale"] == expected["heatmap_scale"]
    assert [r["path"] for r in got["images"]] == [r["path"] for r in expected["images"]]
    assert [r["decision"] for r in got["images"]] == [r["decision"] for r in expected["images"]]
    assert {r["decision"] for r in got["images"]} == {"good", "defective"}  # both decisions are exercised
    for mine, theirs in zip(got["images"], expected["images"]):
        assert mine["score"] == pytest.approx(theirs["score"], rel=1e-4)  # measured: 7.3e-7 (evaluate.py's int8 candidates, re-ranked)
        assert mine["normalized_score"] == pytest.approx(theirs["normalized_score"], rel=1e-4)
        assert Image.open(tmp_path / "onnx" / mine["heatmap"]).size == (3 * 64 + 72, 64)


def test_openvino_scores_as_onnxruntime(exported):
    pytest.importorskip("openvino", reason="openvino does not install on this platform")
    root, _, path, _ = exported
    _, uint8 = _test_images(root)
    expected = DeployedModel(path)(uint8)
    got = DeployedModel(path, "openvino")(uint8)
    # measured, relative to the largest value: scores 7.1e-7, maps 1.5e-6 (f32; with OpenVINO's default bf16 on this CPU: 1e-3, 6.5e-3)
    for name in (*OUTPUTS, "normalized_scores"):
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5 * np.abs(expected[name]).max())
    for name in ("decisions", "defect_masks"):
        assert got[name].dtype == bool and np.mean(got[name] == expected[name]) > 0.999, name  # measured: all equal


class _Searches(torch.nn.Module):
    """One graph of the exported search at several k."""

    def __init__(self, search, ks):
        super().__init__()
        self.search, self.ks = search, ks

    def forward(self, queries):
        return tuple(t for k in self.ks for t in self.search(queries, k=k, squared=True))


@pytest.mark.parametrize("case", list(_hard_cases()))
def test_the_graphs_search_equals_a_float64_brute_force(case, tmp_path):
    """The exported search (blocks of 7 queries, the last one padded; candidates from 3 rows either side of a block's
    keys) on tests/test_patchcore.py's hard cases, k up to beyond the candidates: on onnxruntime every neighbour, in
    order, is float64 brute force's (ties: the lower index).
    OpenVINO's CPU plugin computes float64 as float32: its neighbours are as near as the true ones to within float32's
    rounding, but where distances tie that closely (repeated rows, far queries) it may take another of the tied rows."""
    queries, bank = _hard_cases()[case]
    ks = (1, 2, 9, 40)
    program = torch.onnx.export(_Searches(GraphSearch(bank, rows=7, window=3), ks).eval(), (queries[:9],), dynamo=True, verbose=False,
                                input_names=["queries"], dynamic_shapes=({0: torch.export.Dim("n", min=1)},),
                                custom_translation_table=translation_table())  # fmt: skip
    program.save(tmp_path / "search.onnx")
    import onnxruntime

    got = onnxruntime.InferenceSession(tmp_path / "search.onnx").run(None, {"queries": queries.numpy()})
    try:
        import openvino

        compiled = openvino.Core().compile_model(tmp_path / "search.onnx", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        vino = [np.asarray(v) for v in compiled({"queries": queries.numpy()}).values()]
    except ImportError:
        vino = None
    q64, bank64 = queries.numpy().astype(np.float64), bank.numpy().astype(np.float64)
    for j, k in enumerate(ks):
        expected_d, expected_i = _brute_force(queries.numpy(), bank.numpy(), k)
        distances, indices = got[2 * j], got[2 * j + 1]
        assert np.array_equal(indices, expected_i), k
        np.testing.assert_allclose(np.sqrt(distances), expected_d, rtol=1e-7, atol=0)  # float64's, rounded to float32
        if vino is not None:
            taken = np.sqrt(((q64[:, None, :] - bank64[vino[2 * j + 1]]) ** 2).sum(-1))  # float64 distances of OpenVINO's rows
            # each of the two distances compared is within gamma(C + 2) of the true square, relatively, when computed in float32
            np.testing.assert_allclose(taken, expected_d, rtol=gamma(bank.shape[1] + 2), atol=0)  # measured: 2.3e-6, near-ties 1e-6


@pytest.fixture(scope="module")
def small_bank(synthetic_root, tmp_path_factory):
    """A bank of a small backbone (resnet18, random init), quick to export: for the file mechanics, not the method."""
    model = PatchCore(weights="none", device="cpu", backbone="resnet18", resize=72, image_size=64)
    model.fit(torch.utils.data.DataLoader(CategoryDataset(synthetic_root, "widget", "train", Preprocess(72, 64)), batch_size=6))
    path = tmp_path_factory.mktemp("small") / "memory_bank.npz"
    model.save(path, category="small", train={})
    return path


def test_a_model_beyond_the_protobuf_limit_keeps_its_tensors_beside_it(small_bank, synthetic_root, tmp_path):
    path, data = tmp_path / "patchcore.onnx", tmp_path / "patchcore.onnx.data"
    done = export_onnx(small_bank, path, protobuf_limit=1000)
    assert done["data"] == data and data.stat().st_size > done["tensor_bytes"] * 0.99 and path.stat().st_size < 2e6  # the graph: 1.0 MB
    tensors, uint8 = _test_images(synthetic_root)
    expected, _ = PatchCore.from_bank(small_bank, device="cpu", search="faiss").predict(tensors)
    np.testing.assert_allclose(DeployedModel(path)(uint8)["scores"], expected, rtol=1e-4)
    export_onnx(small_bank, path)  # small enough for one file again: the old tensors go
    assert not data.exists() and path.stat().st_size > done["tensor_bytes"]


def test_an_interrupted_export_leaves_no_file_and_the_previous_one_intact(small_bank, tmp_path, monkeypatch):
    path = tmp_path / "patchcore.onnx"

    def interrupted(written, *args):
        assert written.is_file() and written.parent != path.parent  # written in full, but not in place yet
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "check_against_predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(small_bank, path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_onnx(small_bank, path)
    before = path.read_bytes()
    monkeypatch.setattr(onnx_export, "check_against_predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(small_bank, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_an_export_that_does_not_score_as_predict_is_not_kept(small_bank, tmp_path, monkeypatch):
    real = PatchCore.predict
    monkeypatch.setattr(PatchCore, "predict", lambda self, images: tuple(v * 1.001 for v in real(self, images)))
    with pytest.raises(ExportError, match=r"does not score as predict\(\) does \(relative difference 0.001\)"):
        export_onnx(small_bank, tmp_path / "patchcore.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_banks_are_refused_in_one_line(evaluated, tmp_path):
    _, out, _ = evaluated
    (tmp_path / "future").mkdir()
    with np.load(out / "widget" / "memory_bank.npz") as data:
        future = json.loads(data["header"].tobytes())
        future["format_version"] = 99
        np.savez(tmp_path / "future" / "memory_bank.npz", memory_bank=data["memory_bank"],
                 header=np.frombuffer(json.dumps(future).encode(), np.uint8))  # fmt: skip
    assert "has bank format 99, this code reads 2" in one_line_error(run("export.py", "--output_dir", tmp_path, "--category", "future"))
    bank, header = load_bank(out / "widget" / "memory_bank.npz")
    fields = {k: v for k, v in header.items() if k not in ("format", "format_version", "sha256")}
    members = [{"model": fields["model"], "calibration": fields["calibration"], "train": fields["train"]}] * 2
    save_bank(tmp_path / "ensemble" / "memory_bank.npz", [bank, bank], {**fields, "members": members})  # an ensemble's file
    with pytest.raises(BankError, match="holds an ensemble of 2 networks: export.py exports one model's bank"):
        export_onnx(tmp_path / "ensemble" / "memory_bank.npz", tmp_path / "ensemble" / "patchcore.onnx")
    with pytest.raises(BankError, match="no memory bank for nothing in"):
        export_categories(tmp_path, "nothing")
    assert not list(tmp_path.rglob("*.onnx*")) and not list(tmp_path.rglob(".*"))


def test_the_runner_refuses_bad_input_in_one_line(exported, tmp_path):
    root, _, path, _ = exported
    images = root / "widget" / "test" / "good"
    out = tmp_path / "out"

    def runner(model, *extra, blocked=TRAINING_STACK):
        return one_line_error(run_without(blocked, "predict_onnx.py", model, *extra, "--output_dir", out))

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert f"{truncated} is not a readable ONNX file" in runner(truncated, images)
    from onnx import TensorProto, helper, save

    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy")
    save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign", [x], [y])), tmp_path / "foreign.onnx")
    assert "is not a PatchCore export" in runner(tmp_path / "foreign.onnx", images)
    assert "no exported model at" in runner(tmp_path / "nowhere.onnx", images)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert "cannot read image" in runner(path, tmp_path / "broken.png")
    assert "pip install -r requirements-deploy.txt" in runner(path, images, blocked=(*TRAINING_STACK, "onnxruntime"))
    assert not out.exists()


def _tiny_export(path, metadata):
    """A two-output ONNX file (scores, maps: identities of the input) with the given metadata_props."""
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 4, 4, 3])
    outputs = [helper.make_tensor_value_info(name, TensorProto.UINT8, ["B", 4, 4, 3]) for name in ("scores", "maps")]
    nodes = [helper.make_node("Identity", ["images"], [name]) for name in ("scores", "maps")]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], outputs))
    helper.set_model_props(model, metadata)
    save(model, path)
    return path


def test_every_required_metadata_key_is_checked_and_named(tmp_path):
    """A file with the format keys but without patchcore.config (or with a damaged one) is refused naming the key,
    not with a bare KeyError "'patchcore.config'" (issue 28, item 11)."""
    complete = {
        "patchcore.format": "patchcore-onnx", "patchcore.format_version": "1", "patchcore.config": "{}", "patchcore.calibration": "{}",
        "patchcore.preprocessing": json.dumps({"resize": 4, "image_size": 4, "crop": "center"}),
    }  # fmt: skip
    assert DeployedModel(_tiny_export(tmp_path / "complete.onnx", complete)).image_size == 4
    for key in ("patchcore.config", "patchcore.preprocessing", "patchcore.calibration"):
        path = _tiny_export(tmp_path / f"without {key}.onnx", {k: v for k, v in complete.items() if k != key})
        with pytest.raises(ExportError, match=f"lacks the metadata {key}, which every export has"):
            DeployedModel(path)
    path = _tiny_export(tmp_path / "bad json.onnx", {**complete, "patchcore.config": "{not json"})
    with pytest.raises(ExportError, match="metadata 'patchcore.config' is not valid JSON"):
        DeployedModel(path)
    path = _tiny_export(tmp_path / "no crop.onnx", {**complete, "patchcore.preprocessing": json.dumps({"resize": 4, "image_size": 4})})
    with pytest.raises(ExportError, match="metadata 'patchcore.preprocessing' lacks crop"):
        DeployedModel(path)
    path = _tiny_export(tmp_path / "bad threshold.onnx", {**complete, "patchcore.image_threshold": "high"})
    with pytest.raises(ExportError, match="metadata 'patchcore.image_threshold' is not a number"):
        DeployedModel(path)
    no_config = tmp_path / "without patchcore.config.onnx"
    line = one_line_error(run_without(TRAINING_STACK, "predict_onnx.py", no_config, tmp_path, "--output_dir", tmp_path / "out"))
    assert line == f"error: {no_config} lacks the metadata patchcore.config, which every export has; export it again with export.py"


def test_a_bank_whose_weights_file_moved_exports_with_weights(synthetic_root, tmp_path):
    """A bank trained with --weights PATH exports once the file has moved, given --weights NEW_PATH, as evaluate.py
    does (issue 28, item 13); without it, one line that says to pass --weights."""
    import torchvision

    weights = tmp_path / "resnet18 weights.pt"
    torch.manual_seed(5)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    model = PatchCore(weights=str(weights), device="cpu", backbone="resnet18", resize=72, image_size=64)
    model.fit(torch.utils.data.DataLoader(CategoryDataset(synthetic_root, "widget", "train", Preprocess(72, 64)), batch_size=6))
    model.save(tmp_path / "out" / "widget" / "memory_bank.npz", category="widget", train={})
    moved = tmp_path / "moved.pt"
    weights.rename(moved)
    line = one_line_error(run("export.py", "--output_dir", tmp_path / "out", "--category", "widget"))
    assert f"--weights {weights}: no such file" in line
    result = run("export.py", "--output_dir", tmp_path / "out", "--category", "widget", "--weights", moved)
    assert result.returncode == 0, result.stderr
    tensors, uint8 = _test_images(synthetic_root)
    expected, _ = model.predict(tensors)
    np.testing.assert_allclose(DeployedModel(tmp_path / "out" / "widget" / "patchcore.onnx")(uint8)["scores"], expected, rtol=1e-4)


def test_the_map_resize_is_torchs_bilinear_rule():
    """image_io.resize_map (numpy; evaluate.py's and the runner's, issue 28 item 18: one rule, where the runner used
    PIL's antialiased filter and evaluate.py torch) against a hand-computed case of torch's bilinear rule
    (align_corners=False) and against torch's F.interpolate itself, up and down, to float32 rounding."""
    import torch.nn.functional as F

    from plumbing.image_io import resize_map

    def torch_resize_map(anomaly_map, size):
        return F.interpolate(torch.from_numpy(anomaly_map)[None, None], size=size[::-1], mode="bilinear", align_corners=False)[0, 0].numpy()

    a, b, c, d = 1.0, 5.0, 3.0, 11.0
    # 2 -> 4 samples at max((i + 0.5) / 2 - 0.5, 0) = 0, 0.25, 0.75, 1.25 (the last clamped to the edge)
    row = lambda p, q: [p, 0.75 * p + 0.25 * q, 0.25 * p + 0.75 * q, q]  # noqa: E731
    top, bottom = row(a, b), row(c, d)
    expected = np.array([row(top[j], bottom[j]) for j in range(4)]).T
    np.testing.assert_allclose(resize_map(np.array([[a, b], [c, d]], np.float32), (4, 4)), expected, rtol=1e-7)
    rng = np.random.default_rng(4)
    for shape, size in (((64, 64), (80, 80)), ((64, 64), (123, 80)), ((64, 64), (48, 30)), ((224, 224), (900, 600)), ((7, 5), (3, 11))):
        anomaly_map = (rng.standard_normal(shape) * 10 + 20).astype(np.float32)
        got, want = resize_map(anomaly_map, size), torch_resize_map(anomaly_map, size)
        assert got.dtype == np.float32 and got.shape == want.shape == size[::-1]
        np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * np.abs(want).max())  # measured: 1.3e-7 (one float32 step)


def test_the_runner_keeps_the_heatmaps_of_images_sharing_a_stem(exported, tmp_path):
    """a.png and a.jpg both get a heatmap, named as evaluate.py names them (image_io.heatmap_names; issue 28, item 4)."""
    root, _, path, _ = exported
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((root / "widget" / "test").glob("*/*.png"))[:3]
    shutil.copy(sources[0], images / "a.png")
    Image.open(sources[1]).save(images / "a.jpg", quality=95)
    shutil.copy(sources[2], images / "b.png")
    result = run_without(TRAINING_STACK, "predict_onnx.py", path, images, "--output_dir", tmp_path / "out", "--heatmaps")
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "out" / "scores.json").read_text())["images"]
    assert [r["heatmap"] for r in records] == ["anomaly_maps/a.jpg.png", "anomaly_maps/a.png.png", "anomaly_maps/b.png"]
    drawn = [np.asarray(Image.open(tmp_path / "out" / r["heatmap"])) for r in records]
    assert not np.array_equal(drawn[0], drawn[1])  # two images, two heatmaps: neither overwrote the other
