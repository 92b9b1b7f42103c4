"""Captions, tag shuffling and prompt templates.

Two template syntaxes exist in the wild and both are kept as their users know them:
kohya/diffusers `imagenet_*_templates_small` with `{}` for the token, and A1111 template files
with `[name]` for the token and `[filewords]` for the image's caption.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

from lib_ti.data.spec import DataError

# kohya sd-scripts train_textual_inversion.py == diffusers textual_inversion.py
IMAGENET_TEMPLATES_SMALL = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]
IMAGENET_STYLE_TEMPLATES_SMALL = [
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

# A1111 textual_inversion_templates/*.txt. subject.txt is the object list above with [name];
# style.txt pairs the style adjectives with ", art by [name]".
_SUBJECT = [t.replace("{}", "[name]") for t in IMAGENET_TEMPLATES_SMALL]
_STYLE_HEADS = [t.replace(" in the style of {}", "") for t in IMAGENET_STYLE_TEMPLATES_SMALL]
A1111_TEMPLATES: dict[str, list[str]] = {
    "subject": _SUBJECT,
    "subject_filewords": [t + ", [filewords]" for t in _SUBJECT],
    "style": [h + ", art by [name]" for h in _STYLE_HEADS],
    "style_filewords": [h + " of [filewords], art by [name]" for h in _STYLE_HEADS],
    "none": ["picture"],
}

MODES = ("auto", "caption", "object", "style", "template")


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def join_tags(tags: list[str], separator: str = ",") -> str:
    # kohya joins with ", "; for another separator we keep it (plus a space) so the text stays its own
    return (separator.strip() + " ").join(tags) if separator.strip() else " ".join(tags)


def process_caption(caption: str, shuffle: bool, keep_tokens: int, separator: str = ",",
                    rng: random.Random | None = None) -> str:
    """kohya: with shuffle, the first `keep_tokens` tags stay in front in order and the rest are
    shuffled. Without shuffle the caption is returned untouched."""
    if not shuffle:
        return caption
    tags = split_tags(caption, separator)
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    (rng or random).shuffle(flex)
    return join_tags(fixed + flex, separator)


def _wildcards(text: str, rng: random.Random) -> str:
    """kohya enable_wildcard: each `{a|b|c}` becomes one of its options; `{{` and `}}` are literal braces."""
    open_, close = "\x00", "\x01"
    text = text.replace("{{", open_).replace("}}", close)
    text = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(open_, "{").replace(close, "}")


def dropped(s, rng: random.Random, epoch: int | None = None) -> bool:
    """kohya caption dropout: this sample is shown with an empty caption (at `caption_dropout_rate`,
    or for every image in every `caption_dropout_every_n_epochs`-th epoch, counted from 1)."""
    by_rate = s.caption_dropout_rate > 0 and rng.random() < s.caption_dropout_rate
    n = s.caption_dropout_every_n_epochs
    return by_rate or (n > 0 and epoch is not None and epoch % n == 0)


def caption_text(caption: str, s, rng: random.Random | None = None, step: int | None = None,
                 max_steps: int | None = None, augment: bool = True) -> str:
    """A caption as kohya's dataset turns it into a prompt, for subset options `s`: one line (a random
    one with wildcards), `{a|b}` choices, caption_prefix/suffix, then the tags: kept ones in place
    (keep_tokens, or the parts before and after keep_tokens_separator), the rest cut by token warmup,
    shuffled and dropped at caption_tag_dropout_rate; secondary_separator becomes caption_separator.
    Without `augment` (the fixed validation prompt) nothing random happens. Dropout is `dropped`."""
    rng = rng or random.Random()
    lines = [ln.strip() for ln in caption.splitlines() if ln.strip()] or [""]
    if s.enable_wildcard:
        caption = _wildcards(rng.choice(lines) if augment else lines[0], rng if augment else random.Random(0))
    else:
        caption = lines[0]
    # kohya adds the prefix and suffix before anything else; with one line that is the same
    caption = " ".join(p for p in (s.caption_prefix, caption, s.caption_suffix) if p)
    sep, kts = s.caption_separator, s.keep_tokens_separator
    warmup = s.token_warmup_step
    if 0 < warmup < 1 and max_steps:
        warmup = math.floor(warmup * max_steps)
    work = augment and (s.shuffle_caption or s.caption_tag_dropout_rate > 0 or (warmup and step is not None))
    if work or (kts and kts in caption):
        tail: list[str] = []
        if kts and kts in caption:
            head, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, tail_part = flex_part.split(kts, 1)
                tail = split_tags(tail_part, sep)
            fixed, flex = split_tags(head, sep), split_tags(flex_part, sep)
        else:
            tags = split_tags(caption, sep)
            fixed, flex = tags[: s.keep_tokens], tags[s.keep_tokens:]
        if augment and warmup and step is not None and step < warmup:
            flex = flex[: math.floor(step * (len(flex) - s.token_warmup_min) / warmup) + s.token_warmup_min]
        if augment and s.shuffle_caption:
            rng.shuffle(flex)
        if augment and s.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= s.caption_tag_dropout_rate]
        caption = join_tags(fixed + flex + tail, sep)
    if s.secondary_separator:
        caption = caption.replace(s.secondary_separator, sep)
    return caption


def load_template_file(path: str | Path) -> list[str]:
    """A1111 syntax: one prompt per non-empty line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"cannot read template file '{path}': {e}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"template file '{path}' has no prompts")
    return lines


def load_template(name_or_path: str | Path) -> list[str]:
    """A built-in A1111 template by name (subject, subject_filewords, style, style_filewords,
    none; '.txt' optional) or a template file."""
    key = Path(str(name_or_path)).name.removesuffix(".txt")
    if key in A1111_TEMPLATES and not Path(name_or_path).is_file():
        return list(A1111_TEMPLATES[key])
    return load_template_file(name_or_path)


def _tidy(text: str) -> str:
    # an empty [filewords] leaves "a photo of tok, " behind; drop the dangling separators
    text = re.sub(r"\s*,\s*(?:,\s*)+", ", ", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def captions_missing_token(items: list, token: str) -> list[str]:
    """Paths of items whose caption (with its subset's prefix and suffix, any wildcard line) never
    names `token` (case-insensitive, whole word)."""
    return [it.path for it in items
            if not _has_word(" ".join((it.subset.caption_prefix, it.caption, it.subset.caption_suffix)), token)]


class PromptBuilder:
    """Turns an image into its training prompt.

    mode "auto": per image, "caption" where the image has a caption (caption file or class_tokens,
                 with prefix/suffix) or is a regularization image, else "object" (as A1111 trains
                 a bare folder with its template).
    mode "caption":  the processed caption as is (kohya default; the caption must name the token).
    mode "object"/"style": kohya --use_object/style_template: captions ignored, a random `{}` line.
    mode "template": A1111: a random line, `[name]` -> token, `[filewords]` -> processed caption.
    """

    def __init__(self, token: str, mode: str = "caption", templates: list[str] | None = None):
        if mode not in MODES:
            raise DataError(f"prompt mode '{mode}' is not one of {MODES}")
        self.token, self.mode = token, mode
        if mode in ("object", "auto"):
            templates = templates or IMAGENET_TEMPLATES_SMALL
        elif mode == "style":
            templates = templates or IMAGENET_STYLE_TEMPLATES_SMALL
        elif mode == "template":
            templates = templates or A1111_TEMPLATES["subject_filewords"]
            if not any("[name]" in t or "[filewords]" in t for t in templates):
                raise DataError("no template line contains [name] or [filewords], so the prompts could "
                                f"never contain '{token}'")
        self.templates = list(templates or [])

    @property
    def uses_captions(self) -> bool:
        """True when the token reaches a prompt only if the caption names it (for some images)."""
        return self.mode in ("caption", "auto") or (self.mode == "template"
                                                    and any("[name]" not in t for t in self.templates))

    def source(self, item) -> str:
        """The mode this image's prompts come from (differs from `mode` only in auto)."""
        if self.mode != "auto":
            return self.mode
        s = item.subset
        if s.is_reg:  # regularization prompts must not name the token: never the template
            return "caption"
        return "caption" if " ".join((s.caption_prefix, item.caption, s.caption_suffix)).strip() else "object"

    def captioned(self, items: list) -> list:
        """The items whose prompts name the token only if their caption does."""
        return [it for it in items if self.source(it) in ("caption", "template")] if self.uses_captions else []

    def _fill(self, template: str, caption: str, mode: str) -> str:
        if mode in ("object", "style"):
            return template.replace("{}", self.token)
        return _tidy(template.replace("[name]", self.token).replace("[filewords]", caption))

    def build(self, item, rng: random.Random | None = None, epoch: int | None = None, step: int | None = None,
              max_steps: int | None = None) -> str:
        """The prompt of one sample. `epoch` (from 1) and `step` drive kohya's per-epoch caption
        dropout and token warmup; without them those two are off."""
        rng = rng or random.Random()
        if dropped(item.subset, rng, epoch):  # kohya: also in template modes, the whole prompt
            return ""
        mode = self.source(item)
        if mode in ("object", "style"):
            return self._fill(rng.choice(self.templates), "", mode)
        caption = caption_text(item.caption, item.subset, rng, step, max_steps)
        if mode == "caption":
            return caption
        return self._fill(rng.choice(self.templates), caption, mode)

    def fixed(self, item) -> str:
        """Deterministic prompt for the validation batch: first template line, the caption's first
        line with prefix and suffix, unshuffled, nothing dropped."""
        mode = self.source(item)
        caption = caption_text(item.caption, item.subset, augment=False) if mode not in ("object", "style") else ""
        if mode == "caption":
            return caption
        return self._fill(self.templates[0], caption, mode)

    fixed_prompt = fixed
