"""The registered denoisers' names and families, without torch: what the config validates
`train.model` against on any install (the constructors are sfumato.models.registry.MODELS, whose
keys must be exactly these; a test checks it)."""

UNET, TEXT_UNET, DIT, TEXT_DIT, MMDIT = "unet", "unet-text", "dit", "dit-text", "mmdit"

MODEL_FAMILIES: dict[str, str] = {
    "unet-tiny": UNET,
    "unet-xs": UNET,
    "unet-s": UNET,
    "unet-b": UNET,
    "unet-l": UNET,
    "unet-text-tiny": TEXT_UNET,
    "unet-text-xs": TEXT_UNET,
    "unet-text-s": TEXT_UNET,
    **{f"dit-{size}": DIT for size in ("tiny", "xs", "s", "b", "l", "xl")},
    **{f"dit-text-{size}": TEXT_DIT for size in ("tiny", "xs", "s", "b", "l", "xl")},
    **{f"mmdit-{size}": MMDIT for size in ("tiny", "xs", "s", "b", "l", "xl")},
}

TEXT_MODELS = frozenset(name for name, family in MODEL_FAMILIES.items() if family in (TEXT_UNET, TEXT_DIT, MMDIT))
TRANSFORMERS = frozenset(name for name, family in MODEL_FAMILIES.items() if family in (DIT, TEXT_DIT, MMDIT))

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
    **{name: 2 for name in TRANSFORMERS},  # every sfumato DiT has 2 px patches
}
