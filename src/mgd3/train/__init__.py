"""Training models for mgd3: `pretrain` (a VAE and a latent DiT or UNet), `finetune` (MinMax),
`quality` (class fidelity, CAS) and `convert` (CompVis LDM checkpoints)."""
