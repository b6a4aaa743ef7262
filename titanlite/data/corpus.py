"""A small synthetic corpus, generated procedurally, for smoke tests and CPU demos.

Why generated rather than shipped: titanlite must train out of the box on a fresh machine
with no network, and it must not ship text written by others. So the default corpus is built
from a tiny grammar, a made-up world and some arithmetic, using only `random.Random(seed)`
(whose sequence is fixed across platforms and Python >= 3.10; no `hash()`-dependent ordering).

The text has structure a tiny model can learn in a minute or two of CPU training:
  * an invented world (fixed for every seed): countries with capitals, and characters with an
    age, a favorite color, a pet and a home city; the same facts recur across documents;
  * templated English-like sentences from a small grammar (a few hundred words);
  * correct arithmetic ("17 + 25 = 42"), counting sequences, and lists shown sorted.
The seed chooses which documents are drawn, never the facts, so a validation split generated
with another seed shares the world of the training split.
"""

import random
from dataclasses import dataclass

DEFAULT_CORPUS_SEED = 1234
# The world is the same for every document seed: facts must agree between train and val splits.
_WORLD_SEED = 20240611

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "kl", "st", "tr", "sh", "th", "gr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "io"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "k", "nd"]

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "gray", "pink"]
PETS = ["cat", "dog", "horse", "rabbit", "parrot", "goat", "turtle", "fox"]
JOBS = ["baker", "farmer", "teacher", "sailor", "painter", "doctor", "builder", "singer",
        "hunter", "weaver", "miner", "writer"]
NOUNS = ["river", "house", "tree", "book", "song", "road", "garden", "boat", "bridge", "market",
         "window", "letter", "mountain", "forest", "lamp", "stone", "cloud", "table", "field",
         "village", "door", "apple", "bird", "coat", "basket", "fire", "island", "clock",
         "map", "ship", "tower", "wall", "well", "hill", "star", "bell", "cart", "school"]
ADJECTIVES = ["old", "small", "big", "quiet", "bright", "dark", "warm", "cold", "new",
              "tall", "little", "happy", "strange", "gentle", "busy", "empty", "golden"]
VERBS = ["found", "saw", "painted", "carried", "opened", "cleaned", "built", "visited",
         "watched", "fixed", "followed", "closed", "drew", "sold", "bought", "climbed"]
PLACES = ["near the river", "in the garden", "at the market", "on the hill", "by the bridge",
          "under the tree", "in the village", "at school", "on the road", "in the forest"]
TIMES = ["In the morning", "At noon", "In the evening", "At night", "On Monday", "Later",
         "One day", "After lunch", "Before dawn", "In the spring", "In the winter"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]


def _invent_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


@dataclass(frozen=True)
class Person:
    name: str
    age: int
    color: str
    pet: str
    job: str
    city: str


@dataclass(frozen=True)
class World:
    capitals: dict[str, str]  # country -> capital city
    people: list[Person]


def build_world(num_countries: int = 24, num_people: int = 48) -> World:
    """The fixed invented world every document talks about (same on every machine)."""
    rng = random.Random(_WORLD_SEED)
    names: list[str] = []  # ordered set: dict/set order must not depend on hash()
    while len(names) < 2 * num_countries + num_people:
        word = _invent_word(rng, rng.randint(2, 3))
        if word not in names:
            names.append(word)
    countries, cities = names[:num_countries], names[num_countries:2 * num_countries]
    people = [Person(name, rng.randint(6, 80), rng.choice(COLORS), rng.choice(PETS),
                     rng.choice(JOBS), rng.choice(cities))
              for name in names[2 * num_countries:]]
    return World(dict(zip(countries, cities)), people)


def _story(rng: random.Random, world: World) -> str:
    cast = rng.sample(world.people, rng.randint(1, 3))
    country_of = {city: country for country, city in world.capitals.items()}
    sentences = []
    for p in cast:
        sentences += [f"{p.name} lives in {p.city}, the capital of {country_of[p.city]}.",
                      f"{p.name} is {p.age} years old and works as a {p.job}.",
                      f"The favorite color of {p.name} is {p.color}.",
                      f"{p.name} has a {p.color} {p.pet}."]
    rng.shuffle(sentences)
    for _ in range(rng.randint(2, 24)):
        p = rng.choice(cast)
        noun, adjective = rng.choice(NOUNS), rng.choice(ADJECTIVES)
        form = rng.randrange(4)
        if form == 0:
            sentences.append(f"{rng.choice(TIMES)}, {p.name} {rng.choice(VERBS)} "
                             f"the {adjective} {noun} {rng.choice(PLACES)}.")
        elif form == 1:
            article = "an" if noun[0] in "aeiou" else "a"
            sentences.append(f"The {p.pet} of {p.name} {rng.choice(VERBS)} {article} {noun}.")
        elif form == 2:
            count = rng.randint(2, 12)
            sentences.append(f"{p.name} {rng.choice(VERBS)} {NUMBER_WORDS[count]} {noun}s.")
        else:
            sentences.append(f'"I am a {p.job} from {p.city}," said {p.name}.')
    return " ".join(sentences)


def _atlas(rng: random.Random, world: World) -> str:
    countries = rng.sample(list(world.capitals), rng.randint(2, 10))
    lines = ["Facts about countries."]
    for country in countries:
        capital = world.capitals[country]
        lines.append(rng.choice([f"The capital of {country} is {capital}.",
                                 f"{capital} is the capital of {country}.",
                                 f"Q: What is the capital of {country}? A: {capital}."]))
    return "\n".join(lines)


def _quiz(rng: random.Random, world: World) -> str:
    lines = []
    for p in rng.sample(world.people, rng.randint(2, 10)):
        lines.append(rng.choice([f"Q: How old is {p.name}? A: {p.name} is {p.age} years old.",
                                 f"Q: What pet does {p.name} have? A: a {p.pet}.",
                                 f"Q: Where does {p.name} live? A: in {p.city}.",
                                 f"Q: What is the job of {p.name}? A: {p.name} is a {p.job}.",
                                 f"Q: What color does {p.name} like? A: {p.color}."]))
    return "\n".join(lines)


def _arithmetic(rng: random.Random, world: World) -> str:
    lines = ["Arithmetic practice."]
    for _ in range(rng.randint(4, 30)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        if op == "-":
            a, b = max(a, b), min(a, b)  # keep results non-negative
        elif op == "*":
            a, b = a % 13, b % 13
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        lines.append(f"{a} {op} {b} = {result}")
    return "\n".join(lines)


def _counting(rng: random.Random, world: World) -> str:
    start, step, count = rng.randint(0, 500), rng.randint(1, 12), rng.randint(5, 40)
    numbers = ", ".join(str(start + i * step) for i in range(count))
    return f"Counting from {start} in steps of {step}: {numbers}."


def _sorting(rng: random.Random, world: World) -> str:
    lines = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.5:
            items = [str(n) for n in rng.sample(range(100), rng.randint(3, 10))]
            ordered = sorted(items, key=int)
        else:
            items = rng.sample(NOUNS, rng.randint(3, 8))
            ordered = sorted(items)
        lines.append(f"Sort {', '.join(items)}. Sorted: {', '.join(ordered)}.")
    return "\n".join(lines)


# (weight, generator): stories dominate, as prose does in real pretraining data.
_DOCUMENT_KINDS = [(35, _story), (15, _atlas), (15, _quiz), (15, _arithmetic),
                   (10, _counting), (10, _sorting)]


def generate_documents(num_documents: int, seed: int = DEFAULT_CORPUS_SEED) -> list[str]:
    """`num_documents` documents (about 10 to 400 words each), identical for the same seed."""
    world = build_world()
    rng = random.Random(seed)
    weights = [weight for weight, _ in _DOCUMENT_KINDS]
    generators = [generator for _, generator in _DOCUMENT_KINDS]
    return [rng.choices(generators, weights)[0](rng, world) for _ in range(num_documents)]
