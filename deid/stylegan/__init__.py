"""The frozen StyleGAN2 generator: its architecture (config), the network and its ops, the file formats it is
read from (NVIDIA pickles, rosinality .pt, deid .safetensors) and the one loader."""
