"""The domains of the built-in benchmark: vocabulary, sentence templates and one domain-specific rule each.

A domain's rule is a local container unit whose size its questions never state ("3 trays of rolls"; in the bakery a
tray always holds 6). Only that domain's rationales teach it, with a step such as "A tray holds 6 rolls." before the
first equation that uses it. The general corpus (``GENERAL``) uses the same operations with generic containers whose
size is always stated ("3 boxes of 6 marbles") and never names a domain unit.

Placeholders: {name} {item} {a} (an amount added, subtracted or started with) {m} (a factor) {d} (a divisor)
{n} (a number of containers) {units} (the container word, plural) {s} (the stated container size, GENERAL only).
The paper's private data sets are real reasoning corpora; these synthetic domains are ours (see ``benchmark.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

OPS = ("start", "start_units", "add", "sub", "mul", "div", "add_units", "sub_units", "ask")


@dataclass(frozen=True)
class Rule:
    """A container ``unit`` (plural ``units``) that always holds ``size`` items; ``statement`` is the step that
    states it, formatted with ``size`` and ``item``."""

    unit: str
    units: str
    size: int
    statement: str = "A {unit} holds {size} {item}."

    def state(self, item: str) -> str:
        return self.statement.format(unit=self.unit, size=self.size, item=item)

    def to_json(self) -> dict:
        return {"unit": self.unit, "units": self.units, "size": self.size, "statement": self.statement}


@dataclass(frozen=True)
class Domain:
    """Names, item nouns, templates per operation (``OPS``) and the rule (None for the general corpus, whose
    containers come from ``containers`` with a stated size)."""

    name: str
    names: tuple[str, ...]
    items: tuple[str, ...]
    templates: dict[str, tuple[str, ...]]
    rule: Rule | None = None
    containers: tuple[str, ...] = ()

    def __post_init__(self):
        missing = [op for op in OPS if not self.templates.get(op)]
        if missing:
            raise ValueError(f"domain {self.name!r}: no templates for {missing}")
        if self.rule is not None and any("{s}" in t for ts in self.templates.values() for t in ts):
            raise ValueError(f"domain {self.name!r}: a rule domain must never state its container size")


DOMAINS: dict[str, Domain] = {
    "bakery": Domain(
        name="bakery",
        names=("Mia", "Omar", "Lena", "Ravi", "Ada", "Hugo", "Nora", "Felix"),
        items=("rolls", "muffins", "buns", "cookies", "bagels", "scones"),
        rule=Rule("tray", "trays", 6),
        templates={
            "start": ("{name} has {a} {item} on the counter.", "There are {a} {item} in {name}'s bakery."),
            "start_units": ("{name} bakes {n} {units} of {item}.",
                            "{name} takes {n} {units} of {item} out of the oven."),
            "add": ("{name} bakes {a} more {item}.", "A helper brings {name} {a} more {item}."),
            "sub": ("{name} sells {a} {item}.", "Customers buy {a} of the {item}."),
            "mul": ("A big order comes in, and {name} ends up with {m} times as many {item}.",),
            "div": ("{name} packs the {item} equally into {d} paper bags and keeps one bag.",),
            "add_units": ("{name} bakes {n} more {units} of {item}.",),
            "sub_units": ("{name} sells {n} {units} of {item}.",),
            "ask": ("How many {item} does {name} have now?", "How many {item} are in the bakery now?"),
        },
    ),
    "farm": Domain(
        name="farm",
        names=("Tom", "Nia", "Sam", "Ines", "Joe", "Rosa", "Ben", "Kai"),
        items=("eggs", "apples", "pears", "potatoes", "onions", "plums"),
        rule=Rule("crate", "crates", 8),
        templates={
            "start": ("{name} has {a} {item} in the barn.", "{name} picks {a} {item}."),
            "start_units": ("{name} fills {n} {units} with {item}.",
                            "{name} loads {n} {units} of {item} onto the cart."),
            "add": ("{name} picks {a} more {item}.", "A neighbour gives {name} {a} more {item}."),
            "sub": ("{name} trades away {a} {item}.", "{name} cooks {a} of the {item}."),
            "mul": ("After the harvest, {name} has {m} times as many {item}.",),
            "div": ("{name} splits the {item} equally among {d} market stalls and keeps one stall's share.",),
            "add_units": ("{name} fills {n} more {units} with {item}.",),
            "sub_units": ("{name} ships {n} {units} of {item} to the market.",),
            "ask": ("How many {item} does {name} have now?", "How many {item} are on the farm now?"),
        },
    ),
    "library": Domain(
        name="library",
        names=("Zoe", "Ivan", "Maya", "Leo", "Priya", "Theo", "Alma", "Yusuf"),
        items=("books", "novels", "atlases", "comics", "magazines", "journals"),
        rule=Rule("shelf", "shelves", 7),
        templates={
            "start": ("{name} counts {a} {item} at the library.", "The library lends {name} {a} {item}."),
            "start_units": ("{name} sets up {n} {units} of {item}.", "{name} dusts {n} {units} of {item}."),
            "add": ("{name} receives {a} more {item}.", "Donors give {name} {a} more {item}."),
            "sub": ("Readers borrow {a} of {name}'s {item}.", "{name} lends out {a} {item}."),
            "mul": ("After a donation, {name} has {m} times as many {item}.",),
            "div": ("{name} splits the {item} equally among {d} reading rooms and keeps one room's share.",),
            "add_units": ("{name} sets up {n} more {units} of {item}.",),
            "sub_units": ("Readers borrow {n} {units} of {name}'s {item}.",),
            "ask": ("How many {item} does {name} have now?", "How many {item} does {name} look after now?"),
        },
    ),
    "workshop": Domain(
        name="workshop",
        names=("Otto", "Ana", "Raj", "Elif", "Max", "June", "Bruno", "Sara"),
        items=("screws", "bolts", "nails", "hinges", "washers", "springs"),
        rule=Rule("kit", "kits", 4),
        templates={
            "start": ("{name} has {a} {item} on the bench.", "{name} counts {a} {item} in the workshop."),
            "start_units": ("{name} opens {n} {units} of {item}.", "{name} orders {n} {units} of {item}."),
            "add": ("{name} buys {a} more {item}.", "A colleague hands {name} {a} more {item}."),
            "sub": ("{name} uses {a} {item} to fix a chair.", "{name} drops {a} {item} down a drain."),
            "mul": ("After a delivery, {name} has {m} times as many {item}.",),
            "div": ("{name} sorts the {item} equally into {d} drawers and keeps one drawer.",),
            "add_units": ("{name} opens {n} more {units} of {item}.",),
            "sub_units": ("{name} uses up {n} {units} of {item}.",),
            "ask": ("How many {item} does {name} have now?", "How many {item} are on {name}'s bench now?"),
        },
    ),
    "garden": Domain(
        name="garden",
        names=("Iris", "Noah", "Lila", "Vera", "Eli", "Hana", "Dev", "Rhea"),
        items=("tulips", "daisies", "ferns", "lilies", "seedlings", "herbs"),
        rule=Rule("planter", "planters", 3),
        templates={
            "start": ("{name} grows {a} {item}.", "There are {a} {item} in {name}'s garden."),
            "start_units": ("{name} plants {n} {units} of {item}.", "{name} waters {n} {units} of {item}."),
            "add": ("{name} plants {a} more {item}.", "A friend gives {name} {a} more {item}."),
            "sub": ("Rabbits eat {a} of {name}'s {item}.", "{name} picks {a} {item} for a vase."),
            "mul": ("After the rain, {name} has {m} times as many {item}.",),
            "div": ("{name} shares the {item} equally among {d} neighbours and keeps one share.",),
            "add_units": ("{name} plants {n} more {units} of {item}.",),
            "sub_units": ("{name} gives away {n} {units} of {item}.",),
            "ask": ("How many {item} does {name} have now?", "How many {item} grow in the garden now?"),
        },
    ),
    "harbor": Domain(
        name="harbor",
        names=("Finn", "Mara", "Olaf", "Sina", "Cole", "Ruth", "Ali", "Greta"),
        items=("crabs", "clams", "mussels", "lobsters", "oysters", "sardines"),
        rule=Rule("net", "nets", 5),
        templates={
            "start": ("{name} has {a} {item} on the boat.", "{name} catches {a} {item}."),
            "start_units": ("{name} pulls in {n} {units} of {item}.", "{name} hauls {n} {units} of {item} on deck."),
            "add": ("{name} catches {a} more {item}.", "Another boat gives {name} {a} more {item}."),
            "sub": ("{name} sells {a} {item} at the pier.", "{name} throws {a} small {item} back."),
            "mul": ("After a good tide, {name} has {m} times as many {item}.",),
            "div": ("{name} splits the {item} equally among {d} crew members and keeps one share.",),
            "add_units": ("{name} pulls in {n} more {units} of {item}.",),
            "sub_units": ("{name} sells {n} {units} of {item} at the pier.",),
            "ask": ("How many {item} does {name} have now?", "How many {item} are on {name}'s boat now?"),
        },
    ),
}

# The default benchmark uses the first four; more clients take more of DOMAINS before wrapping around.
DEFAULT_NUM_DOMAINS = 4

GENERAL = Domain(
    name="general",
    names=("Alex", "Jamie", "Robin", "Casey", "Taylor", "Jordan", "Morgan", "Riley", "Quinn", "Avery"),
    items=("marbles", "stickers", "pencils", "stones", "cards", "beads", "coins", "shells", "buttons", "ribbons"),
    containers=("boxes", "bags", "packs", "jars", "baskets", "tins"),
    templates={
        "start": ("{name} has {a} {item}.", "{name} collects {a} {item}."),
        "start_units": ("{name} has {n} {units} of {s} {item}.", "{name} buys {n} {units} with {s} {item} in each."),
        "add": ("{name} finds {a} more {item}.", "{name} gets {a} more {item}."),
        "sub": ("{name} gives away {a} {item}.", "{name} loses {a} {item}."),
        "mul": ("Then {name} has {m} times as many {item}.",),
        "div": ("{name} splits the {item} equally into {d} piles and keeps one pile.",),
        "add_units": ("{name} gets {n} more {units} of {s} {item}.",
                      "{name} gets {n} more {units} with {s} {item} in each."),
        "sub_units": ("{name} gives away {n} {units} of {s} {item}.",),
        "ask": ("How many {item} does {name} have now?", "How many {item} does {name} have in the end?"),
    },
)
