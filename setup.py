"""nnunet_diffusion: diffusion heads for brain-tumour segmentation on nnU-Net v2's own pipeline.

Layout note: ``trainer_configs/`` and ``dataset_conversion/`` sit at the top of the repository, beside the
package (``package_dir`` below), and are installed as the sub-packages ``nnunet_diffusion.trainer_configs`` and
``nnunet_diffusion.dataset_conversion``. ``nnunet_diffusion/nnunet_ext/`` is deliberately *not* a
package: it is the folder nnU-Net's ``nnUNet_extTrainer`` points at (see documentation/getting_started.md, "Let nnU-Net find the trainers").
"""
from setuptools import setup

PACKAGES = [
    "nnunet_diffusion",
    "nnunet_diffusion.diffusion",
    "nnunet_diffusion.nets",
    "nnunet_diffusion.heads",
    "nnunet_diffusion.trainers",
    "nnunet_diffusion.inference",
    "nnunet_diffusion.evaluation",
    "nnunet_diffusion.grid",
    "nnunet_diffusion.trainer_configs",
    "nnunet_diffusion.dataset_conversion",
]

setup(
    name="nnunet_diffusion",
    version="0.1.0",
    description="Diffusion-model heads (NNDM, MedSegDiff, ReCoSeg, DDMD, MoDiff) as nnU-Net v2 trainers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={
        "nnunet_diffusion.trainer_configs": "trainer_configs",
        "nnunet_diffusion.dataset_conversion": "dataset_conversion",
    },
    package_data={
        "nnunet_diffusion": ["nnunet_ext/*.py"],
        "nnunet_diffusion.trainer_configs": ["*.toml"],
    },
    install_requires=[
        # the trainer API (hooks, checkpoint keys, nnUNet_extTrainer lookup) we build on is 2.8's
        "nnunetv2>=2.8.1,<2.9",
        # diffusion noise schedules (monai.networks.schedulers) and timestep embeddings
        "monai>=1.4,<1.7",
        "SimpleITK>=2.2.1",
        # the MNI152 template and tissue maps inside its wheel feed the BraTS-like phantom generator
        "nilearn>=0.10",
        "tqdm",
        "matplotlib",
        "numpy",
        # nndiff grid: (trainer, fold) jobs as SLURM arrays or local jobs, requeued with --c on timeout/preemption
        "submitit>=1.5.4,<2",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["nndiff = nnunet_diffusion.cli:main"]},
)
