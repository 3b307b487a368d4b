"""Caption text cleaning.

Two families of helpers live here:

1. The DeepFloyd/PixArt ``clean_caption`` preprocessing that the reference applies to every prompt before it
   reaches T5 (``text_preprocessing`` runs it twice, as the reference does). It targets web alt-text: URLs,
   HTML, @nicknames, CJK glyphs, product codes, file names, "free shipping" boilerplate and odd punctuation.
2. Curation-side helpers used when captions come from a VLM or from sidecar files (the reference's
   ``datautil``): dropping LLM lead-ins such as "The video shows", spotting empty captions and URLs.

The rules are plain regular expressions applied in a fixed order; the order matters (e.g. HTML is stripped
before punctuation is collapsed, and ``basic_clean`` runs in the middle so that unescaped entities are seen by
the later rules). ``ftfy`` and ``bs4`` are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import html
import math
import re
import unicodedata
import urllib.parse as ul

__all__ = [
    "LLM_CAPTION_PREFIXES",
    "basic_clean",
    "clean_caption",
    "has_url",
    "is_empty_caption",
    "remove_urls",
    "strip_llm_prefix",
    "text_preprocessing",
    "whitespace_clean",
]

# ---------------------------------------------------------------------------------------------------------------
# Shared patterns
# ---------------------------------------------------------------------------------------------------------------

# Top-level domains that make a bare "name.tld/path" token count as a URL (e.g. "shop.example.com/item").
_TLDS = "com|net|org|edu|gov|info|biz|io|ru"

# A URL: scheme or "www." prefix up to the next whitespace, or a bare domain with one of the TLDs above plus an
# optional path. The negative look-ahead/behind keep e-mail addresses and "file.com@..." out.
_URL_RE = re.compile(
    r"(?:\b(?:https?|ftp)://\S+)"
    r"|(?:\bwww\.\S+)"
    rf"|(?:(?<![@\w.-])[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.(?:{_TLDS})\b(?:/[^\s]*)?(?!@))",
    flags=re.IGNORECASE,
)

# CJK strokes, enclosed CJK letters, compatibility, extension A, Yijing hexagrams and unified ideographs:
# U+31C0..U+4DFF and U+4E00..U+9FFF are contiguous, so one class covers them.
_CJK_RE = re.compile(r"[\u31c0-\u9fff]+")

# Punctuation and symbols that never carry meaning in a prompt; each run becomes one space.
_BAD_PUNCT_RE = re.compile(r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+")

_IMAGE_FILE_EXTS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"


@functools.lru_cache(maxsize=1)
def _dash_re() -> re.Pattern[str]:
    """Every Unicode dash punctuation character (category Pd) in the BMP: hyphen, en/em dash, wave dash ..."""
    dashes = "".join(chr(c) for c in range(0x10000) if unicodedata.category(chr(c)) == "Pd")
    return re.compile("[" + re.escape(dashes) + "]")


# ---------------------------------------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------------------------------------


def whitespace_clean(text: str) -> str:
    """Collapse every whitespace run to one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def basic_clean(text: str) -> str:
    """Repair mojibake with ftfy and undo (double) HTML escaping, e.g. ``"&amp;amp;"`` -> ``"&"``."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def has_url(text: str) -> bool:
    """True when the text contains an http(s)/ftp URL, a ``www.`` address or a bare ``name.tld/path``."""
    return bool(_URL_RE.search(text))


def remove_urls(text: str) -> str:
    """Drop URLs (see :func:`has_url`) and collapse the whitespace they leave behind."""
    return whitespace_clean(_URL_RE.sub(" ", text))


# ---------------------------------------------------------------------------------------------------------------
# DeepFloyd / PixArt clean_caption
# ---------------------------------------------------------------------------------------------------------------


def clean_caption(caption: str) -> str:
    """Clean one web-style caption the way the DeepFloyd IF / PixArt T5 pipelines do.

    The result is lower-case, free of URLs, HTML, @handles, CJK glyphs, IP addresses, file names, product codes,
    image dimensions and shop boilerplate, with unified quotes/dashes and single spaces.
    """
    # 1. Undo URL-encoding ("a+cat%21" -> "a cat!"), lower-case.
    caption = ul.unquote_plus(str(caption)).strip().lower()
    caption = re.sub(r"<person>", "person", caption)

    # 2. URLs, then HTML tags (bs4 keeps only the text nodes).
    caption = _URL_RE.sub("", caption)
    from bs4 import BeautifulSoup

    caption = BeautifulSoup(caption, features="html.parser").text

    # 3. @nicknames and CJK glyphs.
    caption = re.sub(r"@[\w\d]+\b", "", caption)
    caption = _CJK_RE.sub("", caption)

    # 4. Unify dashes to "-", double quotes to '"', single quotes to "'".
    caption = _dash_re().sub("-", caption)
    caption = re.sub(r"[`´«»“”¨]", '"', caption)
    caption = re.sub(r"[‘’]", "'", caption)

    # 5. Leftover entities, IP addresses, trailing article timestamps ("1:23 "), literal "\n".
    caption = re.sub(r"&quot;?", "", caption)
    caption = re.sub(r"&amp", "", caption)
    caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)
    caption = re.sub(r"\d:\d\d\s+$", "", caption)
    caption = re.sub(r"\\n", " ", caption)

    # 6. Hash tags that are numbers ("#12", "#123456") and long bare numbers (ids, phone numbers).
    caption = re.sub(r"#\d{1,3}\b", "", caption)
    caption = re.sub(r"#\d{5,}\b", "", caption)
    caption = re.sub(r"\b\d{6,}\b", "", caption)

    # 7. File names ("img_001.jpg").
    caption = re.sub(rf"\S+\.(?:{_IMAGE_FILE_EXTS})", "", caption)

    # 8. Repeated quotes -> one, ellipses -> space, junk punctuation -> space, isolated dots -> space.
    caption = re.sub(r"[\"']{2,}", '"', caption)
    caption = re.sub(r"\.{2,}", " ", caption)
    caption = _BAD_PUNCT_RE.sub(" ", caption)
    caption = re.sub(r"\s+\.\s+", " ", caption)

    # 9. Slug-like captions ("a-red-car_on_road") become words when they hold more than three - or _.
    if len(re.findall(r"[-_]", caption)) > 3:
        caption = re.sub(r"[-_]", " ", caption)

    # 10. Mojibake and entities, after the structural clean-up so that decoded text is still filtered below.
    caption = basic_clean(caption)

    # 11. Product/model codes: "jc6640", "a5b", "4k8", "j2d1a2a".
    caption = re.sub(r"\b[a-z]{1,3}\d{3,15}\b", "", caption)
    caption = re.sub(r"\b[a-z]+\d+[a-z]+\b", "", caption)
    caption = re.sub(r"\b\d+[a-z]+\d+\b", "", caption)
    caption = re.sub(r"\b\d*[a-z]+\d+[a-z]+\d+[a-z\d]*\b", "", caption)

    # 12. Shop and stock-photo boilerplate.
    caption = re.sub(r"(?:worldwide\s+)?(?:free\s+)?shipping", "", caption)
    caption = re.sub(r"(?:free\s)?download(?:\sfree)?", "", caption)
    caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
    caption = re.sub(rf"\b(?:{_IMAGE_FILE_EXTS})(?:\simages?)?", "", caption)
    caption = re.sub(r"\bpage\s+\d+\b", "", caption)

    # 13. Dimensions ("1920x1080", "2.5×3", Cyrillic "х" included).
    caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)

    # 14. Spacing around ":" and after ",./", then single spaces.
    caption = re.sub(r"\b\s+:\s+", ": ", caption)
    caption = re.sub(r"(\D[,./])\b", r"\1 ", caption)
    caption = whitespace_clean(caption)

    # 15. Surrounding quotes and stray leading/trailing punctuation.
    caption = re.sub(r"^[\"']([\w\W]+)[\"']$", r"\1", caption)
    caption = re.sub(r"^['_,\-:;]", "", caption)
    caption = re.sub(r"['_,\-:+]$", "", caption)
    caption = re.sub(r"^\.", "", caption)
    return caption.strip()


def text_preprocessing(text: str, use_text_preprocessing: bool = True) -> str:
    """The reference's prompt preprocessing: ``clean_caption`` twice (the second pass catches what the first
    one exposed), or only lower-case + strip when cleaning is off."""
    if use_text_preprocessing:
        return clean_caption(clean_caption(text))
    return text.lower().strip()


# ---------------------------------------------------------------------------------------------------------------
# Curation helpers (datautil)
# ---------------------------------------------------------------------------------------------------------------

# Lead-ins that captioning LLMs put before the actual description. Matched case-insensitively at the start.
LLM_CAPTION_PREFIXES: tuple[str, ...] = (
    "The video shows",
    "The video captures",
    "The video features",
    "The video depicts",
    "The video presents",
    "The video portrays",
    "The video showcases",
    "The video is",
    "This video shows",
    "This video captures",
    "This video features",
    "This video depicts",
    "This video presents",
    "This video is",
    "In the video,",
    "In this video,",
    "The image shows",
    "The image captures",
    "The image features",
    "The image depicts",
    "The image presents",
    "The image portrays",
    "The image showcases",
    "The image is",
    "This image shows",
    "This image captures",
    "This image features",
    "This image depicts",
    "This image is",
    "In the image,",
    "In this image,",
)

_LLM_PREFIX_RE = re.compile(
    r"^\s*(?:"
    + "|".join(re.escape(p.rstrip(",")) for p in sorted(LLM_CAPTION_PREFIXES, key=len, reverse=True))
    + r")\b[\s,:;]*",
    flags=re.IGNORECASE,
)


def strip_llm_prefix(text: str) -> str:
    """Remove an LLM lead-in ("The video shows ...", "In the video, ...") and capitalise what remains.

    >>> strip_llm_prefix("The video shows a man riding a horse.")
    'A man riding a horse.'

    Text without such a prefix is returned unchanged (apart from surrounding whitespace).
    """
    text = text.strip()
    stripped = _LLM_PREFIX_RE.sub("", text, count=1)
    if stripped == text:
        return text
    if not stripped:
        return ""
    return stripped[0].upper() + stripped[1:]


def is_empty_caption(text: object) -> bool:
    """True for captions that carry no text: None, NaN (pandas' missing value), "" or only whitespace/punctuation."""
    if text is None:
        return True
    if isinstance(text, float) and math.isnan(text):
        return True
    return not any(ch.isalnum() for ch in str(text))
