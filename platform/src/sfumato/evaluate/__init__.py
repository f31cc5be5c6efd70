"""Evaluation: FID / FD-CLIP, CLIPScore, sample grids, reports, dataset and model cards."""
