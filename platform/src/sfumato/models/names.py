"""The registered denoisers' names and families, without torch: what the config validates
`train.model` against on any install (the constructors are sfumato.models.registry.MODELS, whose
keys must be exactly these; a test checks it)."""

UNET, TEXT_UNET, DIT = "unet", "unet-text", "dit"

MODEL_FAMILIES: dict[str, str] = {
    "unet-tiny": UNET,
    "unet-xs": UNET,
    "unet-s": UNET,
    "unet-b": UNET,
    "unet-l": UNET,
    "unet-text-tiny": TEXT_UNET,
    "unet-text-xs": TEXT_UNET,
    "unet-text-s": TEXT_UNET,
    "dit-tiny": DIT,
    "dit-s": DIT,
    "dit-b": DIT,
    "dit-l": DIT,
}

TEXT_MODELS = frozenset(name for name, family in MODEL_FAMILIES.items() if family == TEXT_UNET)

# Image sides must be multiples of this (in the denoiser's own pixels, latent or not): a UNet
# halves its grid at every level after the first (2^(levels-1)), a DiT cuts it into patches.
SIZE_DIVISOR_PX: dict[str, int] = {
    "unet-tiny": 2,
    "unet-xs": 4,
    "unet-s": 4,
    "unet-b": 8,
    "unet-l": 8,
    "unet-text-tiny": 2,
    "unet-text-xs": 4,
    "unet-text-s": 4,
    "dit-tiny": 4,
    "dit-s": 2,
    "dit-b": 2,
    "dit-l": 2,
}
