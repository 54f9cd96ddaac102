"""Small generated tasks with train and held-out splits, for training and evaluating
adapters without downloading anything.

- `extractive-qa`: a generated passage about a person, a question whose answer is a span of
  it (scored by exact match and token F1).
- `arithmetic`: one-step word problems over small numbers; the answer writes the sum out,
  "12 + 7 = 19", a step a 135M model needs (scored by answer accuracy: the last number).
- `contact-card`: a chat task; the user describes a person in free order and words, the
  assistant writes one line in a fixed format (scored by exact match).
- `home-city`: a short chat task; one sentence about a person and a question, the assistant
  answers with the city alone, where the base model answers in a sentence (exact match).
- `multi-turn-city`: home-city's question in turn 2 or 3 of a chat, after small talk (whose
  answers are not trained: `weight` 0) or after the same question about someone else, so the
  answer depends on the latest turn (exact match); what a chat's routing scope is tried on.

The held-out split draws its people's names (and home-city's cities) from pools disjoint from
the training split's, so held-out scores measure what was learnt about the task, not the
people."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

FIRST_NAMES = [
    "Mara", "Ivo", "Selma", "Tomas", "Anouk", "Ravi", "Elin", "Jonah", "Priya", "Kofi",
    "Lena", "Mateo", "Ines", "Oskar", "Yara", "Felix", "Noor", "Emil", "Zofia", "Dario",
    "Hana", "Lucas", "Amara", "Nils", "Sofia", "Arjun", "Greta", "Malik", "Clara", "Tariq",
    "Vera", "Hugo", "Leila", "Bruno", "Maja", "Kenji", "Alma", "Pavel", "Rosa", "Idris",
]
LAST_NAMES = [
    "Lind", "Okafor", "Brandt", "Novak", "Serrano", "Haddad", "Keller", "Moreau", "Tanaka",
    "Varga", "Costa", "Nyberg", "Fischer", "Duarte", "Kowalski", "Mensah", "Rossi", "Berg",
    "Quinn", "Sato", "Holm", "Petrov", "Alvarez", "Weber", "Dubois", "Larsen", "Ibrahim",
    "Conti", "Vogel", "Marsh", "Kaya", "Ortega", "Strand", "Bauer", "Reyes", "Lund",
]
JOBS = ["pharmacist", "carpenter", "architect", "nurse", "baker", "pilot", "librarian",
        "chemist", "teacher", "plumber", "journalist", "dentist", "gardener", "electrician",
        "translator", "veterinarian", "photographer", "accountant"]
CITIES = ["Oslo", "Lisbon", "Nairobi", "Osaka", "Porto", "Krakow", "Lyon", "Dublin",
          "Quito", "Tunis", "Bergen", "Graz", "Leeds", "Hanoi", "Perth", "Seville", "Turku",
          "Accra"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "silver", "orange"]
PETS = ["dog", "cat", "parrot", "rabbit", "tortoise", "hamster"]
PET_NAMES = ["Biscuit", "Pepper", "Mango", "Ziggy", "Olive", "Nacho", "Luna", "Tofu",
             "Rocket", "Maple", "Pixel", "Bean"]
ITEMS = ["apples", "marbles", "stamps", "pencils", "books", "coins", "shells", "cards",
         "stickers", "cookies"]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _half(pool: list[str], split: str) -> list[str]:
    return pool[::2] if split == "train" else pool[1::2]


def _person(rng: random.Random, split: str) -> str:
    """A full name from the split's half of each pool."""
    return f"{rng.choice(_half(FIRST_NAMES, split))} {rng.choice(_half(LAST_NAMES, split))}"


def passage_facts(rng: random.Random, split: str) -> tuple[str, list[tuple[str, str]]]:
    """A passage about one person and the (question, answer) pairs it answers."""
    name = _person(rng, split)
    job, city, year = rng.choice(JOBS), rng.choice(CITIES), str(rng.randint(1950, 2005))
    colour, pet, pet_name = rng.choice(COLOURS), rng.choice(PETS), rng.choice(PET_NAMES)
    facts = [
        (f"{name} works as {_a(job)}.", f"What is {name}'s job?", job),
        (f"{name} lives in {city}.", f"In which city does {name} live?", city),
        (f"{name} was born in {year}.", f"In what year was {name} born?", year),
        (f"{name} has {_a(pet)} called {pet_name}.",
         f"What is the name of {name}'s {pet}?", pet_name),
        (f"{name} drives {_a(colour)} car.", f"What colour is {name}'s car?", colour),
    ]
    rng.shuffle(facts)
    return " ".join(sentence for sentence, _, _ in facts), [(q, a) for _, q, a in facts]


def extractive_qa(rng: random.Random, split: str) -> dict:
    passage, facts = passage_facts(rng, split)
    question, answer = rng.choice(facts)
    return {"prompt": f"Passage: {passage}\nQuestion: {question}\nAnswer:",
            "answer": f" {answer}"}


def arithmetic(rng: random.Random, split: str) -> dict:
    name, item = _person(rng, split).split()[0], rng.choice(ITEMS)
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    kind = rng.choice(["gains", "loses", "times"])
    if kind == "gains":
        story = rng.choice([f"{name} has {a} {item} and gets {b} more.",
                            f"{name} had {a} {item}. A friend gave {name} {b} {item}."])
        result, working = a + b, f"{a} + {b}"
    elif kind == "loses":
        a, b = max(a, b), min(a, b)
        story = rng.choice([f"{name} has {a} {item} and gives away {b}.",
                            f"{name} had {a} {item} and lost {b} of them."])
        result, working = a - b, f"{a} - {b}"
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        story = f"{name} has {a} boxes with {b} {item} in each box."
        result, working = a * b, f"{a} x {b}"
    question = f"How many {item} does {name} have now?" if kind != "times" \
        else f"How many {item} does {name} have in all?"
    return {"prompt": f"Question: {story} {question}\nAnswer:", "answer": f" {working} = {result}"}


def contact_card(rng: random.Random, split: str) -> dict:
    name, job, city = _person(rng, split), rng.choice(JOBS), rng.choice(CITIES)
    phone = f"555-{rng.randint(0, 9999):04d}"
    parts = [rng.choice([f"works as {_a(job)}", f"is {_a(job)}", f"job: {job}"]),
             rng.choice([f"lives in {city}", f"is based in {city}", f"city: {city}"]),
             rng.choice([f"phone {phone}", f"can be reached at {phone}", f"tel. {phone}"])]
    rng.shuffle(parts)
    request = rng.choice(["Make a contact card", "Contact card please", "Card for this person"])
    text = f"{request}: {name} {parts[0]}, {parts[1]} and {parts[2]}."
    card = f"NAME: {name} | JOB: {job} | CITY: {city} | PHONE: {phone}"
    return {"messages": [{"role": "user", "content": text},
                         {"role": "assistant", "content": card}]}


def home_city(rng: random.Random, split: str) -> dict:
    name, job = _person(rng, split), rng.choice(JOBS)
    city, year = rng.choice(_half(CITIES, split)), rng.randint(1950, 2005)
    first = name.split()[0]
    sentence = rng.choice([f"{name} is {_a(job)} who lives in {city}.",
                           f"{name} lives in {city} and works as {_a(job)}.",
                           f"Born in {year}, {name} now lives in {city}.",
                           f"{name}, {_a(job)}, moved to {city} in {year}."])
    question = rng.choice([f"Where does {first} live?", f"Which city is {first} in?",
                           f"What is {first}'s home city?"])
    return {"messages": [{"role": "user", "content": f"{sentence} {question}"},
                         {"role": "assistant", "content": city}]}


# Small talk before the task, and the answers the chat carries (not trained: weight 0).
SMALL_TALK = [
    ("Hi! How are you today?", "I'm doing well, thank you. How can I help?"),
    ("Can you recommend a book for a long train ride?", "An adventure novel is a fine choice."),
    ("What is a quick breakfast idea?", "Oatmeal with fruit is quick and filling."),
    ("Tell me a fun fact about the ocean.", "The ocean covers most of the Earth's surface."),
    ("How do I keep my plants healthy?", "Give them light and water them regularly."),
    ("Any tips for sleeping better?", "Keep a regular schedule and avoid screens at night."),
    ("What should I cook for dinner tonight?", "A simple pasta with vegetables is easy."),
    ("Is it going to be a busy week for you?", "I'm always here, whenever you need me."),
    ("What's a good way to learn a new language?", "Practise a little every day."),
    ("Can you suggest a name for a goldfish?", "How about Bubbles?"),
]


def multi_turn_city(rng: random.Random, split: str) -> dict:
    after_another = rng.random() < 0.5
    earlier_turns = rng.randint(1, 2)
    messages = home_city(rng, split)["messages"] if after_another else []
    for _ in range(earlier_turns - after_another):
        question, answer = rng.choice(_half(SMALL_TALK, split))
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer, "weight": 0}]
    latest = home_city(rng, split)["messages"]
    while latest[-1]["content"] in [m["content"] for m in messages]:
        latest = home_city(rng, split)["messages"]
    return {"messages": messages + latest}


TASKS: dict[str, Callable[[random.Random, str], dict]] = {
    "extractive-qa": extractive_qa,
    "arithmetic": arithmetic,
    "contact-card": contact_card,
    "home-city": home_city,
    "multi-turn-city": multi_turn_city,
}

# What each task is scored by, and the description its adapter is initialised from.
METRICS = {"extractive-qa": "exact_match", "arithmetic": "answer_accuracy",
           "contact-card": "exact_match", "home-city": "exact_match",
           "multi-turn-city": "exact_match"}
DESCRIPTIONS = {
    "extractive-qa": "Answer the question with the exact words from the passage, nothing else.",
    "arithmetic": "Solve the arithmetic word problem and answer with the number only.",
    "contact-card": "Write the person's contact card as NAME: | JOB: | CITY: | PHONE: on one line.",
    "home-city": "Answer with the name of the city only.",
    "multi-turn-city": "Answer with the name of the city only.",
}


def _key(record: dict) -> str:
    return json.dumps(record.get("prompt") or record["messages"][:-1], sort_keys=True)


def generate(task: str, split: str, size: int, seed: int = 0, exclude: set[str] = frozenset()
             ) -> list[dict]:
    """`size` distinct examples of `task` for `split` ("train" or "test"), none whose prompt
    is in `exclude`; the same (task, split, size, seed) always gives the same examples."""
    make = TASKS[task]
    rng = random.Random(f"{task}/{split}/{seed}")
    records, seen = [], set(exclude)
    for _ in range(size * 100):
        record = make(rng, split)
        if _key(record) not in seen:
            seen.add(_key(record))
            records.append(record)
            if len(records) == size:
                return records
    raise ValueError(f"{task}: could not draw {size} distinct {split} examples")


def write_task(task: str, folder: Path, train_size: int, test_size: int, seed: int = 0) -> None:
    """folder/train.jsonl and folder/test.jsonl, no prompt in both."""
    train = generate(task, "train", train_size, seed)
    test = generate(task, "test", test_size, seed, exclude={_key(r) for r in train})
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in (("train", train), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
