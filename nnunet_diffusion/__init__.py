"""nnunet_diffusion: diffusion-model heads for brain-tumour segmentation as nnU-Net v2 trainers."""
__version__ = "0.1.0"
