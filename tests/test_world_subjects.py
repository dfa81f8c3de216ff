"""The world's family of subjects (world/subjects.py): enough subjects across the classes and patterns, colours
the world never uses, photo and held-out contexts kept apart, the fixed tuning / test split, and patterns that
survive drawing at the world's 32 px."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from peftbooth.world import scenes
from peftbooth.world.subjects import (
    MIN_DISTANCE,
    PALETTE,
    PATTERN_COLOURS,
    PATTERNS,
    Subject,
    family,
    is_test_subject,
    split,
    write_photos,
)


def distance(a, b) -> float:
    return float(np.linalg.norm(np.array(a, float) - np.array(b, float)))


def test_the_family_covers_every_class_and_pattern():
    subjects = family()
    assert len(subjects) >= 12 and len({s.name for s in subjects}) == len(subjects)
    assert {(s.cls, s.pattern) for s in subjects} == set(itertools.product(scenes.CLASSES, PATTERNS))
    assert all(len(s.colours) == PATTERN_COLOURS[s.pattern] for s in subjects)


def test_todays_subject_is_the_first_member():
    ball = family()[0]
    assert (ball.cls, ball.pattern, ball.colours) == (scenes.SUBJECT_CLASS, "halves", scenes.SUBJECT_COLOURS)
    assert ball.held_out_contexts == scenes.HELD_OUT_CONTEXTS
    rng = random.Random(3)
    for context in scenes.CONTEXTS:  # drawn exactly as the world has always drawn its subject
        scene = ball.scene(rng, context)
        assert np.array_equal(np.asarray(ball.draw(scene)), np.asarray(scenes.draw(scene)))


def test_colours_are_outside_the_world_and_apart_from_each_other():
    world = list(scenes.COLOURS.values()) + [c for pair in scenes.BACKGROUNDS.values() for c in pair]
    assert min(distance(c, w) for c in PALETTE.values() for w in world) >= MIN_DISTANCE
    for s in family():
        assert all(distance(a, b) >= MIN_DISTANCE for a, b in itertools.combinations(s.colours, 2)), s.name


def test_held_out_contexts_are_never_in_the_photos_and_rotate():
    subjects = family()
    for s in subjects:
        assert not set(s.photo_contexts) & set(s.held_out_contexts)
        assert set(s.photo_contexts) | set(s.held_out_contexts) == set(scenes.CONTEXTS)
    assert len({s.held_out_contexts for s in subjects}) >= 5


def test_the_split_is_fixed_balanced_and_keeps_the_tuned_ball_out_of_the_test_subjects():
    tuning, test = split()
    assert len(tuning) == len(test) == 6 and not {s.name for s in tuning} & {s.name for s in test}
    for half in (tuning, test):
        assert {s.cls for s in half} == set(scenes.CLASSES) and {s.pattern for s in half} == set(PATTERNS)
    assert family()[0] in tuning
    # the rule depends on nothing but the subject: the same answer however the family is built
    assert [is_test_subject(s) for s in family()] == [is_test_subject(s) for s in family()]


@pytest.mark.parametrize("subject", family(), ids=lambda s: s.name)
def test_every_colour_of_the_pattern_shows_at_32_px(subject: Subject):
    """Inside the object (where the loss mask is fully on), each of the subject's colours is the nearest colour
    of some pixels: the pattern is not lost to the box filter."""
    rng = random.Random(0)
    for context in subject.photo_contexts:
        scene = subject.scene(rng, context)
        pixels = np.asarray(subject.draw(scene), float)[np.asarray(scenes.subject_mask(scene)) == 255]
        palette = np.array(subject.colours, float)
        nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        assert set(nearest.tolist()) == set(range(len(palette))), (subject.name, context)


def test_photos_have_captions_and_masks(tmp_path):
    subject = split()[1][0]
    paths = write_photos(subject, tmp_path)
    assert len(paths) == len(scenes.SUBJECT_PHOTO_CONTEXTS)
    for path in paths:
        caption = path.with_suffix(".txt").read_text().strip()
        assert caption.startswith(f"a photo of a {scenes.IDENTIFIER} {subject.cls} ")
        assert caption.removeprefix(f"a photo of a {scenes.IDENTIFIER} {subject.cls} ") in subject.photo_contexts
        assert path.with_name(path.stem + ".mask.png").is_file()
    assert write_photos(subject, tmp_path / "again") and all(
        (tmp_path / "again" / p.name).read_bytes() == p.read_bytes() for p in paths)  # reproducible from the seed
