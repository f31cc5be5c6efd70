"""Noise schedules, losses (epsilon / v-prediction, Min-SNR-gamma) and samplers."""
