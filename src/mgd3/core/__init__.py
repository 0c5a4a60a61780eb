"""The diffusion core: the guided sampler (`sampling`), step-level guidance (`guidance`), mode
discovery (`mode_discovery`) and VAE encoding of real data (`encode`). Imports nothing above the base
modules (docs/ARCHITECTURE.md)."""
