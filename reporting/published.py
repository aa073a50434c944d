"""What was published to compare with: the paper's MVTec AD table, the per-category results of the released
code's six sample runs (their settings are method/presets.py), PatchCore on VisA, and on MVTec AD 2.

Numbers only, each with its source; report.py sets them beside ours.
"""

from __future__ import annotations

from method.presets import RELEASED, RUNS

# The paper's MVTec AD table, as the design document lists it: {category: (image AUROC, pixel AUROC)}
MVTEC_PAPER = {
    "bottle": (1.000, 0.986), "cable": (0.995, 0.984), "capsule": (0.981, 0.988), "hazelnut": (1.000, 0.987),
    "metal_nut": (1.000, 0.984), "pill": (0.966, 0.974), "screw": (0.981, 0.994), "toothbrush": (1.000, 0.987),
    "transistor": (1.000, 0.963), "zipper": (0.994, 0.988), "carpet": (0.987, 0.990), "grid": (0.982, 0.987),
    "leather": (1.000, 0.993), "tile": (0.987, 0.956), "wood": (0.992, 0.950),
}  # fmt: skip
VISA_IM_IAD = {
    "candle": (0.986, 0.995), "capsules": (0.816, 0.995), "cashew": (0.973, 0.989), "chewinggum": (0.991, 0.991),
    "fryum": (0.962, 0.938), "macaroni1": (0.975, 0.998), "macaroni2": (0.781, 0.991), "pcb1": (0.985, 0.999),
    "pcb2": (0.973, 0.990), "pcb3": (0.979, 0.992), "pcb4": (0.996, 0.986), "pipe_fryum": (0.998, 0.991),
}  # fmt: skip

# PatchCore as a baseline in MVTec AD 2's paper: the mean over its 8 scenes on the two private test splits, which only the
# benchmark's server scores (percent; AU-PRO up to a false-positive rate of 0.05, and the segmentation F1)
MVTEC_AD2_PAPER = {"TEST_priv": {"au_pro_0.05": 28.8, "seg_f1": 3.7}, "TEST_priv,mix": {"au_pro_0.05": 26.0, "seg_f1": 3.4}}
MVTEC_AD2_SOURCE = ("Heckler-Kram et al., 'The MVTec AD 2 Dataset: Advanced Scenarios for Unsupervised Anomaly Detection', "
                    "arXiv 2503.21622 (2025): PatchCore's row, mean of the 8 scenes, on the private test splits")  # fmt: skip

# The means the comment above each run in sample_training.sh states: image AUROC, pixel AUROC, PRO. Those comments are
# not the runs' results.csv: the segmentation ensemble's repeats the IM320 ensemble's line, and the others differ in the
# last digit; results_means gives what the runs' results.csv (below) average to.
STATED_MEANS = {
    "official-im224": (0.992, 0.981, 0.944),
    "official-im224-ensemble": (0.993, 0.981, 0.942),
    "official-im320": (0.993, 0.978, 0.943),
    "official-im320-ensemble": (0.996, 0.982, 0.949),
    "official-im320-seg": (0.990, 0.984, 0.942),
    "official-im320-seg-ensemble": (0.996, 0.982, 0.949),
}

# Each run's models/<log group without its seed>/results.csv: instance_auroc, full_pixel_auroc, anomaly_pixel_auroc,
# anomaly_pro (rounded to 4 digits). Their full_pro column is anomaly_pro times the share of defective test images
# (good images count as PRO 0), so it is left out: no metric of ours, or of MVTec AD's protocol, is computed so.
_RESULTS = {
    "official-im224": """
        bottle     1.0000 0.9848 0.9796 0.9714
        cable      0.9968 0.9841 0.9753 0.9377
        capsule    0.9793 0.9895 0.9874 0.9708
        carpet     0.9860 0.9905 0.9879 0.9695
        grid       0.9791 0.9880 0.9837 0.9695
        hazelnut   1.0000 0.9868 0.9791 0.9289
        leather    1.0000 0.9929 0.9904 0.9918
        metal_nut  0.9990 0.9834 0.9792 0.9282
        pill       0.9667 0.9780 0.9760 0.9436
        screw      0.9877 0.9952 0.9938 0.9850
        tile       0.9949 0.9571 0.9408 0.8985
        toothbrush 1.0000 0.9857 0.9800 0.9477
        transistor 0.9987 0.9610 0.9274 0.8324
        wood       0.9912 0.9508 0.9374 0.9021
        zipper     0.9950 0.9887 0.9856 0.9777
    """,
    "official-im224-ensemble": """
        bottle     1.0000 0.9852 0.9801 0.9705
        cable      0.9985 0.9846 0.9758 0.9394
        capsule    0.9828 0.9907 0.9888 0.9738
        carpet     0.9888 0.9892 0.9861 0.9734
        grid       0.9825 0.9849 0.9794 0.9661
        hazelnut   1.0000 0.9871 0.9797 0.9214
        leather    1.0000 0.9918 0.9889 0.9904
        metal_nut  1.0000 0.9857 0.9822 0.9382
        pill       0.9774 0.9784 0.9766 0.9389
        screw      0.9887 0.9944 0.9928 0.9785
        tile       0.9892 0.9568 0.9399 0.8937
        toothbrush 1.0000 0.9867 0.9813 0.9453
        transistor 1.0000 0.9669 0.9372 0.8528
        wood       0.9947 0.9476 0.9336 0.8912
        zipper     0.9982 0.9890 0.9861 0.9761
    """,
    "official-im320": """
        bottle     0.9992 0.9857 0.9809 0.9654
        cable      0.9856 0.9754 0.9669 0.9192
        capsule    0.9801 0.9892 0.9872 0.9650
        carpet     0.9848 0.9910 0.9888 0.9812
        grid       0.9925 0.9927 0.9899 0.9788
        hazelnut   1.0000 0.9876 0.9807 0.9096
        leather    0.9997 0.9942 0.9922 0.9932
        metal_nut  0.9995 0.9827 0.9793 0.9419
        pill       0.9914 0.9703 0.9685 0.9571
        screw      0.9885 0.9960 0.9950 0.9867
        tile       0.9899 0.9649 0.9508 0.9092
        toothbrush 1.0000 0.9878 0.9829 0.9532
        transistor 0.9929 0.8990 0.8671 0.7712
        wood       0.9939 0.9600 0.9497 0.9323
        zipper     0.9974 0.9928 0.9910 0.9842
    """,
    "official-im320-ensemble": """
        bottle     1.0000 0.9868 0.9823 0.9701
        cable      0.9979 0.9811 0.9730 0.9323
        capsule    0.9868 0.9916 0.9899 0.9680
        carpet     0.9964 0.9912 0.9886 0.9820
        grid       0.9950 0.9911 0.9877 0.9774
        hazelnut   1.0000 0.9889 0.9826 0.9068
        leather    1.0000 0.9938 0.9916 0.9927
        metal_nut  1.0000 0.9878 0.9852 0.9571
        pill       0.9834 0.9765 0.9749 0.9563
        screw      0.9924 0.9964 0.9954 0.9883
        tile       0.9877 0.9676 0.9545 0.9157
        toothbrush 1.0000 0.9887 0.9841 0.9587
        transistor 0.9987 0.9414 0.9097 0.8201
        wood       0.9974 0.9596 0.9486 0.9299
        zipper     0.9968 0.9925 0.9905 0.9845
    """,
    "official-im320-seg": """
        bottle     1.0000 0.9867 0.9820 0.9640
        cable      0.9865 0.9845 0.9763 0.9299
        capsule    0.9821 0.9909 0.9890 0.9640
        carpet     0.9579 0.9865 0.9845 0.9620
        grid       0.9825 0.9807 0.9749 0.9499
        hazelnut   1.0000 0.9872 0.9798 0.8912
        leather    0.9966 0.9926 0.9900 0.9893
        metal_nut  1.0000 0.9913 0.9889 0.9503
        pill       0.9673 0.9886 0.9872 0.9646
        screw      0.9836 0.9947 0.9932 0.9830
        tile       0.9888 0.9698 0.9575 0.9027
        toothbrush 1.0000 0.9871 0.9819 0.9367
        transistor 1.0000 0.9659 0.9354 0.8596
        wood       0.9939 0.9506 0.9386 0.9034
        zipper     0.9989 0.9916 0.9893 0.9799
    """,
    "official-im320-seg-ensemble": """
        bottle     1.0000 0.9870 0.9825 0.9595
        cable      0.9916 0.9859 0.9779 0.9345
        capsule    0.9773 0.9907 0.9889 0.9569
        carpet     0.9763 0.9887 0.9861 0.9699
        grid       0.9841 0.9810 0.9755 0.9549
        hazelnut   1.0000 0.9880 0.9812 0.8801
        leather    1.0000 0.9920 0.9893 0.9889
        metal_nut  0.9995 0.9922 0.9900 0.9567
        pill       0.9634 0.9899 0.9884 0.9639
        screw      0.9883 0.9940 0.9922 0.9785
        tile       0.9877 0.9716 0.9595 0.9024
        toothbrush 0.9944 0.9876 0.9827 0.9257
        transistor 0.9992 0.9789 0.9521 0.8773
        wood       0.9956 0.9472 0.9340 0.8916
        zipper     0.9976 0.9908 0.9883 0.9759
    """,
}


def _table(text: str) -> dict[str, tuple[float, ...]]:
    rows = (line.split() for line in text.strip().splitlines())
    return {category: tuple(float(v) for v in values) for category, *values in rows}


RUN_RESULTS = {name: _table(text) for name, text in _RESULTS.items()}


def results_means(run: str) -> tuple[float, float, float]:
    """What a run's results.csv averages to over its categories: image AUROC (instance_auroc), pixel AUROC
    (full_pixel_auroc) and PRO (anomaly_pro), fractions. summary.md's published means are these."""
    rows = list(RUN_RESULTS[run].values())
    return tuple(sum(row[column] for row in rows) / len(rows) for column in (0, 1, 3))


def results_file(run: str) -> str:
    """Where a run's per-category figures come from."""
    return f"{RELEASED}, models/{RUNS[run][1].rsplit('_S', 1)[0]}/results.csv"


def published(protocol: str, category: str, preset: str = "none") -> dict | None:
    """The published figures a category is compared with, or None: {image_auroc, pixel_auroc, and for the released
    code's runs pixel_auroc_defective, aupro_defective; source: what they are}. A preset run is compared with that
    run's results; --protocol official without one with the IM224 baseline, which has its settings; the paper
    protocol with the paper's table; VisA with IM-IAD's runs of the released code."""
    if category in VISA_IM_IAD:
        image, pixel = VISA_IM_IAD[category]
        return {"image_auroc": image, "pixel_auroc": pixel, "source": "visa"}
    run = preset if preset != "none" else "official-im224" if protocol == "official" else None
    if run is None:
        if category not in MVTEC_PAPER:
            return None
        image, pixel = MVTEC_PAPER[category]
        return {"image_auroc": image, "pixel_auroc": pixel, "source": "mvtec paper"}
    if category not in RUN_RESULTS[run]:
        return None
    image, pixel, pixel_defective, pro_defective = RUN_RESULTS[run][category]
    return {"image_auroc": image, "pixel_auroc": pixel, "pixel_auroc_defective": pixel_defective,
            "aupro_defective": pro_defective, "source": run}  # fmt: skip


def source_text(key: str) -> str:
    """One line on where the published figures of a source key come from."""
    if key == "mvtec paper":
        return "MVTec AD: the paper's table as the design document lists it (Roth et al., CVPR 2022; 25 % coreset)"
    if key == "visa":
        return ("VisA: the IM-IAD benchmark (M-3LAB/IM-IAD README @ be00a93, 'vanilla setting on VisA'): the released code "
                "at resize 256 and crop 256, for both protocols (no published paper-protocol numbers per object; "
                "see docs/architecture.md)")  # fmt: skip
    image, pixel, pro = STATED_MEANS[key]
    mean_image, mean_pixel, mean_pro = results_means(key)
    return (f"MVTec AD: the released code's run {RUNS[key][1]} ({key}), {results_file(key)} (instance_auroc, full_pixel_auroc, "
            f"anomaly_pixel_auroc, anomaly_pro; their means over its {len(RUN_RESULTS[key])} categories: {mean_image:.2%} / "
            f"{mean_pixel:.2%} / PRO {mean_pro:.2%}; the comment in sample_training.sh states {image:.1%} / {pixel:.1%} / "
            f"PRO {pro:.1%}{', which repeats the IM320 ensemble line' if key == 'official-im320-seg-ensemble' else ''}). "
            "Their PRO code is unreleased; anomaly_pro is compared with our AUPRO@0.3 on the defective images only")  # fmt: skip
