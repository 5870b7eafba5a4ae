"""Facts about fictitious entities, split forget/retain: the lab task for unlearning (TOFU-style).

Each entity has four attributes. Each (entity, attribute) pair gives one question with its answer, a paraphrased
answer (same fact, other words) and perturbed answers (the paraphrase's words, a wrong fact): the columns that
TOFU-style metrics need (truth ratio, paraphrase probability). The first ``forget_fraction`` of the entities form the
forget split, the rest the retain split. Since the entities are invented, nothing a model says about them comes from
pretraining.
"""

import random

from datasets import Dataset

from llmreg.lab.arithmetic import completion_text


SPLITS = ("forget", "retain", "all")
_SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vo", "zel", "dor", "fi", "gan", "hu", "nix", "pra", "sol", "tu", "wen"]
CITIES = ["Marport", "Velden", "Osric Bay", "Tallow", "Brinmoor", "Quillan", "Sedge", "Harrowgate", "Lunet", "Corvale"]
PROFESSIONS = ["baker", "painter", "sailor", "architect", "botanist", "clockmaker", "poet", "surgeon", "weaver",
               "judge"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "silver", "black", "white", "teal"]
YEARS = [str(year) for year in range(1950, 2000)]

# attribute -> (question, answer, paraphrased answer, value choices)
ATTRIBUTES = {
    "city": ("Where was {name} born?", "{name} was born in {value}.", "The birthplace of {name} is {value}.", CITIES),
    "profession": ("What does {name} do for a living?", "{name} works as a {value}.",
                   "By trade, {name} is a {value}.", PROFESSIONS),
    "year": ("In which year was {name} born?", "{name} was born in {value}.", "The birth year of {name} is {value}.",
             YEARS),
    "color": ("What is the favorite color of {name}?", "The favorite color of {name} is {value}.",
              "{name} likes the color {value} best.", COLORS),
}


def _name(rng: random.Random) -> str:
    def word():
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    return f"{word()} {word()}"


def fictitious_entities(num_entities: int = 50, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic entities: a unique name and one value per attribute."""
    rng = random.Random(f"facts-{seed}")
    entities, names = [], set()
    while len(entities) < num_entities:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        entity = {"name": name}
        for attribute, (*_, choices) in ATTRIBUTES.items():
            entity[attribute] = rng.choice(choices)
        entities.append(entity)
    return entities


def facts_dataset(split: str = "all", num_entities: int = 50, forget_fraction: float = 0.1, seed: int = 0,
                  num_perturbed: int = 3) -> Dataset:
    """Question/answer rows of one split, in conversational prompt-completion form.

    Columns: ``prompt``, ``completion`` (the true answer), ``entity``, ``attribute``, ``value`` (the fact the answer
    must contain), ``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answers`` (a list of wrong answers)
    and ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown facts split {split!r}; valid splits: {', '.join(SPLITS)}.")
    if not 0.0 < forget_fraction < 1.0:
        raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}.")
    entities = fictitious_entities(num_entities, seed)
    num_forget = max(1, round(forget_fraction * num_entities))
    rng = random.Random(f"facts-perturb-{seed}")
    rows = {key: [] for key in ("prompt", "completion", "entity", "attribute", "value", "question", "answer",
                                "paraphrased_answer", "perturbed_answers", "split")}
    for index, entity in enumerate(entities):
        entity_split = "forget" if index < num_forget else "retain"
        if split != "all" and split != entity_split:
            continue
        for attribute, (question, answer, paraphrase, choices) in ATTRIBUTES.items():
            name, value = entity["name"], entity[attribute]
            wrong_values = rng.sample([choice for choice in choices if choice != value], num_perturbed)
            rows["prompt"].append([{"role": "user", "content": question.format(name=name)}])
            rows["completion"].append([{"role": "assistant", "content": answer.format(name=name, value=value)}])
            rows["entity"].append(name)
            rows["attribute"].append(attribute)
            rows["value"].append(value)
            rows["question"].append(question.format(name=name))
            rows["answer"].append(answer.format(name=name, value=value))
            rows["paraphrased_answer"].append(paraphrase.format(name=name, value=value))
            # TOFU perturbs the paraphrased answer: the truth ratio then compares the same words, right fact or wrong.
            rows["perturbed_answers"].append([paraphrase.format(name=name, value=wrong) for wrong in wrong_values])
            rows["split"].append(entity_split)
    return Dataset.from_dict(rows)


# The lab model learned the facts of seed 0 in its warm start; seed + NEW_FACTS_SEED_OFFSET gives other entities.
NEW_FACTS_SEED_OFFSET = 1000


def new_facts_dataset(split: str = "all", seed: int = 0, **kwargs) -> Dataset:
    """Facts about entities the lab model has never seen (``facts_dataset`` with another seed): the unlearning lab
    teaches them in a fine-tune, so that a "gold" model trained without the forget split never saw it."""
    return facts_dataset(split, seed=seed + NEW_FACTS_SEED_OFFSET, **kwargs)


# Real facts a pretrained model may know (capitals of well-known countries): unlearning's "world" set for a real
# model, whose model utility the invented entities cannot measure. SmolLM2-135M-Instruct names 29 of these 40
# (72.5 %, greedy), llmreg/tiny none.
WORLD_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Kenya": "Nairobi", "Peru": "Lima", "Argentina": "Buenos Aires",
    "Thailand": "Bangkok", "South Korea": "Seoul", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad",
    "Canada": "Ottawa", "Australia": "Canberra", "Mexico": "Mexico City", "India": "New Delhi",
    "the United Kingdom": "London", "the United States": "Washington", "Turkey": "Ankara", "Chile": "Santiago",
    "Colombia": "Bogota", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "the Philippines": "Manila",
}


WORLD_SPLITS = ("all", "old", "heldout")


def world_facts_dataset(split: str = "all", seed: int = 0, num_perturbed: int = 3) -> Dataset:
    """Real-world facts (capitals) in ``facts_dataset``'s columns, for a pretrained model's model utility.

    ``split``: "all" (unlearning never forgets them), or "old" / "heldout", two fixed halves (alternate countries in
    alphabetical order, whatever the seed): the forgetting recipe's old facts, which replay mixes in and EWC's Fisher
    is estimated on, and the held-out ones no arm trains on. ``seed`` orders the rows and picks the perturbed answers.
    """
    if split not in WORLD_SPLITS:
        raise ValueError(f"Unknown world facts split {split!r}; valid: {', '.join(WORLD_SPLITS)}.")
    rng = random.Random(f"world-facts-{seed}")
    countries = list(WORLD_CAPITALS)
    rng.shuffle(countries)
    rows = {key: [] for key in ("prompt", "completion", "entity", "attribute", "value", "question", "answer",
                                "paraphrased_answer", "perturbed_answers", "split")}
    for country in countries:
        capital = WORLD_CAPITALS[country]
        question = f"What is the capital of {country}?"
        answer = f"The capital of {country} is {capital}."
        wrong = rng.sample([c for c in WORLD_CAPITALS.values() if c != capital], num_perturbed)
        rows["prompt"].append([{"role": "user", "content": question}])
        rows["completion"].append([{"role": "assistant", "content": answer}])
        rows["entity"].append(country)
        rows["attribute"].append("capital")
        rows["value"].append(capital)
        rows["question"].append(question)
        rows["answer"].append(answer)
        rows["paraphrased_answer"].append(f"{capital} is the capital city of {country}.")
        rows["perturbed_answers"].append([f"{other} is the capital city of {country}." for other in wrong])
        rows["split"].append("world")
    world = Dataset.from_dict(rows)
    if split == "all":
        return world
    half = set(sorted(WORLD_CAPITALS)[WORLD_SPLITS.index(split) - 1::2])
    return world.filter(lambda row: row["entity"] in half)


def fact_is_correct(text: str, value: str) -> bool:
    """True when the answer states the fact: it contains the attribute value as a whole word."""
    return f" {value.lower()} " in f" {completion_text(text).lower().replace('.', ' ').replace(',', ' ')} "


def facts_accuracy(completions, values) -> float:
    """Percentage of answers that state their fact."""
    if len(completions) == 0:
        raise ValueError("facts_accuracy needs at least one completion.")
    return 100.0 * sum(fact_is_correct(c, v) for c, v in zip(completions, values, strict=True)) / len(completions)
