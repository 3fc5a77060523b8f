"""Invented documents for the compression tests (no dataset text)."""

from __future__ import annotations

INSTRUCTION = "Answer the question from the notes below. Reply in a few words."

SECTIONS: list[tuple[str, list[str]]] = [
    (
        "Marrow Point Light",
        [
            "Marrow Point Light is a stone lighthouse on the cliffs above Tallow Bay.",
            "Its lamp was first lit in the winter of 1887.",
            "The longest-serving keeper of the light was Ida Venn.",
            "The tower was painted with red and white bands in 1931.",
        ],
    ),
    (
        "Ida Venn",
        [
            "Ida Venn (1901 - 1978) was a lighthouse keeper and amateur astronomer.",
            "She was born in the fishing village of Castleby.",
            "Her notebooks on comets are kept in the Harwick museum.",
        ],
    ),
    (
        "Tallow Bay",
        [
            "Tallow Bay is a shallow bay known for its winter storms.",
            "Ferries cross the bay twice a day in summer.",
            "The bay freezes at its northern edge in very cold years.",
        ],
    ),
    (
        "Castleby Harbour",
        [
            "Castleby Harbour shelters a small fleet of crab boats.",
            "A breakwater of granite blocks protects its mouth.",
            "The harbour master rings a bell when fog comes in.",
        ],
    ),
    (
        "Harwick Museum",
        [
            "The Harwick museum holds maps, ship models and diaries of the coast.",
            "It opened in a former grain store in 1954.",
            "Entry is free on the first Sunday of each month.",
        ],
    ),
    (
        "Glass Floats",
        [
            "Glass floats once held fishing nets at the surface.",
            "Collectors prize the green ones made before 1940.",
            "Many wash up on the beaches after autumn gales.",
        ],
    ),
]
QUESTION = "In which village was the longest-serving keeper of Marrow Point Light born?"
GOLD = [
    "The longest-serving keeper of the light was Ida Venn.",
    "She was born in the fishing village of Castleby.",
]


def document(sections: list[tuple[str, list[str]]] = SECTIONS) -> str:
    return "\n\n".join(f"## {title}\n" + " ".join(sents) for title, sents in sections)


def prompt(question: str = QUESTION, repeat: int = 1) -> str:
    return f"{INSTRUCTION}\n\n" + "\n\n".join([document()] * repeat) + f"\n\nQuestion: {question}"


TOWNS = ("Ardwell", "Brisk", "Coldharbour", "Dunmere", "Eskby", "Fallow", "Greyholm", "Hask")
TRADES = ("rope", "salt", "slate", "wool", "herring", "cider", "glass", "timber")


def more_sections(count: int) -> list[tuple[str, list[str]]]:
    """Distinct invented sections (no two alike, so none is dropped as a duplicate)."""
    sections = []
    for i in range(count):
        town, trade = TOWNS[i % len(TOWNS)], TRADES[(i * 3) % len(TRADES)]
        name = f"{town} {trade.capitalize()} Works {i}"
        sections.append(
            (
                name,
                [
                    f"{name} was a {trade} maker founded in {1800 + 7 * i}.",
                    f"It employed {20 + i} people and shipped to {TOWNS[(i + 1) % len(TOWNS)]}.",
                    f"The works closed after a fire in the spring of {1900 + i}.",
                ],
            )
        )
    return sections


def long_prompt(question: str = QUESTION, extra: int = 24) -> str:
    sections = SECTIONS + more_sections(extra)
    return f"{INSTRUCTION}\n\n{document(sections)}\n\nQuestion: {question}"
