# -*- test-case-name: tests.test_pairing_codes -*-
"""
The 256 three-letter words of claudectl's word phrase (pairing.md 5).

Byte ``b`` of a 9-byte invite payload is written as ``WORDS[b]``.  The list
is claudectl 0.64's, in its order; changing it breaks every phrase.
"""

from __future__ import annotations

WORDS: tuple[str, ...] = (
    # 0
    "ace", "act", "age", "aid", "aim", "air", "ale", "ant",
    "ape", "arc", "ark", "arm", "art", "ash", "axe", "bay",
    # 16
    "bed", "bee", "bet", "bid", "big", "bit", "bow", "box",
    "bud", "bug", "bus", "cab", "cap", "car", "cat", "cob",
    # 32
    "cod", "cog", "cop", "cow", "cry", "cub", "cup", "cut",
    "dam", "day", "den", "dew", "dig", "dim", "dip", "dog",
    # 48
    "dot", "dry", "dub", "dug", "dun", "duo", "dye", "ear",
    "eat", "eel", "egg", "elk", "elm", "emu", "end", "era",
    # 64
    "eve", "ewe", "eye", "fan", "far", "fat", "fax", "fed",
    "few", "fig", "fin", "fir", "fit", "fix", "fly", "fog",
    # 80
    "for", "fox", "fry", "fun", "fur", "gag", "gap", "gas",
    "gem", "get", "gin", "gnu", "god", "got", "gum", "gun",
    # 96
    "gut", "guy", "gym", "had", "ham", "has", "hat", "hay",
    "hen", "her", "hid", "him", "hip", "hit", "hog", "hop",
    # 112
    "hot", "how", "hub", "hue", "hug", "hum", "hut", "ice",
    "ill", "imp", "ink", "inn", "ion", "ire", "ivy", "jab",
    # 128
    "jag", "jam", "jar", "jaw", "jay", "jet", "jig", "job",
    "jog", "joy", "jug", "jut", "keg", "ken", "key", "kid",
    # 144
    "kin", "kit", "lab", "lad", "lag", "lap", "law", "lay",
    "lea", "led", "leg", "let", "lid", "lip", "lit", "log",
    # 160
    "lot", "low", "lug", "mad", "man", "map", "mar", "mat",
    "may", "men", "met", "mid", "mix", "mob", "mod", "mop",
    # 176
    "mow", "mud", "mug", "nab", "nag", "nap", "net", "new",
    "nil", "nip", "nit", "nod", "nor", "not", "now", "nun",
    # 192
    "nut", "oak", "oar", "oat", "odd", "ode", "off", "oft",
    "ohm", "oil", "old", "one", "opt", "orb", "ore", "our",
    # 208
    "out", "owe", "owl", "own", "pad", "pal", "pan", "paw",
    "pay", "pea", "peg", "pen", "per", "pet", "pie", "pig",
    # 224
    "pin", "pit", "ply", "pod", "pop", "pot", "pro", "pry",
    "pub", "pug", "pun", "pup", "put", "ram", "ran", "rap",
    # 240
    "rat", "raw", "ray", "red", "rib", "rid", "rig", "rim",
    "rip", "rob", "rod", "rot", "row", "rub", "rug", "rum",
)

#: Word -> byte value.
INDEX: dict[str, int] = {w: i for i, w in enumerate(WORDS)}

assert len(WORDS) == 256 and len(INDEX) == 256
