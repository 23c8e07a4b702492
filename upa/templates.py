"""Prompt templates per dataset.

``SINGLE_TEMPLATES`` contains the one template per dataset that CoOp's zero-shot CLIP uses
(``CUSTOM_TEMPLATES`` in KaiyangZhou/CoOp ``trainers/zsclip.py``); UPL and Tip-Adapter use the
same strings. ``ENSEMBLE_TEMPLATES`` maps every dataset to the seven ImageNet templates that
Tip-Adapter ensembles (CoOp calls the same list ``IMAGENET_TEMPLATES_SELECT``). The study uses
that one ensemble for all datasets so that an ensemble result never depends on a per-dataset
prompt search; a dataset gets its own entry only where the seven templates cannot apply.

Each template contains one ``{}`` that receives a class name with underscores already replaced
by spaces.
"""

from __future__ import annotations

# The seven templates, in Tip-Adapter's order.
TIP_ADAPTER_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

_IMAGENET_TEMPLATE = "a photo of a {}."

SINGLE_TEMPLATES: dict[str, str] = {
    "ImageNet": _IMAGENET_TEMPLATE,
    "Caltech101": "a photo of a {}.",
    "OxfordPets": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of a {}.",
    "Flowers102": "a photo of a {}, a type of flower.",
    "Food101": "a photo of {}, a type of food.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "SUN397": "a photo of a {}.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNetV2": _IMAGENET_TEMPLATE,
    "ImageNetSketch": _IMAGENET_TEMPLATE,
    "ImageNetA": _IMAGENET_TEMPLATE,
    "ImageNetR": _IMAGENET_TEMPLATE,
    # Class names of Digits are the numerals "0".."9", as in CLIP's own MNIST prompts
    # (openai/CLIP data/prompts.md), so the prompt reads "a photo of the digit 7.".
    "Digits": "a photo of the digit {}.",
    "DigitsShifted": "a photo of the digit {}.",
    "Folder": "a photo of a {}.",
}

# NOTE: no dataset has its own ensemble yet, so Digits also gets the ImageNet seven
# ("itap of a 7."). A digit-specific set would be a study choice to report, not a default.
ENSEMBLE_TEMPLATES: dict[str, tuple[str, ...]] = {
    name: TIP_ADAPTER_IMAGENET_TEMPLATES for name in SINGLE_TEMPLATES
}
