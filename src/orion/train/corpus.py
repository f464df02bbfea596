"""A tiny story corpus Orion writes itself, so the training demo and tests run offline with no download.

The stories imitate TinyStories (simple words, a child or animal, a beginning, a problem and a happy end) with
templates filled from small word lists, so a few hundred distinct words cover the whole corpus: a small model learns
it in minutes, and the same seed always gives the same stories.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from orion.errors import OrionError, SettingsError


@dataclass(frozen=True)
class _Character:
    name: str
    kind: str
    he: str
    his: str
    him: str


_GIRLS = ["Lily", "Mia", "Sue", "Anna", "Lucy", "Zoe", "Emma", "Ella", "Rosa", "Kim", "Amy", "Nina"]
_BOYS = ["Ben", "Tom", "Max", "Sam", "Tim", "Jack", "Leo", "Joe", "Finn", "Bob", "Dan", "Ravi"]
_GIRL_KINDS = ["little girl", "girl"]
_BOY_KINDS = ["little boy", "boy"]
_ANIMALS = ["cat", "dog", "bunny", "bird", "bear", "fox", "frog", "duck", "mouse", "lion", "turtle", "owl", "puppy",
            "kitten", "pig", "cow", "squirrel", "fish"]
_TRAITS = ["happy", "small", "kind", "brave", "shy", "curious", "silly", "gentle", "clever", "sleepy", "busy",
           "friendly", "playful", "quiet", "funny", "tiny"]
_HOMES = ["in a small house near the woods", "by a big blue lake", "on a farm with many animals", "in a busy town",
          "next to a tall hill", "in a green garden", "near the sea", "in a quiet forest", "in a cozy little home",
          "on a sunny island", "at the edge of a park", "under an old oak tree"]
_LIKES = ["liked to play outside", "loved to sing songs", "liked to draw pictures", "loved to run and jump",
          "liked to look at the stars", "loved to read books", "liked to dance in the rain",
          "loved to build things with blocks", "liked to help mom in the kitchen", "loved to climb trees",
          "liked to splash in puddles", "loved to pick flowers"]
_OBJECTS = ["ball", "kite", "box", "hat", "book", "shell", "key", "flower", "toy car", "drum", "cup", "blanket",
            "rock", "map", "boat", "balloon", "crayon", "cookie", "bell", "feather", "teddy bear", "ring", "leaf",
            "jar"]
_LOOKS = ["red", "shiny", "old", "tiny", "soft", "golden", "striped", "funny", "big", "pretty", "blue", "green",
          "yellow", "purple", "round", "sparkly"]
_WHEN = ["One day", "One sunny morning", "One rainy day", "Later that day", "One warm afternoon", "One cold night",
         "One windy day", "On a bright spring day"]
_WHERE = ["under a tree", "behind the door", "in the tall grass", "at the park", "on the beach", "inside an old box",
          "near the river", "under the bed", "by the garden gate", "next to a big rock"]
_FIND_VERBS = ["found", "saw", "spotted", "discovered"]
#: A problem and the ways a friend can solve it, so the help always fits the trouble.
_TROUBLES = [
    ("But the wind blew the {obj} up into a tall tree.",
     ["{friend} climbed up the tree and got the {obj} back.", "{friend} shook the branch until the {obj} fell down."]),
    ("But the {obj} fell into the water and began to float away.",
     ["{friend} found a long stick and pulled the {obj} out.", "{friend} jumped in and swam to the {obj}."]),
    ("But a big dog grabbed the {obj} and ran off with it.",
     ["{friend} ran very fast and caught the dog.", "{friend} gave the dog a bone, and the dog dropped the {obj}."]),
    ("But the {obj} rolled down the hill, far away.",
     ["{friend} ran down the hill and brought the {obj} back.", "{friend} stopped the {obj} with a big foot."]),
    ("But the {obj} got stuck in the mud.",
     ["{friend} pulled and pulled until the {obj} came out.", "{friend} washed the mud off the {obj}."]),
    ("But when {he} picked it up, the {obj} broke into two pieces.",
     ["{friend} knew a clever trick and fixed the {obj} with glue.", "{friend} helped tie the pieces together."]),
    ("But then {he} could not find the way home.",
     ["{friend} held {his} hand and showed {him} the way.", "{friend} knew the path and walked {him} home."]),
    ("But it started to rain, and the {obj} got all wet.",
     ["{friend} shared a warm towel, and soon the {obj} was dry.", "{friend} held a big leaf over the {obj}."]),
]
_BAD = ["sad", "scared", "worried", "upset", "angry", "lonely", "confused"]
_GOOD = ["happy", "proud", "glad", "thankful", "calm", "excited", "warm inside"]
_CRIES = ["Oh no!", "What can I do?", "Can anyone help me?", "This is not fair!", "I want my {obj} back!",
          "Please help!"]
_THANKS = ["Thank you, {friend}!", "You are a good friend!", "We did it!", "I am so happy now!",
           "You are so kind!", "Let us play together!"]
_ENDINGS = [
    "From that day on, {name} and {friend} were best friends.",
    "They played with the {obj} until the sun went down.",
    "That night, {name} went to sleep with a big smile.",
    "{name} kept the {obj} in a safe place, and it was never lost again.",
    "Then they went home and ate warm soup together.",
    "The next day, {name} gave {friend} a hug and a cookie.",
]
_MORALS = [
    "{name} learned that it is good to ask for help.",
    "{name} learned that friends make hard things easy.",
    "{name} learned to be careful with special things.",
    "{name} learned that sharing makes everyone happy.",
    "",
]


def _pick(rng: random.Random, options: list[str]) -> str:
    """``rng.choice`` from ``rng.random()`` alone: Python guarantees only ``random()`` stays the same across versions,
    so the corpus of a seed never changes."""
    return options[int(rng.random() * len(options))]


def _character(rng: random.Random, exclude: str = "") -> _Character:
    """A child or an animal with a name and the pronouns that go with it."""
    while True:
        girl = rng.random() < 0.5
        name = _pick(rng, _GIRLS if girl else _BOYS)
        if name != exclude:
            break
    kind = _pick(rng, _GIRL_KINDS if girl else _BOY_KINDS) if rng.random() < 0.5 else _pick(rng, _ANIMALS)
    he, his, him = ("she", "her", "her") if girl else ("he", "his", "him")
    return _Character(name, f"{_pick(rng, _TRAITS)} {kind}", he, his, him)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _story(rng: random.Random) -> str:
    """One story: three short paragraphs (beginning, problem and help, end), joined by single newlines."""
    hero = _character(rng)
    friend = _character(rng, exclude=hero.name)
    obj = _pick(rng, _OBJECTS)
    look = _pick(rng, _LOOKS)
    problem, helps = _TROUBLES[int(rng.random() * len(_TROUBLES))]
    fill = {"name": hero.name, "he": hero.he, "his": hero.his, "him": hero.him, "obj": obj, "friend": friend.name}

    def say(template: str) -> str:
        return template.format(**fill)

    def cap(text: str) -> str:
        return text[0].upper() + text[1:]

    beginning = [
        f"Once upon a time, there was {_article(hero.kind)} named {hero.name}.",
        f"{cap(hero.he)} lived {_pick(rng, _HOMES)} and {_pick(rng, _LIKES)}.",
    ]
    middle = [
        f"{_pick(rng, _WHEN)}, {hero.name} {_pick(rng, _FIND_VERBS)} {_article(look + ' ' + obj)} "
        f"{_pick(rng, _WHERE)}.",
        cap(say(problem)),
        f"{hero.name} felt {_pick(rng, _BAD)}. \"{say(_pick(rng, _CRIES))}\" {hero.he} said.",
        f"Just then, {friend.name} the {friend.kind} came by.",
        say(_pick(rng, helps)),
        f"\"{say(_pick(rng, _THANKS))}\" said {hero.name}, and {hero.he} felt {_pick(rng, _GOOD)}.",
    ]
    end = [say(_pick(rng, _ENDINGS)), say(_pick(rng, _MORALS))]
    return "\n".join(" ".join(s for s in part if s) for part in (beginning, middle, end))


def make_story_corpus(n_stories: int, seed: int = 0) -> list[str]:
    """``n_stories`` distinct stories, the same ones for the same seed on any machine and Python version."""
    if isinstance(n_stories, bool) or not isinstance(n_stories, int) or n_stories < 0:
        raise SettingsError(f"n_stories {n_stories!r} must be a whole number >= 0")
    rng = random.Random(seed)
    seen: set[str] = set()
    stories: list[str] = []
    while len(stories) < n_stories:  # the template space holds billions of stories, so repeats are rare
        story = _story(rng)
        if story not in seen:
            seen.add(story)
            stories.append(story)
    return stories


def write_corpus(path: str | os.PathLike, stories: list[str]) -> None:
    """Write stories as UTF-8 text, one blank line between stories: the ``.txt`` layout
    :func:`orion.train.data.open_source` reads back as the same documents."""
    from orion.train.data import atomic_write

    for i, story in enumerate(stories):
        lines = story.strip().split("\n")
        if story != story.strip() or not story or any(not line.strip() for line in lines):
            raise OrionError(f"story {i} is empty, has a blank line or has blank space at either end, so it would not "
                             "read back as one document; remove blank lines and strip it")
    with atomic_write(path) as f:
        f.write("\n\n".join(stories).encode("utf-8"))
        if stories:
            f.write(b"\n")
