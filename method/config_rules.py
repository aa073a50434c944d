"""The rules a PatchCoreConfig's settings must meet (patchcore.py), each with the line that tells a user what to do."""

from __future__ import annotations

from types import SimpleNamespace

from method.backbone import AMP_DTYPES
from method.presets import PRESETS


def config_problem(settings: dict) -> str | None:
    """The first rule a config's settings (PatchCoreConfig.to_dict(), its defaults resolved) break, or None."""
    c = SimpleNamespace(**settings)
    official = c.protocol == "official"
    members = [name.strip() for name in c.backbone.split(",")]  # one network, or an ensemble's members
    indexed = [layer.split(".", 1) for layer in c.layers]
    checks = [  # (holds, what to say when it does not)
        (c.preset in ("none", *PRESETS), f"--preset must be none or one of {', '.join(PRESETS)}, got {c.preset!r}"),
        (bool(c.layers), "--layers must name at least one layer"),
        (  # an ensemble's layers each name their network by its index
            len(members) == 1 or all(len(p) == 2 and p[0].isdigit() and int(p[0]) < len(members) for p in indexed),
            f"--layers of an ensemble of {len(members)} networks start with the network's index, e.g. 0.layer2,1.layer2; "
            f"got {','.join(c.layers)}",
        ),
        (
            len(members) == 1 or {int(p[0]) for p in indexed if p[0].isdigit()} == set(range(len(members))),
            "--layers: every network of an ensemble needs at least one layer",
        ),
        (len(members) == 1 or c.weights.count(",") in (0, len(members) - 1),
         f"--weights: one for each of the {len(members)} networks, comma-separated, or one for all; got {c.weights}"),
        (len(members) == 1 or official or c.calibration_holdout > 0,
         "an ensemble under --protocol paper combines its members by their thresholds on held-out good images: "
         "keep --calibration_holdout above 0"),  # fmt: skip
        (c.patch_size >= 1 and c.patch_size % 2 == 1, f"--patch_size must be odd and positive, got {c.patch_size}"),
        (c.num_nn >= 1, f"--num_nn must be 1 or more, got {c.num_nn}"),
        (c.reweight_b == 0 or c.num_nn == 1, "--reweight_b: Eq. 7 reweights the nearest distance; use it with --num_nn 1"),
        (official or (c.pretrain_dim is None and c.target_dim is None),
         "--pretrain_dim and --target_dim are the released code's pooling (--protocol official); the paper protocol keeps "
         "every channel"),  # fmt: skip
        (not official or (c.pretrain_dim > 0 and c.target_dim > 0), "--pretrain_dim and --target_dim must be positive"),
        (  # --crop none resizes the whole image to image_size: resize plays no part then
            c.image_size > 0 and (c.crop == "none" or c.image_size <= c.resize),
            f"--image_size must be positive and at most --resize ({c.resize}), got {c.image_size}",
        ),
        (c.crop in ("center", "none"), f"--crop must be center or none, got {c.crop!r}"),
        (c.shots >= 0, f"--shots must be 0 (all images) or more, got {c.shots}"),
        (0 < c.coreset_ratio <= 1, f"--coreset_ratio must be in (0, 1], got {c.coreset_ratio}"),
        (0 <= c.outlier_share < 1, f"--outlier_share must be in [0, 1), got {c.outlier_share}"),
        (c.coreset_proj_dim >= 0, f"--coreset_proj_dim must be 0 (no projection) or more, got {c.coreset_proj_dim}"),
        (c.amp in AMP_DTYPES, f"--amp must be one of {', '.join(AMP_DTYPES)}, got {c.amp!r}"),
        (c.reweight_b >= 0, f"--reweight_b must be 0 (max score) or at least 2, got {c.reweight_b}"),
        (c.reweight_b != 1, "--reweight_b 1 would score every image 0 (Eq. 7's weight is 1 - e^s/e^s): use 0 or b >= 2"),
        (c.blur_sigma >= 0, f"--blur_sigma must be 0 (off) or more, got {c.blur_sigma}"),
        (0 <= c.calibration_holdout < 1, f"--calibration_holdout must be in [0, 1), got {c.calibration_holdout}"),
        (0 < c.target_fpr < 1, f"--target_fpr must be in (0, 1), got {c.target_fpr}"),
        (not official or c.reweight_b == 0, "--reweight_b: the released code scores by the max; Eq. 7 is --protocol paper only"),
        (c.tile_size == 0 or c.crop == "none", "--tile_size cuts the whole image into tiles: add --crop none"),
        (c.tile_size == 0 or len(members) == 1, "--tile_size: tiles run one network, not an ensemble, for now"),
        (c.tile_size == 0 or not official, "--tile_size: tiles are --protocol paper only (the released code has none)"),
        (c.tile_size == 0 or (c.tile_size >= 64 and c.tile_size % 32 == 0),
         f"--tile_size must be 0 (off) or a multiple of 32 from 64 on, got {c.tile_size}"),  # fmt: skip
        (c.tile_size == 0 or (0 <= c.tile_overlap < c.tile_size and c.tile_overlap % 32 == 0),
         f"--tile_overlap must be a multiple of 32 below --tile_size ({c.tile_size}), got {c.tile_overlap}"),  # fmt: skip
        (c.tile_size <= c.image_size, f"--tile_size {c.tile_size} is larger than the image, whose longer side --image_size makes "
         f"{c.image_size} pixels: lower --tile_size, or raise --image_size"),  # fmt: skip
    ]
    stray = [f"--{k} {settings[k]}" for k, v in PRESETS.get(c.preset, {}).items() if settings[k] != (list(v) if k == "layers" else v)]
    checks.append((not stray, f"--preset {c.preset} is not this run: {', '.join(stray)} differ from it"))
    return next((message for ok, message in checks if not ok), None)



def fit_memory_problem(settings: dict, n_patches: int, feature_dim: int, bank_rows: int, available: int | None) -> str | None:
    """Whether fit() can run in `available` bytes of RAM, said before it starts, or None. What it must hold whatever
    --feature_memory_gb says (the full features can always wait for a second pass): every patch's projection for the
    coreset (4 bytes a dimension) and its coreset distance and index (12 bytes), the memory bank and its search's copy
    of it (2 x 4 bytes a dimension a row); an estimate from those sizes, without the backbone's working memory."""
    projected_dim = settings["coreset_proj_dim"] if 0 < settings["coreset_proj_dim"] < feature_dim else feature_dim
    needed = n_patches * (4 * projected_dim + 12) + bank_rows * feature_dim * 8
    if available is None or needed <= available:
        return None
    return (f"this run would need about {needed / 2**30:.1f} GB of RAM for its {n_patches:,} training patches (coreset projections "
            f"and a memory bank of {bank_rows:,} rows), more than the {available / 2**30:.1f} GB available: lower --image_size, "
            "--coreset_ratio or the number of training images (--shots)")  # fmt: skip


def bank_size_problem(settings: dict, bank_size: int) -> str | None:
    """What is wrong with a bank of `bank_size` rows for a config's settings: Eq. 7 and the k-nearest mean need that many
    memory patches, of what --outlier_share leaves of them; or None."""
    share = settings["outlier_share"]
    left = bank_size - int(share * bank_size)  # at least 1: share < 1
    for option, needed in (("--reweight_b", settings["reweight_b"]), ("--num_nn", settings["num_nn"])):
        if needed > left:
            dropped = f", {left} once --outlier_share {share:g} drops its outliers" if share else ""
            return (f"{option} {needed} is larger than the memory bank ({bank_size} patches{dropped}): use a smaller {option}"
                    f"{', a smaller --outlier_share' if share else ''} or a larger --coreset_ratio")  # fmt: skip
    return None
