"""Caption cleaning: concrete inputs and the outputs the DeepFloyd/PixArt rules and the curation helpers give."""

from __future__ import annotations

import pytest

from models.caption_clean import (
    basic_clean,
    clean_caption,
    has_url,
    is_empty_caption,
    remove_urls,
    strip_llm_prefix,
    text_preprocessing,
    whitespace_clean,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A Cat sitting on a Sofa", "a cat sitting on a sofa"),
        ("Check https://example.com/a?b=1 <b>Bold Dog</b> running", "check bold dog running"),
        ("visit shop.example.com/item now", "visit now"),
        ("see www.foo.org for more", "see for more"),
        ("photo by @john_doe of a beach 海滩 at dawn", "photo by of a beach at dawn"),
        ("“Quoted” ‘single’ — dash", "\"quoted\" 'single' - dash"),
        ("a+cat+playing%21", "a cat playing!"),
        ("IMG_0001.jpg a red car", "a red car"),
        ("a-red-car_on_the_road-at-night", "a red car on the road at night"),
        ("well-known dog", "well-known dog"),
        ("free shipping red shoes jc6640", "red shoes"),
        ("wallpaper 1920x1080 mountains", "wallpaper mountains"),
        ("page 3 of the catalogue", "of the catalogue"),
        ("sunset... over the sea", "sunset over the sea"),
        ("sofa (grey) [new] {sale} | best", "sofa grey new sale best"),
        ("server 192.168.0.1 room", "server room"),
        ('  "a lonely tree"  ', "a lonely tree"),
        ("item #12 and #123456 serial 1234567", "item and serial"),
        ("hello\\nworld", "hello world"),
        ("a dog , running : fast", "a dog , running: fast"),
        ("Download free 4K video h264", "4k video"),
        ("tom &amp; jerry", "tom jerry"),
        ("<person> walking a dog", "person walking a dog"),
        ("-a leading dash", "a leading dash"),
    ],
)
def test_clean_caption_examples(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_text_preprocessing_cleans_twice_or_only_lowercases() -> None:
    raw = "  The CAT <i>sleeps</i> https://x.com/y "
    assert text_preprocessing(raw) == clean_caption(clean_caption(raw)) == "the cat sleeps"
    assert text_preprocessing(raw, use_text_preprocessing=False) == "the cat <i>sleeps</i> https://x.com/y"
    # A second pass changes nothing on an already clean caption.
    assert text_preprocessing("a cat sleeps on a mat") == "a cat sleeps on a mat"


def test_basic_and_whitespace_clean() -> None:
    assert basic_clean("  caf&amp;eacute; au lait ") == "café au lait"
    assert basic_clean("Ã©lan vital") == "élan vital"  # mojibake repaired by ftfy
    assert whitespace_clean(" a \t b\n\nc  ") == "a b c"


@pytest.mark.parametrize(
    ("raw", "stripped"),
    [
        ("The video shows a man riding a horse.", "A man riding a horse."),
        ("The video depicts two dogs playing.", "Two dogs playing."),
        ("In the video, the camera pans left.", "The camera pans left."),
        ("This video features a busy street.", "A busy street."),
        ("The image shows a red car.", "A red car."),
        ("the IMAGE depicts: two cats", "Two cats"),
        ("The video is a timelapse of clouds.", "A timelapse of clouds."),
        ("  A cat sleeps.  ", "A cat sleeps."),
        ("The videographer walks away.", "The videographer walks away."),
        ("The video shows", ""),
    ],
)
def test_strip_llm_prefix(raw: str, stripped: str) -> None:
    assert strip_llm_prefix(raw) == stripped


@pytest.mark.parametrize(
    ("value", "empty"),
    [(None, True), (float("nan"), True), ("", True), ("   \n", True), ("...", True), ("a", False), ("猫", False)],
)
def test_is_empty_caption(value: object, empty: bool) -> None:
    assert is_empty_caption(value) is empty


def test_urls() -> None:
    assert has_url("watch https://youtu.be/abc now")
    assert has_url("www.example.org")
    assert has_url("see example.com/page")
    assert not has_url("a cat on a mat. it sleeps.")
    assert not has_url("write to me@example.com")
    assert remove_urls("see https://a.com/x and www.b.org/y or c.net today") == "see and or today"
