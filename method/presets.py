"""The published runs of the authors' released code as presets: each run's settings as its command line in
sample_training.sh has them. PatchCoreConfig.from_options turns a preset into the settings of its run;
reporting/published.py holds what those runs scored.
"""

from __future__ import annotations

RELEASED = "amazon-science/patchcore-inspection @ fcaa92f"

# The ensembles of sample_training.sh: -b wideresnet101 -b resnext101 -b densenet201 with layers 2 and 3 of each
ENSEMBLE = {"backbone": "wide_resnet101_2,resnext101_32x8d,densenet201",
            "layers": ("0.layer2", "0.layer3", "1.layer2", "1.layer3", "2.features.denseblock2", "2.features.denseblock3")}  # fmt: skip
WR50 = {"backbone": "wide_resnet50_2", "layers": ("layer2", "layer3")}
IM224 = {"protocol": "official", "resize": 256, "image_size": 224, "pretrain_dim": 1024}
IM320 = {"protocol": "official", "resize": 366, "image_size": 320, "pretrain_dim": 1024}

# name: (settings, their --log_group)
RUNS = {
    "official-im224": ({**IM224, **WR50, "coreset_ratio": 0.1, "target_dim": 1024, "patch_size": 3, "num_nn": 1, "seed": 0},
                       "IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1_S0"),
    "official-im224-ensemble": ({**IM224, **ENSEMBLE, "coreset_ratio": 0.01, "target_dim": 384, "patch_size": 3, "num_nn": 1, "seed": 3},
                                "IM224_Ensemble_L2-3_P001_D1024-384_PS-3_AN-1_S3"),
    "official-im320": ({**IM320, **WR50, "coreset_ratio": 0.01, "target_dim": 1024, "patch_size": 3, "num_nn": 1, "seed": 22},
                       "IM320_WR50_L2-3_P001_D1024-1024_PS-3_AN-1_S22"),
    "official-im320-ensemble": ({**IM320, **ENSEMBLE, "coreset_ratio": 0.01, "target_dim": 384, "patch_size": 3, "num_nn": 1, "seed": 40},
                                "IM320_Ensemble_L2-3_P001_D1024-384_PS-3_AN-1_S40"),
    # their command line says --seed 22, the comment above it and the log group 39: the command is what ran
    "official-im320-seg": ({**IM320, **WR50, "coreset_ratio": 0.01, "target_dim": 1024, "patch_size": 5, "num_nn": 3, "seed": 22},
                           "IM320_WR50_L2-3_P001_D1024-1024_PS-5_AN-3_S39"),
    "official-im320-seg-ensemble": ({**IM320, **ENSEMBLE, "coreset_ratio": 0.01, "target_dim": 384, "patch_size": 5, "num_nn": 5,
                                     "seed": 88}, "IM320_Ensemble_L2-3_P001_D1024-384_PS-5_AN-5_S88"),
}  # fmt: skip
PRESETS = {name: {"preset": name, **settings} for name, (settings, _) in RUNS.items()}

