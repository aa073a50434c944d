"""PatchCore: "Towards Total Recall in Industrial Anomaly Detection" (Roth et al., CVPR 2022).

Read top to bottom, this file is the method:
  PatchCoreConfig   everything that decides a memory bank's content; saved in the bank
  PatchFeatures     a frozen ImageNet CNN's layer2 + layer3 maps as locally aware patch features (Sec. 3.1, Eq. 1-2)
  AnomalyScorer     images -> image scores and anomaly maps against the memory bank (Sec. 3.3, Eq. 6-7), one torch module
  PatchCore         fit: the memory bank as a greedy coreset of all training patches (Sec. 3.2, Alg. 1);
                    add, predict, save and from_bank (the round trip through the bank file)

Its parts are in method/ (backbone, coreset, search, maps, official, thresholds, audit, presets, config_rules), the
bank file in plumbing/bank.py; an ensemble of several networks is ensemble.py's, built of PatchCores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataset import Preprocess
from method.audit import audit_bank, kept_rows, leave_image_out, vouched
from method.backbone import Backbone
from method.config_rules import bank_size_problem, config_problem, fit_memory_problem
from method.coreset import full_patches, gather_rows, greedy_coreset, image_rows, projected_patches, random_projection
from method.maps import gaussian_blur
from method.official import official_patches
from method.presets import PRESETS
from method.search import ExactSearch, FaissSearch, GraphSearch, make_search, resolve_search
from method.thresholds import Calibration, calibrate_held_out, holdout_images, note_on_fit, note_on_growth
from method.tiles import score_by_tiles, stitched_patches
from plumbing.bank import BankError, environment, load_bank, save_bank
from plumbing.system import available_memory_bytes, default_feature_memory_gb, resolve_device, set_cuda_fp32_precision

PROTOCOLS = ("paper", "official")
DEFAULT_CORESET_RATIO = {"paper": 0.25, "official": 0.1}  # the seed's 25 %; the released code's IM224 baseline, 10 %
TILE_GROUP = 8  # tile crops per backbone run (tile_size): the activations in flight


def setting(default: object, help: str, **shown: str) -> dataclasses.Field:
    """A config field with its command-line help (cli.add_config_args turns each into a train.py option)."""
    return field(default=default, metadata={"help": help, **shown})


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that decides a memory bank's content and how it is scored. Stored whole in the bank; PatchCore.from_bank
    rebuilds the model with PatchCoreConfig(**saved). These defaults are the only ones: train.py's options are generated
    from these fields, with their help texts. How a run is executed (device, batch size, search) is not part of it."""

    protocol: str = setting("paper", "paper: the seed's 1536-d features and L2 distances (Eq. 6); official: the authors' released "
                            "code (1024-d features, squared distances, scipy's blur, their masks); see docs/architecture.md")  # fmt: skip
    preset: str = setting("none", "a published run of the released code to reproduce, every setting as its script has it: "
                          + ", ".join(PRESETS))  # fmt: skip
    backbone: str = setting("wide_resnet50_2", "torchvision classification network; a comma list builds an ensemble, one "
                            "memory bank per network")  # fmt: skip
    layers: tuple[str, ...] = setting(
        ("layer2", "layer3"), "backbone layers the patch features come from, comma list; a dotted path reaches inside a block "
        "(features.denseblock3); in an ensemble each starts with its network's index (0.layer2,1.features.denseblock2)",
        metavar="LAYERS")  # fmt: skip
    weights: str = setting("imagenet", "imagenet, auto (imagenet, else random init with a warning), none (random init, tests only) "
                           "or PATH to a state_dict")  # fmt: skip
    resize: int = setting(256, "shorter image side before the center crop")
    image_size: int = setting(224, "center-crop size, the model's input")
    crop: str = setting("center", "center: the paper's resize, then center crop; none: the whole image resized to image_size, borders kept")
    tile_size: int = setting(0, "high resolution: each image, resized so its longer side is --image_size (aspect kept), is cut "
                             "into overlapping tiles of this many pixels, each through the backbone, their patches stitched into one grid "
                             "(method/tiles.py; needs --crop none); 0 = off")  # fmt: skip
    tile_overlap: int = setting(64, "with --tile_size: pixels neighbouring tiles share; each keeps the patches nearer its own centre")
    shots: int = setting(0, "few-shot: build the bank from this many training images, drawn with --seed; 0 = all")
    coreset_ratio: float | None = setting(None, "fraction of the training patches kept in the memory bank",
                                          default_text="0.25 for paper, 0.1 for official")  # fmt: skip
    coreset_proj_dim: int = setting(128, "random-projection dims for the coreset distances, 0 = none")
    outlier_share: float = setting(
        0.0, "robust bank: drop this share of the bank's rows, those farthest from every other training image "
        "(the audit's leave-one-image-out distance, method/audit.py); 0 = off, as the paper"
    )
    patch_size: int = setting(3, "neighbourhood size p of the local aggregation (Eq. 1), odd")
    num_nn: int = setting(1, "k: a patch's score is the mean distance to its k nearest memory patches (1: Eq. 6)")
    pretrain_dim: int | None = setting(None, "official: each layer's patch vector pooled to this many dims",
                                       default_text="1024 for official; paper keeps every channel")  # fmt: skip
    target_dim: int | None = setting(None, "official: the layers' pooled vectors pooled again to this many dims",
                                     default_text="1024 for official; paper: none")  # fmt: skip
    seed: int = setting(0, "seed of the coreset's projection and start point, the few-shot draw, the calibration hold-out, "
                        "random-init weights")  # fmt: skip
    amp: str = setting("none", "backbone autocast precision: none (fp32), bf16 or fp16")
    reweight_b: int = setting(0, "image score: 0 = max patch score; b >= 2 = the paper's Eq. 7 reweighting with b neighbours (paper: 9)")
    blur_sigma: float = setting(4.0, "Gaussian sigma for smoothing anomaly maps, 0 = none")
    calibration_holdout: float = setting(0.2, "fraction of train/good held out (drawn with --seed) to set thresholds on good "
                                         "images only; 0 = none")  # fmt: skip
    target_fpr: float = setting(0.05, "false-alarm rate the thresholds aim at on good parts")

    @classmethod
    def from_options(cls, **given: object) -> PatchCoreConfig:
        """The config a command line asks for: a --preset's settings, and the options given beside it, which must agree."""
        preset = PRESETS.get(str(given.get("preset", "none")), {})
        clash = [f"--{k} {given[k]} (the preset has {v})" for k, v in preset.items() if k in given and given[k] != v]
        if clash:
            raise ValueError(f"--preset {given['preset']} sets these otherwise: {', '.join(clash)}; drop them, or drop --preset")
        return cls(**{**preset, **given})

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # a list when read back from JSON
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be paper or official, got {self.protocol!r}")
        official = self.protocol == "official"
        if self.coreset_ratio is None:
            object.__setattr__(self, "coreset_ratio", DEFAULT_CORESET_RATIO[self.protocol])
        if official:  # the released code's dimensions unless set
            for name in ("pretrain_dim", "target_dim"):
                object.__setattr__(self, name, 1024 if getattr(self, name) is None else getattr(self, name))
        problem = config_problem(self.to_dict())
        if problem:
            raise ValueError(problem)

    @property
    def backbones(self) -> tuple[str, ...]:
        """The networks: one, or an ensemble's members in order."""
        return tuple(name.strip() for name in self.backbone.split(","))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    def preprocess(self) -> Preprocess:
        """Images (and masks, as the protocol defines them) on the model's input grid."""
        return Preprocess(self.resize, self.image_size, self.protocol, self.crop, self.tile_size)


def patch_grid(features: list[torch.Tensor], protocol: str) -> tuple[int, int]:
    """(h, w) of the patch grid: the largest map's (28 x 28 for layer2 at 224 px); the released code takes the first layer's."""
    sizes = [tuple(int(v) for v in f.shape[-2:]) for f in features]
    return sizes[0] if protocol == "official" else max(sizes, key=lambda hw: hw[0] * hw[1])


class PatchFeatures(torch.nn.Module):
    """Locally aware patch features (Sec. 3.1): images [B, 3, H, W] -> ([B, N, C] patch features, their grid (h, w)); with
    tile_size, stitched from the image's tiles (method/tiles.py), whose cell of `cell` pixels the first tile run sets."""

    def __init__(self, backbone: Backbone, config: PatchCoreConfig) -> None:
        super().__init__()
        self.backbone, self.config, self.cell = backbone, config, 0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.config.tile_size:
            return stitched_patches(self.untiled, images, *self.tiling())
        return self.untiled(images)

    def untiled(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        features = self.backbone(images)
        return self.aggregate(features), patch_grid(features, self.config.protocol)

    def tiling(self) -> tuple[int, int, int, int]:
        """tiles.tile_patches' (tile, overlap, cell, group): TILE_GROUP crops per backbone run."""
        return self.config.tile_size, self.config.tile_overlap, self.cell, TILE_GROUP

    @torch.no_grad()
    def aggregate(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 1-2 on the used layers' maps: [B, N, C], N = H*W of the largest map.

        1. each layer: average over the p x p neighbourhood N_p of every position (p = patch_size,
           3 in the paper; stride 1; border positions average over their in-image neighbours only);
        2. deeper maps upsampled bilinearly to the largest map's grid (28x28 for 224 px);
        3. channels concatenated (512 + 1024 = 1536 for layer2 + layer3).
        """
        config = self.config
        if config.protocol == "official":  # the released code's features (official.py)
            return official_patches(features, config.patch_size, config.pretrain_dim, config.target_dim)
        grid, p = patch_grid(features, config.protocol), config.patch_size
        maps = []
        for f in features:
            f = F.avg_pool2d(f, kernel_size=p, stride=1, padding=p // 2, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            maps.append(f)
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)


class AnomalyScorer(torch.nn.Module):
    """Scoring (Sec. 3.3) as one module: forward(images [B, 3, H, W]) -> (image scores [B], anomaly maps [B, H, W]).

    It holds the patch features and a search over the memory bank (a buffer of the search): ExactSearch by
    default, or GraphSearch, the same search as one torch operation per block, with which the module exports as
    one graph (onnx_export.py), or FaissSearch.
    paper: L2 distances (Eq. 6), maps blurred with mirror padding; official: squared L2
    distances, as faiss returns them to the released code, blurred as scipy's default ('reflect').
    With num_nn = k > 1 a patch's score is the mean of its k nearest distances, in the image score
    and the map alike (the released code's --anomaly_scorer_num_nn).
    """

    def __init__(self, features: PatchFeatures, index: ExactSearch | GraphSearch | FaissSearch, config: PatchCoreConfig) -> None:
        super().__init__()
        self.features, self.index, self.config = features, index, config

    @property
    def memory_bank(self) -> torch.Tensor:
        return self.index.bank

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.tile_size:  # a tile at a time: no image's whole patch features held
            return score_by_tiles(self, images)
        patches, grid = self.features(images)
        return self.score(patches, grid, tuple(images.shape[-2:]))

    def patch_scores(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6 for patches [..., C]: each one's score (its k nearest distances' mean) [...] and nearest bank row [...]."""
        official = self.config.protocol == "official"
        distances, nearest = self.index(patches.reshape(-1, patches.shape[-1]), k=self.config.num_nn, squared=official)
        return distances.mean(dim=1).reshape(patches.shape[:-1]), nearest[:, 0].reshape(patches.shape[:-1])

    @torch.no_grad()
    def score(self, patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() from the patch features [B, N, C] of images of `size`."""
        patch_scores, nearest = self.patch_scores(patches)  # Eq. 6: distance to the nearest memory patch (k = 1)
        if self.config.reweight_b:
            s_star, worst = patch_scores.max(dim=1)
            rows = torch.arange(patches.shape[0], device=patches.device)
            scores = self.reweighted_scores(patches[rows, worst], s_star, nearest[rows, worst])
        else:
            scores = patch_scores.max(dim=1).values
        return scores, self.maps(patch_scores, grid, size)

    def maps(self, patch_scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """Anomaly maps [B, H, W]: the patch scores [B, N] on their grid, upsampled bilinearly to `size`, then blurred."""
        official = self.config.protocol == "official"
        maps = F.interpolate(patch_scores.reshape(patch_scores.shape[0], 1, *grid), size=size, mode="bilinear", align_corners=False)
        if self.config.blur_sigma > 0:
            maps = gaussian_blur(maps, self.config.blur_sigma, mode="reflect" if official else "mirror")
        return maps[:, 0]

    def reweighted_scores(self, m_test: torch.Tensor, s_star: torch.Tensor, nearest_star: torch.Tensor) -> torch.Tensor:
        """Eq. 7: s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*.

        m_test* [B, C] is the image's highest-scoring patch, s* [B] its score, m* its nearest memory patch (bank row
        nearest_star [B]) and N_b(m*) the b nearest memory patches of m* (m* itself among them).
        """
        m_star = self.memory_bank[nearest_star]  # [B, C]
        _, support = self.index(m_star, k=self.config.reweight_b)  # [B, b]
        d = torch.linalg.vector_norm(m_test[:, None, :] - self.memory_bank[support], dim=-1)  # [B, b]
        weight = 1 - torch.exp(s_star - torch.logsumexp(d, dim=1))
        return weight * s_star


class PatchCore:
    """The method, built from a PatchCoreConfig; `device`, `search` ('exact', ExactSearch, or 'faiss'; method/search.py)
    and `tf32` (a GPU's fp32 products in TF32, process-wide) only decide how it runs. PatchCore(weights="none", seed=3)
    is PatchCore(PatchCoreConfig(weights="none", seed=3)): fields given beside a config replace its values;
    protocol-dependent defaults (the coreset ratio) resolve when a config is built, not then."""

    def __init__(
        self, config: PatchCoreConfig | None = None, *, device: str = "auto", search: str = "exact", tf32: bool = False, **fields
    ) -> None:
        config = PatchCoreConfig(**fields) if config is None else dataclasses.replace(config, **fields)
        if len(config.backbones) > 1:
            raise ValueError(f"{config.backbone} is an ensemble: build it with ensemble.build_model(config)")
        self.device = resolve_device(device)
        # fp32 convolutions and products on a GPU: exact ('ieee') unless tf32 is asked for; a CPU has no TF32
        self.fp32_precision = set_cuda_fp32_precision(tf32) if self.device.type == "cuda" else "ieee"
        self.search = resolve_search(search, self.device)
        self.backbone = Backbone(config.backbone, config.layers, config.weights, config.seed, self.device, config.amp)
        self.config = dataclasses.replace(config, weights=self.backbone.weights_spec)  # 'auto' resolved: the bank records what was used
        self.amp, self.weights, self.backbone_sha256 = self.backbone.amp, self.backbone.weights, self.backbone.sha256
        self.features = PatchFeatures(self.backbone, self.config)

        side = self.config.tile_size or self.config.image_size  # tile_size: a tile's grid; the image's comes with the data
        probe = self.extract_features(torch.zeros(1, 3, side, side))
        if self.config.protocol == "official":
            self.backbone.official_batchnorm_update(self.config.image_size)
        self.grid = patch_grid(probe, self.config.protocol)
        self.patches_per_image, self.features.cell = self.grid[0] * self.grid[1], side // self.grid[0]
        self.feature_dim = self.aggregate_patches(probe).shape[-1]  # 1536 (paper), 1024 (official)
        self.scorer: AnomalyScorer | None = None  # built around the memory bank by set_memory_bank
        self.calibration = Calibration(reason="no memory bank yet")  # thresholds set on held-out good images (calibrate)
        self.train_facts: dict = {}  # what the bank was built from: counts, held-out images (fit, add, from_bank)
        self.held_out_outputs: tuple[np.ndarray, np.ndarray] | None = None  # fit(keep_held_out=True): (scores, maps)
        self.audit_scores: np.ndarray | None = None  # fit: every training image against the others (method/audit.py)
        self.bank_images: torch.Tensor | None = None  # fit: each bank row's training image
        self.bank_sha256: str | None = None  # the bank file's checksum, once saved or loaded (bank.py)

    # ------------------------------------------------------------------ patch features (Sec. 3.1)
    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw feature maps of the used layers, e.g. [B,512,28,28] and [B,1024,14,14] for 224 px."""
        return self.backbone(images)

    def aggregate_patches(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Locally aware patch features [B, N, C] (Eq. 1-2) from the maps extract_features gives."""
        return self.features.aggregate(features)

    # ------------------------------------------------------------------ the memory bank (Sec. 3.2)
    @torch.no_grad()
    def fit(self, dataloader, feature_memory_gb: float | None = None, keep_held_out: bool = False) -> dict:
        """Build the memory bank from the normal training images; returns counts. Pass 1 (_features_pass) keeps the
        projected features, and the full ones when they fit; the selected rows come from those, or from a second pass:
        the same bank either way. Every image is audited against the others' rows (method/audit.py); outlier_share
        drops the rows no other image vouches for. calibration_holdout > 0 holds a seeded part of the images out; their
        scores against the calibration bank set `self.calibration`. That bank is, under paper, the first picks of the
        saved bank's own Alg. 1 (held to the kept images until then), so the saved bank's scores are never higher;
        under official, a coreset of its own beside plain Alg. 1 over every image (docs/architecture.md, "Decisions").
        keep_held_out: keep the held-out images' (scores, maps) in `held_out_outputs` (an ensemble combines by them)."""
        n_images = len(dataloader.dataset)
        self.grid_of(dataloader)
        if n_images < (2 if self.config.outlier_share else 1):
            raise ValueError(f"fit() got {n_images} training images; --outlier_share compares each image with the others: it needs 2")
        per_image = self.patches_per_image
        self._check_bank_size(self.bank_size(n_images * per_image), n_patches=n_images * per_image)
        held_out = holdout_images(n_images, self.config.calibration_holdout, self.config.seed)
        nested = self.config.protocol == "paper"  # the calibration bank is the saved bank's first picks
        kept, calibration_size = None, 0
        if held_out:
            kept = image_rows(sorted(set(range(n_images)) - set(held_out)), per_image)
            calibration_size = self.bank_size(len(kept))
            self._check_bank_size(calibration_size)
        projected, chunks, path = self._features_pass(dataloader, n_images, feature_memory_gb)
        picked = self._coreset(projected, first_from=(kept, calibration_size) if held_out and nested else None)  # Alg. 1
        self.audit_scores, distances = audit_bank(projected, picked, per_image, n_images)  # every image against the others
        keep = kept_rows(distances, self.config.outlier_share)  # the robust bank's (all rows unless outlier_share)
        wanted, calibration_size = {"bank": picked[keep]}, int(keep[:calibration_size].sum())  # paper: still the first rows
        if held_out and not nested:  # Alg. 1 over the kept images alone, apart from the saved bank, filtered alike
            own = kept[self._coreset(projected[kept])]
            share = self.config.outlier_share
            wanted["calibration"] = own[kept_rows(leave_image_out(projected[own], own // per_image), share)] if share else own
        self.bank_images = wanted["bank"] // per_image  # each row's training image, for the audit's heatmaps
        del projected
        rows = gather_rows(full_patches(self.features, chunks, dataloader), wanted)
        bank, c = rows["bank"], self.config
        scorer = self.scorer_for(rows.pop("calibration", bank[:calibration_size])) if held_out else None
        self.calibration, self.held_out_outputs = calibrate_held_out(scorer, dataloader, held_out, c.calibration_holdout, c.target_fpr,
                                                                     note_on_fit(c.protocol == "paper", bool(c.reweight_b)), keep_held_out)
        del rows, scorer
        self.set_memory_bank(bank)
        facts = {"n_images": n_images, "n_patches": n_images * per_image, "memory_bank_size": len(bank)}
        if self.config.tile_size:  # the training images' working size (width, height): an exported graph's input
            facts["input_size"] = [self.grid[1] * self.features.cell, self.grid[0] * self.features.cell]
        if held_out:  # paper: the bank's first rows are the calibration bank; official: it is not saved
            facts["calibration_bank_size"] = calibration_size
        if self.config.outlier_share:  # the robust bank's cut, which --add holds new rows to
            facts["outlier_cut"] = float(distances[keep].max())
        self.train_facts = {**facts, "held_out": held_out}
        return {**self.train_facts, "fit": path}

    def _features_pass(self, dataloader, n_images: int, feature_memory_gb: float | None) -> tuple[torch.Tensor, list | None, str]:
        """Pass 1 over the images (coreset.projected_patches): every patch's projection, and the full features
        when they fit in `feature_memory_gb` (default: half the available RAM)."""
        budget = (default_feature_memory_gb() if feature_memory_gb is None else feature_memory_gb) * 2**30
        projection = self.coreset_projection(self.feature_dim)
        n_patches = n_images * self.patches_per_image
        return projected_patches(self.features, dataloader, n_patches, self.feature_dim, projection, self.grid, budget)

    @torch.no_grad()
    def add(self, dataloader, feature_memory_gb: float | None = None) -> dict:
        """Grow the memory bank with newly confirmed good images: Alg. 1 goes on with the bank as the already-selected
        set (each new patch starts at its distance to the nearest bank patch), and bank_size(new patches) greedy picks
        are added. The thresholds stay: no patch's distance can rise (thresholds.note_on_growth)."""
        if self.memory_bank is None:
            raise RuntimeError("no memory bank to grow: fit() or from_bank() first")
        n_images = len(dataloader.dataset)
        if n_images == 0:
            raise ValueError("add() got no images")
        self.grid_of(dataloader)
        projected, chunks, path = self._features_pass(dataloader, n_images, feature_memory_gb)
        projection = self.coreset_projection(self.feature_dim)
        existing = self.memory_bank.cpu() if projection is None else self.memory_bank.cpu() @ projection.cpu()
        picked = self._coreset(projected, existing=existing)
        if self.config.outlier_share:  # the robust bank: new rows held to fit's cut
            picked = picked[vouched(existing, projected[picked], picked // self.patches_per_image, self.train_facts["outlier_cut"])]
        del projected
        new_rows = gather_rows(full_patches(self.features, chunks, dataloader), {"new": picked})["new"]
        old = len(self.memory_bank)
        self.set_memory_bank(torch.cat([self.memory_bank.cpu(), new_rows]))
        facts = self.train_facts
        self.train_facts = {**facts, "n_images": facts.get("n_images", 0) + n_images, "memory_bank_size": len(self.memory_bank),
                            "n_patches": facts.get("n_patches", 0) + n_images * self.patches_per_image}  # fmt: skip
        if self.calibration.calibrated:
            self.calibration.note = note_on_growth(n_images, bool(self.config.reweight_b), self.config.protocol == "paper")
        return {"n_images": n_images, "n_patches": n_images * self.patches_per_image, "added": len(picked),
                "memory_bank_size": len(self.memory_bank), "previous_size": old, "fit": path}  # fmt: skip

    def grid_of(self, dataloader) -> None:
        """tile_size: the patch grid of the images' working size (one for all of a split: train.py checks it)."""
        if self.config.tile_size:
            height, width = dataloader.dataset[0][0].shape[-2:]
            self.grid = (height // self.features.cell, width // self.features.cell)
            self.patches_per_image = self.grid[0] * self.grid[1]

    def coreset_projection(self, in_dim: int) -> torch.Tensor | None:
        """The seeded Gaussian projection for coreset selection, or None (coreset_proj_dim 0 or >= in_dim)."""
        out_dim = self.config.coreset_proj_dim
        generator = torch.Generator().manual_seed(self.config.seed)
        return random_projection(in_dim, out_dim, generator).to(self.device) if 0 < out_dim < in_dim else None

    @torch.no_grad()
    def select_coreset(self, features: torch.Tensor) -> torch.Tensor:
        """k-center greedy coreset (Alg. 1) of [N, C] features: indices of floor(coreset_ratio * N) patches, at least 1,
        by distances on the seeded random projection to `coreset_proj_dim` dims (Johnson-Lindenstrauss, Sec. 3.2)."""
        x = features.to(self.device, torch.float32)
        projection = self.coreset_projection(x.shape[1])
        return self._coreset(x if projection is None else x @ projection)

    def _coreset(self, projected: torch.Tensor, existing: torch.Tensor | None = None, first_from=None) -> torch.Tensor:
        return greedy_coreset(projected, self.bank_size(len(projected)), self.config.seed, self.device, existing, first_from)

    def bank_size(self, n_patches: int) -> int:
        """floor(coreset_ratio * N), at least 1."""
        return max(1, int(n_patches * self.config.coreset_ratio))

    def _check_bank_size(self, bank_size: int, n_patches: int = 0) -> None:
        """Eq. 7 and the k-nearest mean need enough rows; fit's `n_patches` must fit in RAM (said before it starts)."""
        settings = self.config.to_dict()
        if problem := bank_size_problem(settings, bank_size) or (
                n_patches and fit_memory_problem(settings, n_patches, self.feature_dim, bank_size, available_memory_bytes())):
            raise ValueError(problem)

    def scorer_for(self, memory_bank: torch.Tensor) -> AnomalyScorer:
        """The scoring module over a memory bank, indexed for the search that runs."""
        self._check_bank_size(len(memory_bank))
        bank = memory_bank.to(self.device, torch.float32).contiguous()
        return AnomalyScorer(self.features, make_search(bank, self.search), self.config)

    def set_memory_bank(self, memory_bank: torch.Tensor) -> None:
        """Keep the memory bank inside the scoring module that predict() runs."""
        self.scorer = self.scorer_for(memory_bank)

    @property
    def memory_bank(self) -> torch.Tensor | None:
        """[M, C] coreset of training patch features, or None before fit/from_bank."""
        return None if self.scorer is None else self.scorer.memory_bank

    def search_name(self) -> str:
        """Which nearest-neighbour search runs, for the outputs."""
        return self.scorer.index.describe()

    # ------------------------------------------------------------------ scoring (Sec. 3.3)
    def nearest_neighbors(self, patches: torch.Tensor, k: int, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances [M, k] (squared ones if asked) and memory-bank indices [M, k] of each patch's k nearest memory patches."""
        if self.memory_bank is None:
            raise RuntimeError("no memory bank: call fit() or set_memory_bank() first")
        if not 1 <= k <= len(self.memory_bank):
            raise ValueError(f"k={k} nearest neighbours asked for, but the memory bank has {len(self.memory_bank)}")
        return self.scorer.index(patches.to(self.device), k, squared=squared)

    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and anomaly maps [B, H, W] at the input resolution (AnomalyScorer)."""
        if self.scorer is None:
            raise RuntimeError("no memory bank: call fit() or set_memory_bank() first")
        scores, maps = self.scorer(images)
        return scores.cpu().numpy(), maps.cpu().numpy()

    # ------------------------------------------------------------------ the bank file
    def provenance(self) -> dict:
        """What the bank records of the model that built it: the weights, their checksum, the feature width."""
        return {"weights": self.weights, "backbone_sha256": self.backbone_sha256, "feature_dim": self.feature_dim}

    def save(self, path: Path, **sections: object) -> None:
        """Write the memory bank with its config, calibration, train facts and the model's provenance (bank.py
        has the format); `sections` (the category; `train`, to store other train facts) are stored beside them."""
        if self.memory_bank is None:
            raise RuntimeError("no memory bank to save: call fit() first")
        header = {"config": self.config.to_dict(), "model": self.provenance(), "calibration": self.calibration.to_dict(),
                  "train": self.train_facts, **sections, "environment": environment()}  # fmt: skip
        self.bank_sha256 = save_bank(Path(path), self.memory_bank.cpu().numpy(), header)

    @classmethod
    def from_bank(cls, path: Path, *, device: str = "auto", weights: str | None = None, search: str = "exact",
                  tf32: bool = False) -> PatchCore:  # fmt: skip
        """The model a memory bank was built with, holding that bank, its calibration and train facts. `weights` only
        says where the same weights are now (a moved file); a bank whose weights or feature width differ is refused."""
        memory_bank, header = load_bank(Path(path))
        return cls.from_header(memory_bank, header, Path(path), device=device, weights=weights, search=search, tf32=tf32)

    @classmethod
    def from_header(cls, memory_bank: np.ndarray, header: dict, path: Path, *, weights: str | None = None, **runtime) -> PatchCore:
        """from_bank of a bank file already read (bank.load_bank); runtime: device, search, tf32."""
        if "members" in header:
            raise BankError(f"{path} holds an ensemble of {len(header['members'])} models: load it with ensemble.load_model")
        model = cls(config_from_header(header, path), **runtime, **({"weights": weights} if weights else {}))
        model.restore(memory_bank, header["model"], path)
        model.calibration, model.train_facts = Calibration.from_dict(header["calibration"]), header["train"]
        model.bank_sha256 = header["sha256"]
        return model

    def restore(self, memory_bank: np.ndarray, built: dict, path: Path) -> None:
        """Hold a saved memory bank; one whose backbone weights or feature width differ from this model's is refused."""
        if self.backbone_sha256 != built["backbone_sha256"]:
            raise BankError(f"{path} was built with backbone weights '{built['weights']}', but evaluation has '{self.weights}' "
                            "(their checksums differ): evaluate with the training weights, or retrain")  # fmt: skip
        if memory_bank.shape[1] != self.feature_dim:
            raise BankError(f"{path} holds {memory_bank.shape[1]}-d features, but {self.config.backbone} {list(self.config.layers)} "
                            f"makes {self.feature_dim}-d ones: rerun train.py with these settings")  # fmt: skip
        self.set_memory_bank(torch.from_numpy(memory_bank))


def config_from_header(header: dict, path: Path) -> PatchCoreConfig:
    """The config a bank's header stores, or a BankError that says what to do."""
    try:
        return PatchCoreConfig(**header["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise BankError(f"{path} holds a config this code cannot use ({err}); rerun train.py for this category") from err
