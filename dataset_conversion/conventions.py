"""Conventions shared by the BraTS converters and both data generators (phantoms, synthetic).

nnU-Net's BraTS layout as its own converter writes it (nnunetv2/dataset_conversion/Dataset137_BraTS21.py):
channels 0 T1, 1 T1ce, 2 T2, 3 FLAIR; labels 1 edema, 2 necrosis / non-enhancing core, 3 enhancing; the three
BraTS regions with regions_class_order (1, 2, 3).
"""

CHANNELS = ("T1", "T1ce", "T2", "FLAIR")

BRATS_REGIONS_DATASET_JSON = {
    "channel_names": {str(i): c for i, c in enumerate(CHANNELS)},
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3],
    "file_ending": ".nii.gz",
}

TISSUES = ("csf", "gm", "wm", "edema", "enhancing", "necrosis")
# relative intensities per contrast and tissue (literature direction only; absolute values are arbitrary):
# T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR as T2 with CSF suppressed; T1ce as T1 plus an enhancing tumour rim
TISSUE_INTENSITY = {
    "T1":    (0.30, 0.62, 0.86, 0.48, 0.55, 0.32),
    "T1ce":  (0.30, 0.64, 0.87, 0.50, 1.30, 0.32),
    "T2":    (1.00, 0.58, 0.42, 0.88, 0.68, 0.95),
    "FLAIR": (0.12, 0.62, 0.48, 1.00, 0.78, 0.42),
}
