"""StyleGAN2 as GAN-DL uses it: `layers` (equalized-lr dense/conv, modulated
conv, FIR resampling, minibatch stddev), `networks` (mapping, synthesis, G,
D, `build`), `losses` (logistic loss, R1, path length, EMA)."""
