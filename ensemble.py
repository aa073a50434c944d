"""An ensemble of PatchCores, as the released code builds one for `-b A -b B -b C`: one model per network,
each with its own patch features, coreset and memory bank, and their scores combined.

How the members' scores are combined (docs/architecture.md, "Ensembles"):
- on a labelled test set under --protocol official, as the released code does: each member's image
  scores min-max normalised over the whole test set, and its maps with one min and max over all of
  them, then averaged (normalise_over_test_set). That needs every test image at once: it is
  transductive, and a single new image has no such set;
- everywhere else (the paper protocol, evaluate.py --images, calibration): each member's image score
  divided by its own calibrated image threshold, its map by its pixel threshold, then averaged
  (combine). Those thresholds come from the held-out good images, so one image gets one score; the
  ensemble's own thresholds are then calibrated on the same held-out images' combined scores.

build_model and load_model give a PatchCore or a PatchCoreEnsemble, whichever the config or bank holds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from method.thresholds import Calibration, calibrate, note_on_growth
from patchcore import PatchCore, PatchCoreConfig, config_from_header
from plumbing.bank import BankError, environment, load_bank, save_bank


def member_configs(config: PatchCoreConfig) -> list[PatchCoreConfig]:
    """An ensemble's members: each one network with its own layers (their index prefix dropped) and weights (one of
    a comma list, or the one for all), every other setting shared."""
    if len(config.backbones) == 1:
        return [config]
    layers = [layer.split(".", 1) for layer in config.layers]
    weights = [part.strip() for part in config.weights.split(",")]  # each part stripped, as config.backbones does
    weights = weights if len(weights) > 1 else weights * len(config.backbones)
    return [
        dataclasses.replace(
            config, preset="none", backbone=name, weights=weights[i], layers=tuple(rest for index, rest in layers if int(index) == i)
        )
        for i, name in enumerate(config.backbones)
    ]


def normalise_over_test_set(scores: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The released code's ensemble: scores [M, N] and maps [M, N, H, W] of M members over a whole test set ->
    (scores [N], maps [N, H, W]): each member min-max normalised over the test set (its maps by one min and max
    over all of them), then the members' mean. A member whose values are all equal (a one-image test set) gives 0
    where the released code divides by zero (docs/architecture.md)."""

    def min_max(values: np.ndarray) -> np.ndarray:  # each member's values to [0, 1] by its own min and max
        flat = values.reshape(len(values), -1)
        low, span = flat.min(axis=1), flat.max(axis=1) - flat.min(axis=1)
        shape = (-1,) + (1,) * (values.ndim - 1)
        return (values - low.reshape(shape)) / np.where(span > 0, span, 1.0).reshape(shape)

    return min_max(scores).mean(axis=0), min_max(maps).mean(axis=0)


class PatchCoreEnsemble:
    """PatchCore with several networks: the members are PatchCores of member_configs(config), sharing every setting
    but the network, its layers and its weights. fit, add, predict, save and from_bank work as PatchCore's."""

    def __init__(self, config: PatchCoreConfig, *, device: str = "auto", search: str = "exact", tf32: bool = False) -> None:
        self.members = [PatchCore(member, device=device, search=search, tf32=tf32) for member in member_configs(config)]
        specs = [m.config.weights for m in self.members]  # 'auto' resolved, per member
        self.config = dataclasses.replace(config, weights=specs[0] if len(set(specs)) == 1 else ",".join(specs))
        first = self.members[0]
        self.device, self.amp, self.fp32_precision = first.device, first.amp, first.fp32_precision
        self.weights = "; ".join(f"{m.config.backbone}: {m.weights}" for m in self.members)
        self.calibration = Calibration(reason="no memory bank yet")
        self.train_facts: dict = {}
        self.bank_sha256: str | None = None  # the bank file's checksum, once saved or loaded (bank.py)

    @property
    def memory_bank(self) -> list[torch.Tensor] | None:
        """The members' memory banks, or None before fit/from_bank."""
        banks = [m.memory_bank for m in self.members]
        return None if any(b is None for b in banks) else banks

    @property
    def audit_scores(self) -> np.ndarray:
        """The training-set audit (method/audit.py) over the networks: each member's scores over their median, averaged."""
        return np.mean([m.audit_scores / max(float(np.median(m.audit_scores)), 1e-12) for m in self.members], axis=0)

    def search_name(self) -> str:
        return self.members[0].search_name()

    # ------------------------------------------------------------------ fit and grow
    @torch.no_grad()
    def fit(self, dataloader, feature_memory_gb: float | None = None) -> dict:
        """Each member fits (its own coreset, bank and thresholds); then the ensemble's thresholds are set on the
        held-out images' combined scores, from what each member's fit scored against its calibration bank."""
        facts = [m.fit(dataloader, feature_memory_gb, keep_held_out=True) for m in self.members]
        self.train_facts = {k: v for k, v in facts[0].items() if k not in ("fit", "memory_bank_size", "calibration_bank_size")}
        self.train_facts["memory_bank_sizes"] = [f["memory_bank_size"] for f in facts]
        self.calibration = self._calibrate(dataloader.batch_size or 1)
        return {**self.train_facts, "fit": facts[0]["fit"]}

    def _calibrate(self, batch: int) -> Calibration:
        """calibrate() on the members' held-out scores and maps combined, `batch` images at a time; each member's
        are released after."""
        outputs = [m.held_out_outputs for m in self.members]
        for m in self.members:
            m.held_out_outputs = None
        if not all(m.calibration.calibrated for m in self.members):
            return Calibration(reason=self.members[0].calibration.reason)
        summary = []
        for lo in range(0, len(outputs[0][0]), batch):
            part = slice(lo, lo + batch)
            scores, maps = self.combine(np.stack([s[part] for s, _ in outputs]), np.stack([m[part] for _, m in outputs]))
            summary.append((scores, maps.reshape(len(maps), -1).max(1), maps.min()))
        scores, peaks, lows = zip(*summary)
        calibration = calibrate(np.concatenate(scores), np.concatenate(peaks), min(lows), self.config.target_fpr)
        calibration.note = self.members[0].calibration.note
        return calibration

    @torch.no_grad()
    def add(self, dataloader, feature_memory_gb: float | None = None) -> dict:
        """Every member grows its bank (PatchCore.add); the thresholds stay, as the members' do."""
        facts = [m.add(dataloader, feature_memory_gb) for m in self.members]
        if self.calibration.calibrated:
            self.calibration.note = note_on_growth(facts[0]["n_images"], bool(self.config.reweight_b), self.config.protocol == "paper")
        counts = {k: self.members[0].train_facts[k] for k in ("n_images", "n_patches")}
        self.train_facts = {**self.train_facts, **counts, "memory_bank_sizes": [f["memory_bank_size"] for f in facts]}
        return {**facts[0], "added": [f["added"] for f in facts], "memory_bank_size": self.train_facts["memory_bank_sizes"],
                "previous_size": [f["previous_size"] for f in facts]}  # fmt: skip

    # ------------------------------------------------------------------ scoring
    def predict_members(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Every member's image scores [M, B] and anomaly maps [M, B, H, W]."""
        outputs = [m.predict(images) for m in self.members]
        return np.stack([s for s, _ in outputs]), np.stack([m for _, m in outputs])

    def combine(self, scores: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Members' scores [M, B] and maps [M, B, H, W] -> the ensemble's [B], [B, H, W]: each divided by the
        member's calibrated image or pixel threshold, then averaged (1.0: at a typical member's threshold)."""
        if not all(m.calibration.calibrated for m in self.members):
            raise ValueError(
                "this ensemble has no thresholds from held-out good images to combine its members by (trained with "
                "--calibration_holdout 0, or with too few images): retrain with calibration to score single images"
            )
        image = np.array([m.calibration.image_threshold for m in self.members]).reshape(-1, 1)
        pixel = np.array([m.calibration.pixel_threshold for m in self.members]).reshape(-1, 1, 1, 1)
        return (scores / image).mean(axis=0), (maps / pixel).mean(axis=0)

    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and anomaly maps [B, H, W] of the ensemble for a batch of images [B, 3, H, W]: each image's
        from its own members' outputs alone (combine), so that a score does not depend on the rest of the batch."""
        return self.combine(*self.predict_members(images))

    # ------------------------------------------------------------------ the bank file
    def save(self, path: Path, **sections: object) -> None:
        """One bank file holding every member's memory bank (bank.py), with one checksum over all of them."""
        if self.memory_bank is None:
            raise RuntimeError("no memory bank to save: call fit() first")
        members = [{"model": m.provenance(), "calibration": m.calibration.to_dict(), "train": m.train_facts} for m in self.members]
        header = {"config": self.config.to_dict(), "members": members, "calibration": self.calibration.to_dict(),
                  "train": self.train_facts, **sections, "environment": environment()}  # fmt: skip
        self.bank_sha256 = save_bank(Path(path), [bank.cpu().numpy() for bank in self.memory_bank], header)

    @classmethod
    def from_header(cls, banks: list[np.ndarray], header: dict, path: Path, *, weights: str | None = None, **runtime) -> PatchCoreEnsemble:
        """The ensemble a bank file holds (bank.load_bank read it); runtime: device, search, tf32."""
        config = config_from_header(header, path)
        if weights:
            config = dataclasses.replace(config, weights=weights)
        model = cls(config, **runtime)
        if len(banks) != len(model.members) or len(header["members"]) != len(model.members):
            raise BankError(f"{path} holds {len(banks)} memory banks, but its config {len(model.members)} networks; rerun train.py")
        for member, bank, saved in zip(model.members, banks, header["members"]):
            member.restore(bank, saved["model"], path)
            member.calibration, member.train_facts = Calibration.from_dict(saved["calibration"]), saved["train"]
        model.calibration, model.train_facts = Calibration.from_dict(header["calibration"]), header["train"]
        model.bank_sha256 = header["sha256"]
        return model


def build_model(config: PatchCoreConfig, **runtime) -> PatchCore | PatchCoreEnsemble:
    """The model a config describes: a PatchCore, or an ensemble for several networks. runtime: device, search, tf32."""
    return PatchCoreEnsemble(config, **runtime) if len(config.backbones) > 1 else PatchCore(config, **runtime)


def load_model(path: Path, **runtime) -> PatchCore | PatchCoreEnsemble:
    """The model a bank file holds, rebuilt from its config (PatchCore.from_bank, or an ensemble's members).
    runtime: device, search, tf32, and weights (where the same weights are now; comma list for an ensemble)."""
    banks, header = load_bank(Path(path))
    model_type = PatchCoreEnsemble if "members" in header else PatchCore
    return model_type.from_header(banks, header, Path(path), **runtime)
