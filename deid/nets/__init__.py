"""The method's networks: the image encoders (E_id, E_attr, E_lnd), the latent mapper M and discriminator D_W,
the losses, the assembled `Disentangler` with its checkpoint format, and small presets for tests and benchmarks."""
