"""The diffusion core: the guided sampler (`sampling`), step-level guidance (`guidance`), mode
discovery (`modes`) and VAE encoding of real data (`encode`). Imports nothing above the base
modules (docs/ARCHITECTURE.md)."""
