"""The benchmark engine behind `sdvae bench`."""
