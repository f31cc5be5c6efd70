"""Blind A/B tests of two models (app), their votes (votes) and the DPO pairs they become (pairs)."""
