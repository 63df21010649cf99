"""Reading the world, changing nothing: kernels and their exports, module files,
dkms.conf sources, kmodd's settings, DKMS's own tree."""
