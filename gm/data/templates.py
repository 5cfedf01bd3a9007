"""Prompt templates for textual inversion: the concept's placeholder is formatted into `{}`.

The object and style lists are the small ImageNet-style lists of the textual inversion paper (as used by
diffusers' and kohya's training scripts); the face list is ours, written in the same spirit.
"""
import os

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

# A person is named, not counted: no article before the placeholder.
FACE_TEMPLATES = (
    "a photo of {}",
    "a close-up photo of {}'s face",
    "a portrait of {}",
    "a portrait photo of {}",
    "a headshot of {}",
    "a cropped photo of {}'s face",
    "a photo of the face of {}",
    "a bright photo of {}",
    "a dark photo of {}",
    "a good photo of {}",
    "a close-up portrait of {}",
    "a photo of {} looking at the camera",
    "a candid photo of {}",
    "a photo of {} smiling",
    "a side view photo of {}'s face",
)

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES, "face": FACE_TEMPLATES}


class TemplateError(ValueError):
    """A template file that cannot be used; the message names the file and line."""


def check_template(template, where="template"):
    """Raise TemplateError unless `template` has exactly one `{}` and formats cleanly."""
    if template.count("{}") != 1:
        raise TemplateError(f"{where}: {template!r} must contain exactly one '{{}}' for the placeholder token")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise TemplateError(
            f"{where}: {template!r} is not a valid template ({e}); write literal braces as '{{{{' '}}}}'") from e


def load_templates(path):
    """Templates from a text file, one per line (blank lines ignored), each with one `{}`."""
    if not os.path.isfile(path):
        raise TemplateError(f"template file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise TemplateError(f"template file {path} is not UTF-8 text: {e}") from e
    templates = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line:
            check_template(line, f"{path}, line {number}")
            templates.append(line)
    if not templates:
        raise TemplateError(f"template file {path} holds no templates (one per line, each containing '{{}}')")
    return templates


def get_templates(learnable_property="object"):
    """The built-in templates of `learnable_property` ("object", "style" or "face")."""
    if learnable_property not in TEMPLATES:
        raise ValueError(f"learnable_property must be one of {sorted(TEMPLATES)}, got {learnable_property!r}")
    return list(TEMPLATES[learnable_property])
