"""ddgm: diffusion-based deep generative models as hierarchical VAEs with a fixed Gaussian diffusion."""
