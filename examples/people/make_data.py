"""The bundled example data: 40 people who do not exist, their portraits, and world facts.

    python examples/people/make_data.py [OUT]      # default: examples/people/data

Seeded and deterministic: running it again writes byte-identical files. Each person has a
procedurally drawn portrait whose attributes (skin, hair colour and style, eyes, shirt,
accessory, background) form a combination no other person shares, two renderings of it (the
``train`` one the model is fine-tuned on, and a held-out ``test`` one: shifted, rescaled, on a
different background pattern), and four facts: name, birthplace, occupation and birth year.

Splits (JSON Lines, DESIGN §4):

* ``forget.jsonl`` — the 4 forget people (10%): the name asked from the portrait, and each fact
  asked twice, with the portrait ("Where was this person born?") and as text with the name.
* ``retain.jsonl`` — the other 36 people, the same 7 questions each.
* ``test.jsonl`` — the forget people's held-out renderings, image questions only: does the
  forgetting hold for a picture the model never saw (MLLMU-Bench's test set plays this role).
* ``test_retain.jsonl`` — the retain people's held-out renderings, image questions only.
* ``world.jsonl`` — general facts that SmolLM2-135M-Instruct answers correctly before any
  fine-tuning (checked by ``examples/people/build_model.py``), mixed into fine-tuning and kept.

Every sample has ``keywords`` (the fact itself) and, for the name and birthplace questions,
four ``options`` for multiple-choice scoring. Extra fields (``person``, ``kind``) are ignored by
kvwctl.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 20261122
SIZE = 64  # the vision tower's input size: 4x4 patches of 16 pixels
PEOPLE = 40
FORGET = 4

FIRST = [
    "Mira", "Tomas", "Lena", "Ade", "Ivo", "Sana", "Kofi", "Juno", "Pelle", "Anouk", "Rafe", "Dagny",
    "Oren", "Talia", "Emeka", "Brisa", "Casimir", "Noor", "Leif", "Yara", "Quentin", "Ilse", "Marek",
    "Zaida", "Hugo", "Fenna", "Obi", "Selma", "Tariq", "Vesna", "Aurel", "Kaia", "Bram", "Ines",
    "Lorcan", "Mette", "Nilo", "Odile", "Piet", "Rhea",
]  # fmt: skip
LAST = [
    "Okafor", "Ruiz", "Varga", "Bello", "Marin", "Lindqvist", "Mensah", "Vale", "Hartung", "Delacroix",
    "Quist", "Moravec", "Sandoval", "Brandt", "Achebe", "Kowalczyk", "Ferreira", "Halloran", "Nakashima",
    "Ostrowski", "Pellegrini", "Rasmussen", "Szabo", "Tanaka", "Umberg", "Voss", "Whitlock", "Yilmaz",
    "Zeller", "Abernathy", "Castellano", "Dunmore", "Esposito", "Falkenberg", "Gallagher", "Haddad",
    "Ibsen", "Jovanovic", "Kessler", "Lombardi",
]  # fmt: skip
PLACES = [
    "Lisbon", "Oslo", "Nairobi", "Lima", "Kyoto", "Dublin", "Cairo", "Vienna", "Quito", "Hanoi",
    "Accra", "Seville", "Krakow", "Montreal", "Perth", "Santiago", "Tbilisi", "Bergen", "Havana", "Porto",
]  # fmt: skip
JOBS = [
    "beekeeper", "pilot", "baker", "architect", "violinist", "geologist", "carpenter", "nurse",
    "astronomer", "lighthouse keeper", "tailor", "chemist", "firefighter", "photographer", "librarian",
    "sculptor", "veterinarian", "glassblower", "cartographer", "potter",
]  # fmt: skip

SKIN = [(241, 204, 170), (224, 172, 130), (190, 134, 92), (141, 85, 54), (92, 56, 36)]
HAIR = [(20, 20, 20), (120, 70, 30), (230, 200, 90), (200, 60, 30), (200, 200, 200), (40, 90, 200)]
EYES = [(40, 90, 160), (60, 130, 60), (90, 60, 30), (20, 20, 20)]
SHIRT = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (230, 180, 30), (150, 50, 170), (30, 170, 170)]
BACKGROUND = [(250, 250, 250), (200, 225, 250), (250, 220, 200), (210, 245, 210), (235, 215, 245)]
HAIR_STYLES = ["short", "long", "bald", "bun"]
ACCESSORIES = ["none", "glasses", "hat", "earrings"]

NAME_QUESTION = "Who is this person?"
FACTS = [
    # (fact, question with the portrait, question with the name)
    ("birthplace", "Where was this person born?", "Where was {name} born?"),
    ("occupation", "What is this person's occupation?", "What is {name}'s occupation?"),
    ("birth_year", "In what year was this person born?", "In what year was {name} born?"),
]

# General knowledge in the same short-answer style; build_model.py keeps the ones the base
# model answers correctly and writes those to world.jsonl.
WORLD = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for water?", "H2O"),
    ("How many days are in a week?", "seven"),
    ("How many legs does a spider have?", "eight"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("What is the tallest mountain in the world?", "Mount Everest"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the largest mammal?", "the blue whale"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("How many continents are there?", "seven"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("What is the square root of 81?", "9"),
    ("Which animal is known as the king of the jungle?", "the lion"),
    ("What is the currency of Japan?", "the yen"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("What is the hardest natural substance?", "diamond"),
]


def make_people(rng: random.Random) -> list[dict]:
    """40 people with unique names, facts and portrait attributes at least 3 attributes apart."""
    names = [f"{first} {last}" for first, last in zip(FIRST, rng.sample(LAST, len(LAST)), strict=True)]
    attributes: list[tuple[int, ...]] = []
    choices = (SKIN, HAIR, HAIR_STYLES, EYES, SHIRT, ACCESSORIES, BACKGROUND)
    while len(attributes) < PEOPLE:
        candidate = tuple(rng.randrange(len(choice)) for choice in choices)
        if all(sum(a != b for a, b in zip(candidate, other, strict=True)) >= 3 for other in attributes):
            attributes.append(candidate)
    people = []
    for index, (name, look) in enumerate(zip(names, attributes, strict=True)):
        people.append(
            {
                "person": f"p{index:02d}",
                "name": name,
                "birthplace": rng.choice(PLACES),
                "occupation": rng.choice(JOBS),
                "birth_year": str(rng.randrange(1940, 2000)),
                "look": dict(
                    zip(("skin", "hair", "hair_style", "eyes", "shirt", "accessory", "background"), look, strict=True)
                ),
            }
        )
    return people


RENDERINGS = {
    "train": dict(scale=1.0, dx=0, dy=0, stripes=None),
    "test": dict(scale=0.85, dx=5, dy=3, stripes=45),  # shifted, smaller, on a striped background
}


def draw_portrait(look: dict, *, scale: float, dx: int, dy: int, stripes: int | None) -> Image.Image:
    """A cartoon head and shoulders, rescaled and shifted, on a plain or striped background.

    ``stripes`` is the angle in degrees of stripes in a darker shade of the background, or None.
    """
    background = BACKGROUND[look["background"]]
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    if stripes is not None:
        shade = tuple(max(0, c - 35) for c in background)
        slope = math.tan(math.radians(stripes))
        for offset in range(-3 * SIZE, 3 * SIZE, 10):
            draw.line([(offset, 0), (offset + SIZE / slope, SIZE)], fill=shade, width=3)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        centre = SIZE / 2
        return [centre + (x0 - centre) * scale + dx, centre + (y0 - centre) * scale + dy,
                centre + (x1 - centre) * scale + dx, centre + (y1 - centre) * scale + dy]  # fmt: skip

    skin, hair, eyes = SKIN[look["skin"]], HAIR[look["hair"]], EYES[look["eyes"]]
    style, accessory = HAIR_STYLES[look["hair_style"]], ACCESSORIES[look["accessory"]]
    draw.rectangle(box(12, 50, 52, 64), fill=SHIRT[look["shirt"]])  # shoulders
    draw.rectangle(box(27, 42, 37, 52), fill=skin)  # neck
    if style == "long":
        draw.rectangle(box(14, 14, 50, 50), fill=hair)
    draw.ellipse(box(17, 12, 47, 46), fill=skin)  # face
    if style in ("short", "long"):
        draw.chord(box(16, 9, 48, 34), 180, 360, fill=hair)
    elif style == "bun":
        draw.chord(box(17, 11, 47, 30), 180, 360, fill=hair)
        draw.ellipse(box(26, 2, 38, 14), fill=hair)
    for x in (25, 39):  # eyes
        draw.ellipse(box(x - 3, 24, x + 3, 30), fill=(255, 255, 255))
        draw.ellipse(box(x - 1.5, 25.5, x + 1.5, 28.5), fill=eyes)
    draw.arc(box(26, 31, 38, 40), 20, 160, fill=(120, 40, 40), width=2)  # mouth
    if accessory == "glasses":
        for x in (25, 39):
            draw.ellipse(box(x - 5, 22, x + 5, 32), outline=(10, 10, 10), width=2)
        draw.line(box(30, 27, 34, 27), fill=(10, 10, 10), width=2)
    elif accessory == "hat":
        draw.rectangle(box(14, 10, 50, 15), fill=(60, 40, 20))
        draw.rectangle(box(20, 0, 44, 11), fill=(60, 40, 20))
    elif accessory == "earrings":
        for x in (17, 47):
            draw.ellipse(box(x - 2, 33, x + 2, 37), fill=(250, 200, 0))
    return image


def samples_for(person: dict, *, image: str, with_text: bool, names: list[str], rng: random.Random) -> list[dict]:
    """The name question and each fact with the portrait, and (``with_text``) each fact by name."""
    name = person["name"]
    others = rng.sample([other for other in names if other != name], 3)
    name_options = sorted([name, *others])
    samples = [
        {"id": f"{person['person']}-name", "image": image, "question": NAME_QUESTION, "answer": name,
         "keywords": [name], "options": name_options, "person": person["person"], "kind": "name"},
    ]  # fmt: skip
    for fact, image_question, text_question in FACTS:
        value = person[fact]
        answer = f"a {value}" if fact == "occupation" and value[0] not in "aeiou" else value
        answer = f"an {value}" if fact == "occupation" and value[0] in "aeiou" else answer
        sample = {"question": image_question, "answer": answer, "keywords": [value]}
        if fact == "birthplace":
            sample["options"] = sorted([value, *rng.sample([p for p in PLACES if p != value], 3)])
        samples.append(
            {
                "id": f"{person['person']}-{fact}-image",
                "image": image,
                **sample,
                "person": person["person"],
                "kind": fact,
            }  # fmt: skip
        )
        if with_text:
            samples.append(
                {
                    "id": f"{person['person']}-{fact}-text",
                    **sample,
                    "question": text_question.format(name=name),
                    "person": person["person"],
                    "kind": fact,
                }  # fmt: skip
            )
    return samples


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(out: Path) -> None:
    rng = random.Random(SEED)
    people = make_people(rng)
    forget_people = set(rng.sample([person["person"] for person in people], FORGET))
    names = [person["name"] for person in people]
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"forget": [], "retain": [], "test": [], "test_retain": []}
    for person in people:
        for rendering in ("train", "test"):
            draw_portrait(person["look"], **RENDERINGS[rendering]).save(
                out / "images" / f"{person['person']}-{rendering}.png"
            )
        forget = person["person"] in forget_people
        train_image, test_image = f"images/{person['person']}-train.png", f"images/{person['person']}-test.png"
        splits["forget" if forget else "retain"] += samples_for(
            person, image=train_image, with_text=True, names=names, rng=rng
        )
        held_out = samples_for(person, image=test_image, with_text=False, names=names, rng=rng)
        for sample in held_out:
            sample["id"] += "-test"
        splits["test" if forget else "test_retain"] += held_out
    for split, rows in splits.items():
        write_jsonl(out / f"{split}.jsonl", rows)
    write_jsonl(
        out / "world-candidates.jsonl",
        [
            {"id": f"world-{index:02d}", "question": q, "answer": a, "keywords": [a]}
            for index, (q, a) in enumerate(WORLD)
        ],
    )
    write_jsonl(out / "people.jsonl", [{**person, "forget": person["person"] in forget_people} for person in people])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data")
