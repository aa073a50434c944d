"""The training-set audit, the robust bank and the contamination tool (issue 29), against independent references:
float64 brute-force leave-one-image-out distances, numpy rankings, hand-computed cases, a category with defective
images hidden in train/good, and the drivers' one-line refusals."""

import json
import sys

import numpy as np
import pytest
import torch

from method.audit import audit_scores, kept_rows, leave_image_out, ranked, vouched
from method.search import gamma
from patchcore import PatchCore
from plumbing.bank import load_bank, save_bank
from scripts import REPO, evaluate, one_line_error, run, train
from synthetic import make_synthetic_category

sys.path.insert(0, str(REPO / "benchmarks"))
from contaminate import contaminate  # noqa: E402


def brute_force(rows: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """a(r) in float64: every pair's distance, a row's own image's rows left out."""
    d = torch.cdist(rows.double(), rows.double())
    d[images[:, None] == images[None, :]] = float("inf")
    return d.min(1).values


def test_leave_image_out_equals_a_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(1500, 24, generator=g) * 3 + 10  # an offset: the expansion's rounding grows with the norms
    images = torch.randint(0, 37, (1500,), generator=g)  # rows of one image scattered, as the coreset picks them
    rows[700] = rows[20]  # the same row in two images: distance 0
    images[700] = (images[20] + 1) % 37
    reference = brute_force(rows, images)
    scale = float((rows.double() ** 2).sum(1).max())
    bound = 4 * gamma(26)  # float32's expansion of a(r)^2 errs by at most gamma_(d+2) (||r|| + ||s||)^2; measured: 3.7e-7
    for block in (1, 7, 256, 5000):
        found = leave_image_out(rows, images, block=block).double()
        assert (found**2 - reference**2).abs().max() <= bound * scale, block
    assert leave_image_out(rows, images)[[20, 700]].max() <= (bound * scale) ** 0.5  # a duplicate: 0, to rounding
    which = torch.tensor([1499, 3, 700, 20])
    assert (leave_image_out(rows, images, which, block=3).double() ** 2 - reference[which] ** 2).abs().max() <= bound * scale
    assert torch.isinf(leave_image_out(rows[:5], torch.zeros(5, dtype=torch.long))).all()  # one image: nobody vouches


def test_audit_scores_ranks_and_the_robust_cut_by_hand():
    distances = torch.tensor([1.0, 5.0, 2.0, float("inf"), 5.0])
    scores = audit_scores(distances, torch.tensor([0, 0, 1, 2, 3]), 5)
    np.testing.assert_array_equal(scores[:4], [5.0, 2.0, 0.0, 5.0])  # an image alone (inf) counts 0
    assert np.isnan(scores[4])  # no row: the caller scores it against the bank
    np.testing.assert_array_equal(ranked(np.array([3.0, 1.0, 3.0, 0.0])), [1, 3, 2, 4])  # ties: the lower index first
    np.testing.assert_array_equal(kept_rows(distances, 0.4).numpy(), [True, True, True, False, False])  # ties: the later one goes
    assert kept_rows(distances, 0.19).all()  # floor(0.19 * 5) = 0 rows


def test_vouched_new_rows_against_a_brute_force():
    g = torch.Generator().manual_seed(1)
    existing, new = torch.randn(300, 8, generator=g), torch.randn(60, 8, generator=g) * 1.5
    new_images = torch.randint(0, 4, (60,), generator=g)
    images = torch.cat([torch.full((300,), -1), new_images])
    reference = brute_force(torch.cat([existing, new]), images)[300:]
    cut = float(reference.median())
    clear = (reference - cut).abs() > 1e-4  # float32 may put a row within its rounding of the cut either side
    assert (vouched(existing, new, new_images, cut) == (reference <= cut))[clear].all()


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A synthetic category with 2 of its 9 defective test images moved into train/good by contaminate.py."""
    base = tmp_path_factory.mktemp("contaminated")
    make_synthetic_category(base / "clean", "widget", n_train=8, n_test_good=2, n_per_defect=3, size=80, seed=1)
    record = contaminate(base / "clean", "widget", 0.2, 0, base / "dirty")
    return base / "clean", base / "dirty", record


def test_contaminate_moves_a_seeded_share_without_masks(dirty):
    clean, root, record = dirty
    assert record["defective_test_images"] == 9 and len(record["moved"]) == 2  # round(0.2 * 9)
    assert json.loads((root / "widget.contamination.json").read_text()) == record
    for moved in record["moved"]:
        defect, name = moved["from"].split("/")[1:]
        assert (clean / "widget" / moved["from"]).is_file() and not (root / "widget" / moved["from"]).exists()
        assert (root / "widget" / moved["to"]).read_bytes() == (clean / "widget" / moved["from"]).read_bytes()
        assert not list((root / "widget" / "ground_truth" / defect).glob(name.rsplit(".", 1)[0] + "_mask.*"))
        assert (clean / "widget" / "ground_truth" / defect / (name.rsplit(".", 1)[0] + "_mask.png")).is_file()
    assert contaminate(clean, "widget", 0.2, 0, root.parent / "again")["moved"] == record["moved"]  # seeded


def test_contaminate_refuses_bad_shares_in_one_line(dirty, tmp_path):
    clean, root, _ = dirty
    tool = str(REPO / "benchmarks" / "contaminate.py")
    for share, says in (("1.5", "--share must be in (0, 1)"), ("0.01", "moves 0")):
        line = one_line_error(run(tool, "--data_path", clean, "--category", "widget", "--share", share, "--out", tmp_path / "x"))
        assert says in line, line
    line = one_line_error(run(tool, "--data_path", clean, "--category", "widget", "--out", root.parent / "dirty"))
    assert "exists already" in line  # the earlier copy is kept
    assert not (tmp_path / "x" / "widget").exists()


def test_the_audit_finds_the_hidden_defects_and_the_page_shows_them(dirty, tmp_path):
    _, root, record = dirty
    result = train(root, tmp_path, "--audit_heatmaps", "3")
    assert result.returncode == 0, result.stderr
    assert "least like the others" in result.stdout
    audit = json.loads((tmp_path / "widget" / "train_audit.json").read_text())
    ranks = {entry["image"]: entry["rank"] for entry in audit["images"]}
    assert sorted(ranks.values()) == list(range(1, 11)) and [e["rank"] for e in audit["images"]] == list(range(1, 11))
    hidden = [f"widget/{moved['to']}" for moved in record["moved"]]
    assert all(ranks[image] <= 2 * len(hidden) for image in hidden), ranks  # recall at twice their count: 1
    shown = [entry["heatmap"] for entry in audit["images"] if entry["heatmap"]]
    assert len(shown) == 3 and all((tmp_path / "widget" / name).is_file() for name in shown)
    assert evaluate(root, tmp_path).returncode == 0
    metrics = json.loads((tmp_path / "widget" / "metrics.json").read_text())
    assert metrics["memory_bank"]["train_audit"]["most_suspicious"] == [
        {key: entry[key] for key in ("image", "score", "rank")} for entry in audit["images"][:5]]  # fmt: skip
    page = (tmp_path / "report.html").read_text()
    assert "Training images least like the others" in page and all(f"widget/{name}" in page for name in shown)


def test_the_robust_bank_drops_the_rows_no_other_image_vouches_for(dirty):
    """fit with outlier_share: the bank is the paper's bank less floor(share * M) rows, those with the largest
    leave-one-image-out distance, recomputed here in float64 from the bank rows and the coreset's projection."""
    from torch.utils.data import DataLoader

    from dataset import CategoryDataset

    _, root, _ = dirty
    plain = PatchCore(weights="none", device="cpu", seed=0, resize=72, image_size=64)
    robust = PatchCore(plain.config, device="cpu", outlier_share=0.05)
    loader = DataLoader(CategoryDataset(root, "widget", "train", plain.config.preprocess()), batch_size=4)
    plain.fit(loader)
    facts = robust.fit(loader)
    bank, images = plain.memory_bank, plain.bank_images
    reference = brute_force(bank @ plain.coreset_projection(bank.shape[1]), images)
    n_drop = int(0.05 * len(bank))
    cut = reference.sort().values[len(bank) - n_drop - 1 : len(bank) - n_drop + 1]
    assert len(robust.memory_bank) == len(bank) - n_drop and facts["memory_bank_size"] == len(bank) - n_drop
    kept = (robust.memory_bank[:, None, :] == bank[None, :, :]).all(-1)  # [kept rows, bank rows]: which row each is
    assert (kept.sum(1) == 1).all()
    dropped = torch.ones(len(bank), dtype=torch.bool)
    dropped[kept.nonzero()[:, 1]] = False
    clear = (reference < cut[0] * (1 - 1e-4)) | (reference > cut[1] * (1 + 1e-4))
    assert (dropped == (reference >= cut[1]))[clear].all()  # float32 may decide rows at the cut either way
    assert robust.calibration.calibrated and robust.train_facts["outlier_cut"] > 0
    assert robust.audit_scores.shape == (len(loader.dataset),)


def test_the_robust_bank_round_trips_and_is_refused_in_one_line(synthetic_root, tmp_path):
    result = train(synthetic_root, tmp_path, "--outlier_share", "0.05")
    assert result.returncode == 0, result.stderr
    bank, header = load_bank(tmp_path / "widget" / "memory_bank.npz")
    assert header["config"]["outlier_share"] == 0.05 and "outlier_cut" in header["train"]
    assert evaluate(synthetic_root, tmp_path).returncode == 0
    added = run("train.py", "--output_dir", tmp_path, "--category", "widget", "--add", synthetic_root / "widget" / "test" / "good",
                "--num_workers", "0", "--device", "cpu")  # fmt: skip
    assert added.returncode == 0, added.stderr
    saved = (tmp_path / "widget" / "memory_bank.npz").read_bytes()
    for extra, code, says in ((("--outlier_share", "1.5"), 2, "--outlier_share must be in [0, 1)"),
                              (("--outlier_share", "0.99", "--num_nn", "5"), 1, "once --outlier_share 0.99 drops its outliers"),
                              (("--outlier_share", "0.1", "--shots", "1"), 1, "it needs 2")):  # fmt: skip
        line = one_line_error(train(synthetic_root, tmp_path, *extra), code)
        assert says in line, line
    assert (tmp_path / "widget" / "memory_bank.npz").read_bytes() == saved  # nothing already saved is lost


def test_a_bank_from_before_the_option_reads_back_without_it(evaluated, tmp_path):
    """A bank whose config has no outlier_share (written before issue 29) is the paper's bank: read back with 0."""
    _, out, _ = evaluated
    bank, header = load_bank(out / "widget" / "memory_bank.npz")
    del header["config"]["outlier_share"]
    path = tmp_path / "widget" / "memory_bank.npz"
    save_bank(path, bank, {k: v for k, v in header.items() if k not in ("sha256", "format_version")})
    model = PatchCore.from_bank(path, device="cpu")
    assert model.config.outlier_share == 0.0
    torch.testing.assert_close(model.memory_bank, torch.from_numpy(bank))
