"""The registered denoisers' names and families, without torch: what the config validates
`train.model` against on any install (the constructors are sfumato.models.registry.MODELS, whose
keys must be exactly these; a test checks it)."""

UNET, TEXT_UNET, DIT = "unet", "unet-text", "dit"

MODEL_FAMILIES: dict[str, str] = {
    "unet-tiny": UNET, "unet-xs": UNET, "unet-s": UNET, "unet-b": UNET, "unet-l": UNET,
    "unet-text-tiny": TEXT_UNET, "unet-text-s": TEXT_UNET,
    "dit-tiny": DIT, "dit-s": DIT, "dit-b": DIT, "dit-l": DIT,
}

TEXT_MODELS = frozenset(name for name, family in MODEL_FAMILIES.items() if family == TEXT_UNET)
