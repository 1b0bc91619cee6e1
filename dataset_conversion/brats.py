"""BraTS releases (2020 to the 2024/2025 cluster) -> nnU-Net raw, and nnU-Net predictions -> the organisers' labels.

Every edition (a release, or a cohort of one) is one entry of :data:`EDITIONS`: its case and file naming, its
modalities, its label values, the label groups it is scored on, and how its labels are stored for nnU-Net. The
functions below read only that table.

**2020, 2021 and the 2023 cohorts** (GLI, SSA, PED, MEN, MET) follow nnU-Net's own BraTS 2021 converter
(``nnunetv2/dataset_conversion/Dataset137_BraTS21.py``):

* one nnU-Net case per BraTS case folder, the case identifier is the folder name;
* channels ``_0000`` T1, ``_0001`` T1ce (2023: t1c), ``_0002`` T2 (t2w), ``_0003`` FLAIR (t2f);
* labels remapped to consecutive values: edema (BraTS 2, 2023 "SNFH" 2) -> 1, necrosis / non-enhancing core
  (BraTS 1, 2023 "NETC" 1) -> 2, enhancing tumour (BraTS 4, 2023 "ET" 3) -> 3; the segmentation keeps the
  source file's pixel type and geometry (``np.zeros_like`` + ``CopyInformation``, exactly as Dataset137);
* images are copied byte for byte (``.nii.gz`` inputs); uncompressed ``.nii`` inputs (BraTS 2020) are gzip-
  compressed byte for byte, so the header and voxels are untouched (a ``.nii.gz`` file is a gzip'ed ``.nii``);
* dataset.json declares the three BraTS regions — whole tumour (1, 2, 3), tumour core (2, 3), enhancing (3) —
  with ``regions_class_order`` (1, 2, 3). The 2023 organisers' metrics code scores every 2023 cohort on these
  three groups (WT = 1 + 2 + 3, TC = 1 + 3, ET = 3 in its labels; github.com/rachitsaluja/BraTS-2023-Metrics,
  ``get_tissue_wise_mask``).

For BraTS 2021 the output is therefore voxel-identical to Dataset137's (the tests check it).

**The 2024/2025 cluster** (post-treatment GLI, PED, MET, MEN-RT, GoAT) is scored by the official evaluator
``brats-evaluation`` (0.0.10) on the label groups of its bundled configs (``brats_evaluation/configs/config_*.yaml``),
some of which overlap without nesting (post-treatment glioma: NETC, SNFH, ET, RC, TC = NETC + ET, WT = NETC + SNFH +
ET; the resection cavity RC is disjoint from the tumour). These editions keep the organisers' label values
(they are consecutive already) and dataset.json declares the evaluator's groups as nnU-Net regions, ordered by
:func:`region_layout` so that painting the regions in ``regions_class_order`` (nnU-Net's
``LabelManager.convert_probabilities_to_segmentation``) gives back every label: a prediction is already in the
organisers' labels. A single-label edition (MEN-RT: GTV) is a plain one-label dataset.

Robustness: every case is validated before it is written (all modalities and the label present and readable,
the same size/spacing/origin/direction everywhere, finite voxels, label values in the edition's set); a bad
case stops the run with an error naming the case and the file, or, with ``skip_bad``, is left out and listed
in ``conversion_report.json``. The dataset is assembled in a hidden temporary folder beside the target and
renamed into place at the end, so an interrupted run (Ctrl-C, SIGTERM, even SIGKILL) never leaves a half-
written ``DatasetNNN_*`` folder; a stale temporary folder of a killed run is removed by the next run.
The source folders are only ever read.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunet_diffusion.errors import NNDiffError

from .conventions import CHANNELS

REPORT_NAME = "conversion_report.json"


class BratsConversionError(NNDiffError):
    """The BraTS input (or the output location) cannot be converted as asked."""


class BratsCaseError(BratsConversionError):
    """One case (or one file of it) is bad: missing, unreadable, misaligned, non-finite or wrongly labelled."""

    def __init__(self, case: str, file: str | None, reason: str):
        self.case, self.file, self.reason = case, file, reason
        where = f"case {case}" + (f": file {file}" if file else "")
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable, so that worker processes can return it
        return (type(self), (self.case, self.file, self.reason))

    def as_dict(self) -> dict:
        return {"case": self.case, "file": self.file, "reason": self.reason}


# ----------------------------------------------------------------------------------------------------------
# Edition specs
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edition:
    """How one BraTS edition (a release, or one cohort of it) is shipped, labelled and scored.

    ``modalities`` are the file suffixes in nnU-Net's channel order (``channel_names``; four-channel editions:
    0 T1, 1 T1ce, 2 T2, 3 FLAIR). ``labels`` names the organisers' label values; ``label_to_nnunet`` maps them to
    the values written to labelsTr (2020–2023: nnU-Net's Dataset137 convention, edema 1, necrosis/NETC 2,
    enhancing 3; the 2024/2025 cluster: unchanged). ``groups`` are the label groups the edition is scored on,
    ``(key, name, organisers' labels)`` in the evaluator's order (``key``: the group's name in brats-evaluation's
    config ``evaluator_config``, or in the 2023 organisers' code); dataset.json declares them as nnU-Net regions
    (:func:`region_layout`). ``lesionwise_convention`` is the lesion-wise rule ``nndiff evaluate`` applies by
    default (:mod:`nnunet_diffusion.evaluation.lesionwise`). ``phantom_labels`` (tissue -> organisers' label) and
    ``case_format`` say how ``nndiff make-phantoms`` writes the edition; editions without them have no phantoms.
    """
    key: str
    title: str
    case_regex: str                  # a case folder's full name
    sep: str                         # between case name and suffix in file names
    modalities: tuple[str, ...]      # channel i <- suffix modalities[i]
    seg_suffix: str
    extensions: tuple[str, ...]      # accepted file endings, the edition's own first
    labels: dict                     # organisers' label value -> abbreviation (documentation, reports)
    label_to_nnunet: dict
    groups: tuple                    # ((key, name, (organisers' labels, ...)), ...)
    dataset_id: int
    dataset_name: str
    training_folder: str             # the folder names the organisers ship (documentation, phantoms)
    validation_folder: str
    example_case: str
    channel_names: tuple[str, ...] = CHANNELS
    evaluator_config: str | None = None    # brats-evaluation's bundled config with these groups
    lesionwise_convention: str = "brats2023"
    seg_aliases: dict = field(default_factory=dict)   # case -> label file name shipped under another name
    phantom_labels: dict = field(default_factory=dict)   # phantom tissue -> organisers' label value
    case_format: str = ""            # phantom case names: case_format.format(number)
    reference: str = ""
    notes: str = ""                  # what a user of the edition should know (written to conversion_report.json)

    @property
    def nnunet_to_label(self) -> dict:
        return {v: k for k, v in self.label_to_nnunet.items()}

    @property
    def label_values(self) -> tuple[int, ...]:
        return (0, *sorted(self.label_to_nnunet))

    @property
    def nnunet_label_values(self) -> tuple[int, ...]:
        """The values a labelsTr file (and a prediction) of this edition may hold."""
        return (0, *sorted(self.label_to_nnunet.values()))

    def matches(self, case: str) -> bool:
        return re.fullmatch(self.case_regex, case) is not None

    def file_name(self, case: str, suffix: str, ext: str | None = None) -> str:
        return f"{case}{self.sep}{suffix}{ext or self.extensions[0]}"

    def dataset_folder_name(self, dataset_id: int | None = None, name: str | None = None) -> str:
        return f"Dataset{int(self.dataset_id if dataset_id is None else dataset_id):03d}_{name or self.dataset_name}"

    def dataset_json(self) -> dict:
        """dataset.json's channel_names, labels (regions), regions_class_order and file_ending."""
        labels, order = region_layout(self)
        out = {"channel_names": {str(i): c for i, c in enumerate(self.channel_names)}, "labels": labels}
        if order is not None:
            out["regions_class_order"] = order
        out["file_ending"] = ".nii.gz"
        return out


# the 2023 organisers' label values and groups (all 2023 cohorts; get_tissue_wise_mask of BraTS-2023-Metrics)
LABELS_2023 = {1: "NETC", 2: "SNFH", 3: "ET"}
TO_NNUNET_2023 = {2: 1, 1: 2, 3: 3}
GROUPS_2023 = (("wt", "whole tumor", (1, 2, 3)), ("tc", "tumor core", (1, 3)), ("et", "enhancing tumor", (3,)))
MODALITIES_2023 = ("t1n", "t1c", "t2w", "t2f")
# names of the regions of the 2024/2025 groups (brats-evaluation's keys -> dataset.json names)
REGION_NAMES = {"wt": "whole tumor", "tc": "tumor core", "et": "enhancing tumor", "netc": "non-enhancing tumor core",
                "snfh": "surrounding non-enhancing FLAIR hyperintensity", "rc": "resection cavity",
                "cc": "cystic component", "ed": "edema", "gtv": "gross tumor volume"}
SYNAPSE_2023 = "https://www.synapse.org/#!Synapse:syn51156910/wiki/"


def _groups(*spec) -> tuple:
    """((key, REGION_NAMES[key], labels), ...) from (key, labels) pairs, in the evaluator config's order."""
    return tuple((k, REGION_NAMES[k], tuple(v)) for k, v in spec)


def _cohort_2023(cohort: str, dataset_id: int, train: str, val: str, evaluator_config: str | None = None,
                 notes: str = "") -> Edition:
    return Edition(
        key=f"2023-{cohort.lower()}", title=f"BraTS 2023 {cohort}", case_regex=rf"BraTS-{cohort}-\d{{5}}-\d{{3}}",
        sep="-", modalities=MODALITIES_2023, seg_suffix="seg", extensions=(".nii.gz", ".nii"), labels=LABELS_2023,
        label_to_nnunet=TO_NNUNET_2023, groups=GROUPS_2023, dataset_id=dataset_id,
        dataset_name=f"BraTS2023{cohort}", training_folder=train, validation_folder=val,
        example_case=f"BraTS-{cohort}-00000-000", evaluator_config=evaluator_config, reference=SYNAPSE_2023,
        notes=notes)


EDITIONS: dict[str, Edition] = {
    "2020": Edition(
        key="2020", title="BraTS 2020",
        case_regex=r"BraTS20_(Training|Validation|Testing)_\d{3}", sep="_",
        modalities=("t1", "t1ce", "t2", "flair"), seg_suffix="seg", extensions=(".nii", ".nii.gz"),
        labels={1: "NCR/NET", 2: "ED", 4: "ET"}, label_to_nnunet={2: 1, 1: 2, 4: 3},
        groups=(("wt", "whole tumor", (1, 2, 4)), ("tc", "tumor core", (1, 4)), ("et", "enhancing tumor", (4,))),
        dataset_id=500, dataset_name="BraTS2020",
        training_folder="MICCAI_BraTS2020_TrainingData", validation_folder="MICCAI_BraTS2020_ValidationData",
        example_case="BraTS20_Training_001",
        # the one known naming quirk of the 2020 training data: case 355's label has a different file name
        seg_aliases={"BraTS20_Training_355": "W39_1998.09.19_Segm.nii"},
        phantom_labels={"edema": 2, "necrosis": 1, "enhancing": 4},
        reference="https://www.med.upenn.edu/cbica/brats2020/data.html"),
    "2021": Edition(
        key="2021", title="BraTS 2021",
        case_regex=r"BraTS2021_\d{5}", sep="_",
        modalities=("t1", "t1ce", "t2", "flair"), seg_suffix="seg", extensions=(".nii.gz", ".nii"),
        labels={1: "NCR", 2: "ED", 4: "ET"}, label_to_nnunet={2: 1, 1: 2, 4: 3},
        groups=(("wt", "whole tumor", (1, 2, 4)), ("tc", "tumor core", (1, 4)), ("et", "enhancing tumor", (4,))),
        dataset_id=501, dataset_name="BraTS2021",
        training_folder="RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021",
        validation_folder="RSNA_ASNR_MICCAI_BraTS2021_ValidationData", example_case="BraTS2021_00000",
        phantom_labels={"edema": 2, "necrosis": 1, "enhancing": 4}, case_format="BraTS2021_{:05d}",
        reference="https://www.synapse.org/#!Synapse:syn25829067/wiki/610863"),
    "2023-gli": Edition(
        key="2023-gli", title="BraTS 2023 glioma (GLI)",
        case_regex=r"BraTS-GLI-\d{5}-\d{3}", sep="-",
        modalities=MODALITIES_2023, seg_suffix="seg", extensions=(".nii.gz", ".nii"),
        labels=LABELS_2023, label_to_nnunet=TO_NNUNET_2023, groups=GROUPS_2023, dataset_id=502,
        dataset_name="BraTS2023GLI",
        training_folder="ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData",
        validation_folder="ASNR-MICCAI-BraTS2023-GLI-Challenge-ValidationData", example_case="BraTS-GLI-00000-000",
        phantom_labels={"edema": 2, "necrosis": 1, "enhancing": 3}, case_format="BraTS-GLI-{:05d}-000",
        reference=SYNAPSE_2023),
    "2023-ssa": _cohort_2023(
        "SSA", 510, "ASNR-MICCAI-BraTS2023-SSA-Challenge-TrainingData_V2",
        "ASNR-MICCAI-BraTS2023-SSA-Challenge-ValidationData",
        notes="also the BraTS 2024 SSA challenge, which reused the 2023 training data (its validation folder: "
              "BraTS2024-SSA-Challenge-ValidationData); brats-evaluation has no SSA config"),
    "2023-ped": _cohort_2023(
        "PED", 511, "ASNR-MICCAI-BraTS2023-PED-Challenge-TrainingData",
        "ASNR-MICCAI-BraTS2023-PED-Challenge-ValidationData",
        notes="the 2023 labels; the 2024 PED release relabelled the cohort (--edition 2024-ped)"),
    "2023-men": _cohort_2023(
        "MEN", 512, "ASNR-MICCAI-BraTS2023-MEN-Challenge-TrainingData",
        "ASNR-MICCAI-BraTS2023-MEN-Challenge-ValidationData", evaluator_config="MenPre",
        notes="pre-operative meningioma; brats-evaluation's config_MenPre has the same three groups"),
    "2023-met": _cohort_2023(
        "MET", 513, "ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData",
        "ASNR-MICCAI-BraTS2023-MET-Challenge-ValidationData"),
    "2024-gli": Edition(
        key="2024-gli", title="BraTS 2024 post-treatment glioma (GLI)",
        case_regex=r"BraTS-GLI-\d{5}-\d{3}", sep="-", modalities=MODALITIES_2023, seg_suffix="seg",
        extensions=(".nii.gz", ".nii"), labels={1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
        label_to_nnunet={1: 1, 2: 2, 3: 3, 4: 4},
        groups=_groups(("snfh", (2,)), ("et", (3,)), ("netc", (1,)), ("rc", (4,)), ("tc", (1, 3)),
                       ("wt", (1, 2, 3))),
        dataset_id=514, dataset_name="BraTS2024GLI",
        training_folder="BraTS2024-BraTS-GLI-TrainingData/training_data1_v2",
        validation_folder="BraTS2024-BraTS-GLI-ValidationData/validation_data", example_case="BraTS-GLI-02000-100",
        evaluator_config="gli", lesionwise_convention="panoptica",
        phantom_labels={"edema": 2, "necrosis": 1, "enhancing": 3, "cavity": 4}, case_format="BraTS-GLI-{:05d}-100",
        notes="glioma data without a resection cavity convert too (their RC region is empty)"),
    "2024-ped": Edition(
        key="2024-ped", title="BraTS 2024 paediatric tumours (PED)",
        case_regex=r"BraTS-PED-\d{5}-\d{3}", sep="-", modalities=MODALITIES_2023, seg_suffix="seg",
        extensions=(".nii.gz", ".nii"), labels={1: "ET", 2: "NETC", 3: "CC", 4: "ED"},
        label_to_nnunet={1: 1, 2: 2, 3: 3, 4: 4},
        groups=_groups(("et", (1,)), ("netc", (2,)), ("cc", (3,)), ("ed", (4,)), ("tc", (1, 2, 3)),
                       ("wt", (1, 2, 3, 4))),
        dataset_id=515, dataset_name="BraTS2024PED",
        training_folder="BraTS2024-PED-Challenge-TrainingData/BraTS-PEDs2024_Training",
        validation_folder="BraTS2024-PED-Challenge-ValidationData", example_case="BraTS-PED-00001-000",
        evaluator_config="ped", lesionwise_convention="panoptica", reference="https://arxiv.org/abs/2404.15009",
        notes="label 2 is the non-enhancing tumour (NET in the organisers' description, netc in the evaluator's "
              "config)"),
    "2024-met": Edition(
        key="2024-met", title="BraTS 2024/2025 brain metastases (MET)",
        case_regex=r"BraTS-MET-\d{5}-\d{3}", sep="-", modalities=MODALITIES_2023, seg_suffix="seg",
        extensions=(".nii.gz", ".nii"), labels={1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
        label_to_nnunet={1: 1, 2: 2, 3: 3, 4: 4},
        groups=_groups(("et", (3,)), ("rc", (4,)), ("tc", (1, 3)), ("wt", (1, 2, 3))),
        dataset_id=516, dataset_name="BraTS2024MET",
        training_folder="MICCAI-LH-BraTS2025-MET-Challenge-Training",
        validation_folder="MICCAI-LH-BraTS2025-MET-Challenge-Validation", example_case="BraTS-MET-00001-000",
        evaluator_config="mets", lesionwise_convention="panoptica",
        notes="some 2025 cases ship without t2w: they are refused as any case with a missing modality "
              "(--skip-bad leaves them out)"),
    "2024-men-rt": Edition(
        key="2024-men-rt", title="BraTS 2024 meningioma radiotherapy (MEN-RT)",
        case_regex=r"BraTS-MEN-RT-\d{4}-\d+", sep="_", modalities=("t1c",), seg_suffix="gtv",
        extensions=(".nii.gz", ".nii"), labels={1: "GTV"}, label_to_nnunet={1: 1},
        groups=_groups(("gtv", (1,))), dataset_id=517, dataset_name="BraTS2024MENRT",
        training_folder="BraTS2024-MEN-RT-TrainingData/BraTS-MEN-RT-Train-v2",
        validation_folder="BraTS2024-MEN-RT-ValidationData/BraTS-MEN-RT-Val-v1",
        example_case="BraTS-MEN-RT-0000-1", channel_names=("T1ce",), evaluator_config="MenRT",
        lesionwise_convention="panoptica", reference="https://arxiv.org/abs/2405.18383",
        notes="one T1 post-contrast image per case in its native acquisition space (not skull-stripped, sizes "
              "and spacings differ between cases) and one label, the gross tumour volume"),
    "2024-goat": Edition(
        key="2024-goat", title="BraTS 2024 generalizability across tumours (GoAT)",
        case_regex=r"BraTS-GoAT-\d{5}", sep="-", modalities=MODALITIES_2023, seg_suffix="seg",
        extensions=(".nii.gz", ".nii"), labels={1: "NCR", 2: "ED", 3: "ET"}, label_to_nnunet={1: 1, 2: 2, 3: 3},
        groups=_groups(("et", (3,)), ("tc", (1, 3)), ("wt", (1, 2, 3))), dataset_id=518,
        dataset_name="BraTS2024GoAT", training_folder="MICCAI2024-BraTS-GoAT-TrainingData-With-GroundTruth",
        validation_folder="MICCAI2024-BraTS-GoAT-ValidationData", example_case="BraTS-GoAT-00000",
        evaluator_config="GoAT", lesionwise_convention="panoptica",
        notes="case names have no timepoint suffix; MICCAI2024-BraTS-GoAT-TrainingData-WithOut-GroundTruth "
              "goes to imagesTs"),
}
"""Every edition ``nndiff convert-brats`` reads. Sources of names and label values: the organisers' releases as
described on their Synapse pages and papers, and, for the groups, brats-evaluation 0.0.10's configs (2024/2025)
and the 2023 organisers' metrics code (2023); where descriptions disagree the evaluator's config wins."""

PHANTOM_EDITIONS = tuple(k for k, e in EDITIONS.items() if e.phantom_labels)
"""Editions ``nndiff make-phantoms`` writes (glioma layouts; 2024-gli with a resection cavity)."""


def region_layout(ed: Edition) -> tuple[dict, list[int] | None]:
    """(dataset.json ``labels``, ``regions_class_order``) of an edition: its groups as nnU-Net regions.

    nnU-Net trains one sigmoid output per region and turns a prediction back into labels by painting the regions
    in order, each with its ``regions_class_order`` value (``LabelManager.convert_probabilities_to_segmentation``;
    later regions overwrite earlier ones). The regions are ordered by size, largest first (a group before the
    groups inside it), and each region paints the one label for which it is the last region holding it. Painting
    a reference's regions then gives back every label: a label in no group, or two labels that no region tells
    apart, make the edition inexpressible (BratsConversionError). A region that is last for no label (e.g. whole
    tumour when every label has a region of its own) paints the smallest label it holds outside its multi-label
    sub-regions: what a voxel is when only that region is predicted. An edition whose groups are exactly its
    labels, one each (MEN-RT), is a plain label dataset: (labels, None).
    """
    to_nn = ed.label_to_nnunet
    names = [name for _, name, _ in ed.groups]
    sets = [frozenset(to_nn[v] for v in labels) for _, _, labels in ed.groups]
    values = set(to_nn.values())
    uncovered = sorted(values - set().union(*sets))
    if uncovered:
        raise BratsConversionError(f"{ed.title}: label(s) {', '.join(map(str, uncovered))} belong to no evaluation "
                                   "group; nnU-Net's region-based training could not predict them")
    if all(len(s) == 1 for s in sets) and sorted(next(iter(s)) for s in sets) == sorted(values):
        return {"background": 0, **{n: next(iter(s)) for n, s in zip(names, sets)}}, None
    order = sorted(range(len(sets)), key=lambda i: -len(sets[i]))
    last = {}
    for pos, i in enumerate(order):
        for v in sets[i]:
            last[v] = pos
    paint = []
    for pos, i in enumerate(order):
        owned = sorted(v for v, p in last.items() if p == pos)
        if len(owned) > 1:
            raise BratsConversionError(f"{ed.title}: no region tells labels {', '.join(map(str, owned))} apart "
                                       f"(the last region holding them is {names[i]!r}); nnU-Net's region-based "
                                       "training cannot express this edition")
        inner = set().union(*(s for s in sets if s < sets[i] and len(s) > 1))
        paint.append(owned[0] if owned else min(sets[i] - inner or sets[i]))
    labels = {"background": 0, **{names[i]: sorted(sets[i]) for i in order}}
    for v in values:   # the layout's promise, checked: painting a voxel of label v gives v
        painted = 0
        for pos, i in enumerate(order):
            if v in sets[i]:
                painted = paint[pos]
        assert painted == v, (ed.key, v, painted)
    return labels, paint


def get_edition(edition: str | Edition) -> Edition:
    if isinstance(edition, Edition):
        return edition
    key = str(edition).lower().replace("brats", "").strip("-_ ")
    if key in ("2023", "2023gli", "2023_gli"):
        key = "2023-gli"
    if key not in EDITIONS:
        raise BratsConversionError(f"unknown BraTS edition {edition!r}; known: {', '.join(EDITIONS)}")
    return EDITIONS[key]


# ----------------------------------------------------------------------------------------------------------
# Case discovery
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    folder: Path
    images: tuple[Path, ...]          # in nnU-Net channel order
    seg: Path | None                  # None: an unlabelled (validation/test) case -> imagesTs

    @property
    def split(self) -> str:
        return "Tr" if self.seg is not None else "Ts"


def _find_file(folder: Path, names: Iterable[str]) -> Path | None:
    for n in names:
        p = folder / n
        if p.is_file():
            return p
    return None


def discover_cases(input_dirs: Sequence[str | os.PathLike], edition: str | Edition
                   ) -> tuple[list[Case], list[BratsCaseError]]:
    """Find the cases in the organisers' folders (each input folder holds the case folders directly).

    A folder is a training folder if any of its cases has a label file; then every case of it must have one.
    A folder without any label file is a validation/test folder: its cases go to imagesTs. Files beside the
    case folders (BraTS 2020's name_mapping.csv, survival_info.csv) and hidden entries are ignored.
    Returns the good cases and the problems found (not raised here, so that ``skip_bad`` can list them).
    """
    ed = get_edition(edition)
    cases: list[Case] = []
    problems: list[BratsCaseError] = []
    seen: dict[str, Path] = {}
    for d in input_dirs:
        d = Path(d)
        if not d.is_dir():
            raise BratsConversionError(f"input folder {d} does not exist or is not a folder")
        entries = sorted(p for p in d.iterdir() if not p.name.startswith("."))
        found = []
        for p in entries:
            if not p.is_dir():
                continue
            if not ed.matches(p.name):
                problems.append(BratsCaseError(
                    p.name, None, f"unexpected folder name in {d}: a {ed.title} case folder is named like "
                                  f"{_example_case(ed)} (point INPUT_DIR at the folder that holds the case folders)"))
                continue
            if p.name in seen:
                problems.append(BratsCaseError(p.name, None, f"the case is in two input folders: {seen[p.name]} "
                                                             f"and {d}"))
                continue
            seen[p.name] = d
            found.append(p)
        if not entries or not any(p.is_dir() for p in entries):
            raise BratsConversionError(f"no {ed.title} case folders (named like {_example_case(ed)}) in {d}")

        segs = {}
        for p in found:
            names = [ed.file_name(p.name, ed.seg_suffix, e) for e in ed.extensions]
            if p.name in ed.seg_aliases:
                names.append(ed.seg_aliases[p.name])
            segs[p] = _find_file(p, names)
        labelled_folder = any(s is not None for s in segs.values())
        for p in found:
            missing = []
            images = []
            for ch, suffix in enumerate(ed.modalities):
                f = _find_file(p, [ed.file_name(p.name, suffix, e) for e in ed.extensions])
                if f is None:
                    missing.append(ed.file_name(p.name, suffix))
                images.append(f)
            if missing:
                problems.append(BratsCaseError(p.name, missing[0], f"missing modality file ({len(missing)} of "
                                                                   f"{len(ed.modalities)} missing: "
                                                                   f"{', '.join(missing)})"))
                continue
            if labelled_folder and segs[p] is None:
                problems.append(BratsCaseError(
                    p.name, ed.file_name(p.name, ed.seg_suffix),
                    f"missing label file: other cases in {d} have one (a folder is either labelled training "
                    "data or unlabelled validation/test data)"))
                continue
            cases.append(Case(p.name, p, tuple(images), segs[p]))
    return cases, problems


def _example_case(ed: Edition) -> str:
    return ed.example_case


# ----------------------------------------------------------------------------------------------------------
# Validation and per-case conversion (runs in worker processes)
# ----------------------------------------------------------------------------------------------------------
def _itk_error(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    detail = next((m.strip() for m in msg if "ERROR" in m.upper() or "could not" in m.lower()
                   or "unable" in m.lower()), msg[-1].strip() if msg else type(e).__name__)
    return detail[:200]


def _header(case: str, path: Path):
    """SimpleITK's view of a file's header (size, spacing, origin, direction) without reading the voxels."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as e:  # SimpleITK raises RuntimeError with a long ITK message
        raise BratsCaseError(case, path.name, f"cannot be read as an image ({_itk_error(e)})") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise BratsCaseError(case, path.name, f"expected a 3D single-channel image, found {reader.GetDimension()}D "
                                              f"with {reader.GetNumberOfComponents()} component(s)")
    return reader


def _read(case: str, path: Path):
    import SimpleITK as sitk
    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:
        raise BratsCaseError(case, path.name, f"cannot be read as an image ({_itk_error(e)})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise BratsCaseError(case, path.name, f"expected a 3D single-channel image, found {img.GetDimension()}D "
                                              f"with {img.GetNumberOfComponentsPerPixel()} component(s)")
    return img


def _check_data(case: str, path: Path, floating: bool) -> None:
    """Check that the file holds all the voxels its header promises, and, for floating-point data, that they are
    finite. SimpleITK (2.5) does neither: it reads a truncated file without complaint (the missing voxels become
    garbage) and turns NaN/Inf into 0, so the voxels nnU-Net would train on would not be what the file holds.
    Integer files: the gzip stream is decompressed once (CRC and length checked) or the file size compared;
    floating-point files: read with nibabel.
    """
    import nibabel
    try:
        nii = nibabel.load(str(path))
        hdr = nii.header
        needed = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
        if floating:
            data = np.asarray(nii.dataobj)
        elif path.name.endswith(".gz"):
            have = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    have += len(chunk)
            if have < needed:
                raise EOFError(f"{have} bytes of data where the header needs {needed}")
        elif path.stat().st_size < needed:
            raise EOFError(f"{path.stat().st_size} bytes where the header needs {needed}")
    except Exception as e:
        raise BratsCaseError(case, path.name, f"cannot be read completely: truncated or corrupt file "
                                              f"({type(e).__name__}: {str(e)[:160]})") from None
    if floating:
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(data)))
            raise BratsCaseError(case, path.name, f"{bad} non-finite voxel(s) ({n_nan} NaN, {bad - n_nan} Inf); "
                                                  "SimpleITK, and so nnU-Net, would silently read them as 0")


def _is_floating(reader) -> bool:
    import SimpleITK as sitk
    return reader.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) + ")"


def _check_same_geometry(case: str, ref_name: str, ref, file: str, img) -> None:
    checks = (("size", ref.GetSize(), img.GetSize(), None),
              ("spacing", ref.GetSpacing(), img.GetSpacing(), 1e-4),
              ("origin", ref.GetOrigin(), img.GetOrigin(), 1e-3),
              ("direction", ref.GetDirection(), img.GetDirection(), 1e-4))
    for what, a, b, tol in checks:
        same = tuple(a) == tuple(b) if tol is None else np.allclose(a, b, rtol=1e-5, atol=tol)
        if not same:
            raise BratsCaseError(case, file, f"{what} {_fmt(b)} differs from {ref_name} {_fmt(a)}")


def _unique(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind in "biu" and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < 1 << 16:
            counts = np.bincount((arr.ravel().astype(np.int64, copy=False) - lo))
            return np.nonzero(counts)[0] + lo
    return np.unique(arr)


def validate_case(case: Case, ed: Edition):
    """Check one case; returns the label image (SimpleITK, or None). Raises BratsCaseError.

    Checks: every file readable as a 3D scalar image and complete (not truncated); all modalities and the label
    on the same voxel grid (size, spacing, origin, direction); floating-point voxels finite (no NaN/Inf); label
    values within the edition's set.
    """
    import SimpleITK as sitk
    ref_name = ed.modalities[0]
    headers = [_header(case.name, p) for p in case.images]
    for path, h in zip(case.images[1:], headers[1:]):
        _check_same_geometry(case.name, ref_name, headers[0], path.name, h)
    seg_header = None
    if case.seg is not None:
        seg_header = _header(case.name, case.seg)
        _check_same_geometry(case.name, ref_name, headers[0], case.seg.name, seg_header)
    for path, h in zip(case.images, headers):
        _check_data(case.name, path, _is_floating(h))
    if case.seg is None:
        return None
    _check_data(case.name, case.seg, _is_floating(seg_header))
    seg = _read(case.name, case.seg)
    values = _unique(sitk.GetArrayViewFromImage(seg))
    unexpected = [v for v in values.tolist() if v not in ed.label_values]
    if unexpected:
        shown = ", ".join(f"{v:g}" for v in unexpected[:8])
        raise BratsCaseError(case.name, case.seg.name,
                             f"label value(s) {shown} outside the {ed.title} label set "
                             f"{{{', '.join(map(str, ed.label_values))}}}")
    return seg


def map_labels(arr: np.ndarray, mapping: dict) -> np.ndarray:
    """Relabel as nnU-Net's Dataset137 does: ``out = zeros_like(arr); out[arr == src] = dst`` for each pair.

    The pixel type of the input is kept (as ``copy_BraTS_segmentation_and_convert_labels_to_nnUNet`` does).
    """
    out = np.zeros_like(arr)
    for src, dst in mapping.items():
        out[arr == src] = dst
    return out


def _gzip_copy(src: Path, dst: Path) -> None:
    """Compress an uncompressed ``.nii`` byte for byte into ``.nii.gz`` (header and voxels untouched)."""
    with open(src, "rb") as fi, open(dst, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as fo:
        shutil.copyfileobj(fi, fo, 1 << 22)


def convert_case(case: Case, ed: Edition, out_root: Path) -> None:
    """Validate one case and write it into ``out_root`` (imagesTr+labelsTr, or imagesTs)."""
    import SimpleITK as sitk
    try:
        seg = validate_case(case, ed)
    except BratsCaseError:
        raise
    except Exception as e:  # anything unforeseen while *reading* the input is still the case's problem
        raise BratsCaseError(case.name, None, f"could not be validated: {type(e).__name__}: {e}") from None
    img_dir = out_root / f"images{case.split}"
    for ch, src in enumerate(case.images):
        dst = img_dir / f"{case.name}_{ch:04d}.nii.gz"
        if src.name.endswith(".gz"):
            shutil.copyfile(src, dst)
        else:
            _gzip_copy(src, dst)
    if seg is not None:
        arr = sitk.GetArrayFromImage(seg)
        out = sitk.GetImageFromArray(map_labels(arr, ed.label_to_nnunet))
        out.CopyInformation(seg)
        sitk.WriteImage(out, str(out_root / "labelsTr" / f"{case.name}.nii.gz"))


def _convert_case_task(task):
    case, ed, out_root = task
    try:
        convert_case(case, ed, out_root)
    except BratsCaseError as e:
        return case, e
    return case, None


# ----------------------------------------------------------------------------------------------------------
# Running many cases: process pool, progress bar, interruption safety
# ----------------------------------------------------------------------------------------------------------
def _worker_init(parent_pid: int):
    # Ctrl-C goes to the whole process group: only the parent handles it (and terminates the pool)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def exit_with_parent():  # a parent killed with SIGKILL cannot terminate its pool: don't linger as orphans
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)
    threading.Thread(target=exit_with_parent, daemon=True).start()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM (plain ``kill``) into KeyboardInterrupt so that clean-up code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_tasks(fn, tasks: list, num_processes: int, desc: str, progress: bool):
    """Yield fn(task) for every task (in completion order), in ``num_processes`` spawned workers (1: inline)."""
    from tqdm import tqdm
    bar = tqdm(total=len(tasks), desc=desc, unit="case", disable=not progress)
    try:
        if num_processes <= 1 or len(tasks) <= 1:
            for t in tasks:
                r = fn(t)
                bar.update()
                yield r
        else:
            import multiprocessing
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(num_processes, len(tasks)), initializer=_worker_init,
                          initargs=(os.getpid(),)) as pool:
                # leaving the with-block (normally, on error or on interrupt) terminates the workers
                for r in pool.imap_unordered(fn, tasks, chunksize=1):
                    bar.update()
                    yield r
    finally:
        bar.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove temporary folders of earlier runs for ``target`` whose process is gone (e.g. killed with -9)."""
    removed = []
    prefix = _partial_prefix(target)
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid) or pid == os.getpid():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_folder(target: Path, overwrite: bool):
    """Yield a hidden temporary folder beside ``target``; on success it replaces ``target``, else it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = target.parent / f"{_partial_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _sigterm_as_interrupt():
            yield tmp
            if target.exists():
                if not overwrite:
                    raise BratsConversionError(f"{target} appeared while converting; pass --overwrite to replace it")
                old = target.parent / f"{_partial_prefix(target)}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# Public API: BraTS -> nnU-Net raw
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ConversionResult:
    dataset_dir: Path
    num_training: int
    num_test: int
    skipped: list[dict]
    report: Path


def _raw_root(raw_root) -> Path:
    raw = raw_root or os.environ.get("nnUNet_raw")
    if not raw:
        raise BratsConversionError("set nnUNet_raw (nnU-Net's raw data folder) or pass --raw")
    return Path(raw)


def _check_target(raw: Path, target: Path, dataset_id: int, overwrite: bool, error: type) -> None:
    """Refuse (``error``) an existing ``target`` without ``overwrite``, or another dataset folder in ``raw`` with
    the same id (nnU-Net needs unique ids)."""
    if target.exists() and not overwrite:
        raise error(f"{target} already exists; pass --overwrite to replace it")
    if raw.is_dir():
        clash = [p.name for p in raw.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir() and p.name != target.name]
        if clash:
            raise error(f"{raw} already holds {', '.join(clash)} with dataset id {dataset_id}; "
                        "nnU-Net needs unique ids: choose another -d")


def convert_brats(input_dirs: str | os.PathLike | Sequence[str | os.PathLike], edition: str | Edition,
                  raw_root: str | os.PathLike | None = None, dataset_id: int | None = None,
                  name: str | None = None, num_processes: int = 1, skip_bad: bool = False,
                  overwrite: bool = False, progress: bool = True) -> ConversionResult:
    """Convert BraTS case folders into ``raw_root/DatasetNNN_Name`` (default raw_root: ``$nnUNet_raw``).

    ``input_dirs``: one or more folders as the organisers ship them (each holds the case folders), e.g. the
    training and the validation folder. Labelled cases go to imagesTr/labelsTr, unlabelled ones to imagesTs.
    Default dataset: the edition's (500 BraTS2020, 501 BraTS2021, 502 BraTS2023GLI, 510–513 the other 2023 cohorts,
    514–518 the 2024/2025 cluster: :data:`EDITIONS`). Raises BratsCaseError for the first bad
    case unless ``skip_bad`` (then bad cases are left out and listed in ``conversion_report.json``).
    """
    ed = get_edition(edition)
    if isinstance(input_dirs, (str, os.PathLike)):
        input_dirs = [input_dirs]
    input_dirs = [Path(d) for d in input_dirs]
    for d in input_dirs:
        if not d.is_dir():
            raise BratsConversionError(f"input folder {d} does not exist or is not a folder")
    dataset_id = ed.dataset_id if dataset_id is None else int(dataset_id)
    if not 1 <= dataset_id <= 999:
        raise BratsConversionError(f"dataset id must be in 1..999 (nnU-Net's DatasetNNN naming); got {dataset_id}")
    name = name or ed.dataset_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.\-_]*", name):
        raise BratsConversionError(f"dataset name {name!r}: use letters, digits, '.', '-' and '_' only")
    raw = _raw_root(raw_root)
    target = raw / ed.dataset_folder_name(dataset_id, name)
    for d in input_dirs:
        if raw.resolve().is_relative_to(Path(d).resolve()):
            raise BratsConversionError(f"the nnU-Net raw folder {raw} lies inside the BraTS source folder {d}; "
                                       "the source is never written to: choose another nnUNet_raw")
    _check_target(raw, target, dataset_id, overwrite, BratsConversionError)

    cases, problems = discover_cases(input_dirs, ed)
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise BratsCaseError(problems[0].case, problems[0].file, problems[0].reason + more +
                             "; --skip-bad converts the other cases")
    if not cases:
        raise BratsConversionError("no convertible case found" + (f" ({len(problems)} skipped)" if problems else ""))

    skipped = [p.as_dict() for p in problems]
    done: list[Case] = []
    with atomic_folder(target, overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        tasks = [(c, ed, tmp) for c in cases]
        # closing(): on an error the generator is closed at once, which terminates the worker pool
        # before atomic_folder removes the temporary folder the workers write into
        with contextlib.closing(_run_tasks(_convert_case_task, tasks, num_processes, f"convert {target.name}",
                                           progress)) as results:
            for case, err in results:
                if err is None:
                    done.append(case)
                    continue
                if not skip_bad:
                    raise BratsCaseError(err.case, err.file, err.reason + "; --skip-bad converts the other cases")
                skipped.append(err.as_dict())
                for f in (tmp / f"images{case.split}").glob(f"{case.name}_*.nii.gz"):
                    f.unlink()
        n_tr = sum(c.split == "Tr" for c in done)
        n_ts = len(done) - n_tr
        if not done:
            raise BratsConversionError(f"every case was bad ({len(skipped)}); nothing converted. First: "
                                       f"{skipped[0]}")
        dataset_json = dict(ed.dataset_json(), numTraining=n_tr,
                            name=name, description=f"{ed.title}, converted by nnunet_diffusion (nndiff convert-brats)",
                            reference=ed.reference, licence="see the BraTS data usage agreement",
                            brats_edition=ed.key)
        if ed.evaluator_config is not None:   # read by nndiff evaluate (nnunet_diffusion.evaluation.evaluate)
            dataset_json["brats_evaluator_config"] = ed.evaluator_config
        if ed.lesionwise_convention != "brats2023":
            dataset_json["brats_lesionwise_convention"] = ed.lesionwise_convention
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        report = {"edition": ed.key, "sources": [str(d.resolve()) for d in input_dirs],
                  "dataset": target.name, "num_training": n_tr, "num_test": n_ts,
                  "label_map_brats_to_nnunet": {str(k): v for k, v in ed.label_to_nnunet.items()},
                  "brats_labels": {name: value for value, name in ed.labels.items()},
                  **({"notes": ed.notes} if ed.notes else {}),
                  "skipped": sorted(skipped, key=lambda s: s["case"])}
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        if not n_ts:
            (tmp / "imagesTs").rmdir()
    return ConversionResult(target, n_tr, n_ts, report["skipped"], target / REPORT_NAME)


# ----------------------------------------------------------------------------------------------------------
# Public API: nnU-Net predictions -> BraTS labels
# ----------------------------------------------------------------------------------------------------------
def _back_convert_task(task):
    src, dst, ed = task
    import SimpleITK as sitk
    case = src.name[: -len(".nii.gz")]
    img = _read(case, src)
    _check_data(case, src, _is_floating(img))
    arr = sitk.GetArrayFromImage(img)
    values = _unique(arr).tolist()
    allowed = ed.nnunet_label_values
    unexpected = [v for v in values if v not in allowed]
    if unexpected:
        shown = ", ".join(map(str, allowed))
        return case, BratsCaseError(case, src.name, f"prediction value(s) {', '.join(f'{v:g}' for v in unexpected)}"
                                                    f" outside nnU-Net's BraTS labels {{{shown}}}")
    out = sitk.GetImageFromArray(map_labels(arr, ed.nnunet_to_label))
    out.CopyInformation(img)
    sitk.WriteImage(out, str(dst / src.name))
    return case, None


def _back_convert_task_safe(task):
    try:
        return _back_convert_task(task)
    except BratsCaseError as e:
        return e.case, e


def convert_predictions_to_brats(pred_dir: str | os.PathLike, out_dir: str | os.PathLike, edition: str | Edition,
                                 num_processes: int = 1, overwrite: bool = False, progress: bool = True) -> Path:
    """Turn nnU-Net predictions back into the edition's labels, for submission.

    2020–2023 (predictions in nnU-Net's 1 edema, 2 necrosis, 3 enhancing): BraTS 2020/2021 1 necrosis, 2 edema,
    4 enhancing (the inverse of Dataset137's map, ``convert_labels_back_to_BraTS``); the 2023 cohorts 1 NETC,
    2 SNFH, 3 ET. The 2024/2025 cluster: nnU-Net's painted regions are the organisers' labels already
    (:func:`region_layout`); the values are checked and written unchanged. A value outside the edition's labels
    stops the run naming the case and the file. Files keep the nnU-Net case name, which is the challenge's
    (``BraTS2021_00001.nii.gz``, ``BraTS-GLI-00001-000.nii.gz``, ``BraTS-MEN-RT-0001-1.nii.gz``); geometry and
    pixel type are the prediction's. Other files in ``pred_dir`` (nnU-Net's plans.json etc.) are ignored.
    """
    ed = get_edition(edition)
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise BratsConversionError(f"prediction folder {pred_dir} does not exist")
    files = sorted(p for p in pred_dir.iterdir() if p.is_file() and p.name.endswith(".nii.gz"))
    if not files:
        raise BratsConversionError(f"no .nii.gz predictions in {pred_dir}")
    for f in files:
        case = f.name[: -len(".nii.gz")]
        if not ed.matches(case):
            raise BratsCaseError(case, f.name, f"not a {ed.title} case name (expected names like "
                                               f"{_example_case(ed)}.nii.gz, as written by convert-brats)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BratsConversionError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    out_abs, pred_abs = out_dir.resolve(), pred_dir.resolve()
    if out_abs.is_relative_to(pred_abs) or pred_abs.is_relative_to(out_abs):
        raise BratsConversionError("the output folder must not contain, or lie inside, the prediction folder")
    with atomic_folder(out_dir, overwrite=True) as tmp:
        tasks = [(f, tmp, ed) for f in files]
        with contextlib.closing(_run_tasks(_back_convert_task_safe, tasks, num_processes, f"to {ed.title} labels",
                                           progress)) as results:
            for case, err in results:
                if err is not None:
                    raise err
    return out_dir
