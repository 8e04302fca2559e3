"""Generated alpaca records for the benchmarks: instructions, an optional input, answers of log-normal length
(median ~90 words, a tail past 512 tokens), some code and list answers with line breaks, ~3% exact copies of
earlier records and ~2% copies differing only in case and spacing. Seeded, so every run gets the same records."""

import random

_COMMON = (
    "the a an of to in and is for on with that as it be this are by or from at your can will which you "
    "not more their they have has one two when use make time each other how these some what about into "
    "than first also most many people like way just any over new only such because very through where "
    "between after before while should could would may must well both those every often however example"
).split()
_TOPIC = (
    "climate energy solar battery network protocol database index query cache memory process thread kernel "
    "compiler function variable recursion algorithm sorting graph vertex matrix vector gradient neuron "
    "protein enzyme genome photosynthesis ecosystem volcano glacier hurricane economy inflation interest "
    "market budget invoice contract employee customer marketing strategy leadership negotiation recipe "
    "flour oven garlic tomato marathon training muscle nutrition vitamin history empire revolution treaty "
    "parliament poetry metaphor novel character chapter telescope galaxy planet orbit gravity quantum "
    "photon electron molecule catalyst reaction temperature pressure velocity acceleration friction"
).split()
_VERBS = ("explain describe summarize compare list write translate classify rewrite generate outline "
          "suggest identify calculate evaluate").split()
_CODE = [
    "def {0}(items):\n    result = []\n    for item in items:\n        if item > {1}:\n"
    "            result.append(item * 2)\n    return result",
    "SELECT {0}, COUNT(*) AS total\nFROM orders\nWHERE amount > {1}\nGROUP BY {0}\nORDER BY total DESC;",
    "for (let i = 0; i < {1}; i++) {{\n  console.log(`{0} ${{i}}`);\n}}",
]


def _sentence(rng: random.Random, words: int) -> str:
    picked = [rng.choice(_TOPIC) if rng.random() < 0.3 else rng.choice(_COMMON) for _ in range(max(1, words))]
    if rng.random() < 0.1:
        picked.insert(rng.randrange(len(picked)), str(rng.randint(2, 2025)))
    return " ".join(picked).capitalize() + rng.choice([".", ".", ".", "!", "?"])


def _text(rng: random.Random, words: int) -> str:
    sentences, left = [], words
    while left > 0:
        length = min(left, rng.randint(6, 24))
        sentences.append(_sentence(rng, length))
        left -= length
    return " ".join(sentences)


def _answer(rng: random.Random) -> str:
    words = max(3, int(rng.lognormvariate(4.5, 0.9)))  # median ~90 words, a few past 512 tokens
    kind = rng.random()
    if kind < 0.08:
        code = rng.choice(_CODE).format(rng.choice(_TOPIC), rng.randint(1, 100))
        return f"{_text(rng, words // 3)}\n\n```\n{code}\n```\n\n{_text(rng, words // 3)}"
    if kind < 0.25:
        items = [f"{number}. {_text(rng, max(3, words // 6))}" for number in range(1, rng.randint(3, 7))]
        return _text(rng, max(5, words // 4)) + "\n" + "\n".join(items)
    return _text(rng, words)


def alpaca_records(count: int, seed: int) -> list:
    """Alpaca records with varied lengths, ~3% exact duplicates and ~2% case/spacing variants of earlier ones."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        roll = rng.random()
        if records and roll < 0.03:
            records.append(dict(rng.choice(records)))
            continue
        if records and roll < 0.05:
            original = rng.choice(records)
            records.append({key: "  ".join(value.upper().split()) if key == "instruction" else value
                            for key, value in original.items()})
            continue
        instruction = f"{rng.choice(_VERBS).capitalize()} {_text(rng, int(rng.lognormvariate(2.4, 0.5)))}"
        context = _text(rng, int(rng.lognormvariate(3.0, 0.8))) if rng.random() < 0.4 else ""
        records.append({"instruction": instruction, "input": context, "output": _answer(rng)})
    return records
