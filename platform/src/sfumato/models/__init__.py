"""Named denoisers (UNet sizes, DiT) and loaders for pretrained parts."""
