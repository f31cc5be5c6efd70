"""The blind A/B test page (app); its votes and the DPO pairs they become live in sfumato.data (votes, pairs)."""
