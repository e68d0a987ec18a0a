"""Project-owned generator of everyday English sentences for the synthetic emotional speech corpus.

The synthetic corpus is spoken by eSpeak NG in five emotions (Neutral, Angry, Happy, Sad, Surprise)
and the emotion is carried by prosody alone, so the texts here are plain, emotion-neutral, plausible
everyday English. Owning the text generator (instead of downloading a text corpus) keeps the corpus
license-free, offline and reproducible: the same ``(n, seed)`` always gives the same list, and a longer
list extends a shorter one. Train/validation/test splits are made downstream *by sentence*, so every
sentence returned is distinct (case-insensitively, ignoring punctuation) and can belong to exactly one
split.

The grammar has a dozen sentence structures (declaratives, yes/no and wh-questions, exclamations,
subordinate clauses, coordination, reported speech, imperatives, and sentences with numbers written in
digits) filled from hand-written word lists. Irregular plurals and past tenses are stored explicitly in
the lists rather than derived by rules; "a"/"an" is chosen from the following word, with the exceptions
listed in ``A_BEFORE_VOWEL_LETTER`` and ``AN_BEFORE_CONSONANT_LETTER``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate

__all__ = [
    "A_BEFORE_VOWEL_LETTER",
    "AN_BEFORE_CONSONANT_LETTER",
    "MAX_SENTENCES",
    "MAX_WORDS",
    "MIN_WORDS",
    "TEMPLATE_NAMES",
    "article",
    "generate_sentences",
    "sentence_key",
]

#: Largest ``n`` accepted. The grammar yields many millions of distinct sentences; this bound keeps
#: every request fast (rejection of repeats stays rare far below the grammar's size).
MAX_SENTENCES: int = 100_000
#: Inclusive bounds on the number of space-separated words in a sentence.
MIN_WORDS: int = 4
MAX_WORDS: int = 16

#: Words spelled with a vowel letter that take "a" (they start with a consonant sound).
A_BEFORE_VOWEL_LETTER: frozenset[str] = frozenset(
    {"one", "once", "university", "uniform", "unique", "useful", "usual", "european", "user"}
)
#: Words spelled with a consonant letter that take "an" (silent h).
AN_BEFORE_CONSONANT_LETTER: frozenset[str] = frozenset({"hour", "honest", "honor", "heir"})

Noun = tuple[str, str]  # (singular, plural)
Verb = tuple[str, str, str]  # (base, third-person singular present, past)

# --------------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------------

NAMES: tuple[str, ...] = (
    "Maria", "John", "Anna", "David", "Sarah", "Peter", "Emma", "James", "Lucy", "Thomas", "Laura",
    "Daniel", "Alice", "Michael", "Grace", "Robert", "Helen", "Paul", "Kate", "Simon", "Oliver",
    "Julia", "Henry", "Nina",
)

PEOPLE: tuple[Noun, ...] = (
    ("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("driver", "drivers"),
    ("neighbor", "neighbors"), ("student", "students"), ("child", "children"), ("woman", "women"),
    ("man", "men"), ("baker", "bakers"), ("nurse", "nurses"), ("pilot", "pilots"),
    ("artist", "artists"), ("engineer", "engineers"), ("officer", "officers"), ("cousin", "cousins"),
    ("friend", "friends"), ("guest", "guests"), ("waiter", "waiters"), ("visitor", "visitors"),
    ("boy", "boys"), ("girl", "girls"), ("person", "people"), ("gardener", "gardeners"),
    ("manager", "managers"),
)
#: People nouns that are jobs ("Maria is a nurse").
PROFESSIONS: tuple[str, ...] = (
    "teacher", "doctor", "farmer", "driver", "baker", "nurse", "pilot", "artist", "engineer",
    "officer", "waiter", "gardener", "manager",
)
#: People nouns that read naturally after a possessive ("my cousin", "our doctor").
RELATIONAL_PEOPLE: frozenset[str] = frozenset(
    {"teacher", "doctor", "neighbor", "cousin", "friend", "guest", "manager", "nurse", "gardener"}
)

ANIMALS: tuple[Noun, ...] = (
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"), ("mouse", "mice"),
    ("sheep", "sheep"), ("goose", "geese"), ("fish", "fish"), ("rabbit", "rabbits"), ("owl", "owls"),
    ("duck", "ducks"), ("fox", "foxes"), ("deer", "deer"), ("cow", "cows"), ("goat", "goats"),
)

THINGS: tuple[Noun, ...] = (
    ("book", "books"), ("box", "boxes"), ("key", "keys"), ("letter", "letters"), ("bag", "bags"),
    ("cup", "cups"), ("chair", "chairs"), ("lamp", "lamps"), ("umbrella", "umbrellas"),
    ("knife", "knives"), ("shelf", "shelves"), ("photo", "photos"), ("map", "maps"),
    ("ticket", "tickets"), ("bottle", "bottles"), ("basket", "baskets"), ("candle", "candles"),
    ("blanket", "blankets"), ("watch", "watches"), ("dish", "dishes"), ("envelope", "envelopes"),
    ("notebook", "notebooks"), ("pencil", "pencils"), ("clock", "clocks"), ("radio", "radios"),
    ("jacket", "jackets"), ("hat", "hats"), ("shoe", "shoes"), ("ladder", "ladders"),
    ("towel", "towels"), ("mirror", "mirrors"), ("parcel", "parcels"), ("spoon", "spoons"),
    ("scarf", "scarves"), ("wallet", "wallets"), ("kettle", "kettles"), ("brush", "brushes"),
    ("glove", "gloves"), ("pillow", "pillows"), ("oven tray", "oven trays"),
)

FOODS: tuple[Noun, ...] = (
    ("apple", "apples"), ("orange", "oranges"), ("sandwich", "sandwiches"), ("tomato", "tomatoes"),
    ("potato", "potatoes"), ("egg", "eggs"), ("onion", "onions"), ("loaf", "loaves"),
    ("cake", "cakes"), ("pear", "pears"), ("banana", "bananas"), ("lemon", "lemons"),
    ("carrot", "carrots"), ("pie", "pies"), ("peach", "peaches"), ("melon", "melons"),
)

VEHICLES: tuple[Noun, ...] = (
    ("bus", "buses"), ("train", "trains"), ("ferry", "ferries"), ("plane", "planes"),
    ("boat", "boats"), ("tram", "trams"),
)

EVENTS: tuple[str, ...] = (
    "meeting", "lesson", "concert", "class", "film", "match", "lecture", "game", "show", "rehearsal",
)

BUILDINGS: tuple[str, ...] = ("hotel", "school", "library", "hospital", "museum", "office building")
BUILDING_PARTS: tuple[str, ...] = ("rooms", "windows", "floors", "doors", "desks")

# Verbs taking an ordinary object (things), food, a person, or an animal as object.
VERBS_OBJECT: tuple[Verb, ...] = (
    ("find", "finds", "found"), ("buy", "buys", "bought"), ("bring", "brings", "brought"),
    ("carry", "carries", "carried"), ("move", "moves", "moved"), ("drop", "drops", "dropped"),
    ("hold", "holds", "held"), ("keep", "keeps", "kept"), ("take", "takes", "took"),
    ("leave", "leaves", "left"), ("sell", "sells", "sold"), ("show", "shows", "showed"),
    ("hide", "hides", "hid"), ("lose", "loses", "lost"), ("check", "checks", "checked"),
    ("pack", "packs", "packed"), ("borrow", "borrows", "borrowed"), ("return", "returns", "returned"),
    ("forget", "forgets", "forgot"), ("choose", "chooses", "chose"), ("need", "needs", "needed"),
    ("want", "wants", "wanted"), ("see", "sees", "saw"), ("notice", "notices", "noticed"),
    ("clean", "cleans", "cleaned"), ("wrap", "wraps", "wrapped"), ("fetch", "fetches", "fetched"),
    ("lend", "lends", "lent"), ("pick up", "picks up", "picked up"),
    ("look for", "looks for", "looked for"), ("put away", "puts away", "put away"),
)
VERBS_FOOD: tuple[Verb, ...] = (
    ("eat", "eats", "ate"), ("cook", "cooks", "cooked"), ("cut", "cuts", "cut"),
    ("buy", "buys", "bought"), ("bring", "brings", "brought"), ("carry", "carries", "carried"),
    ("share", "shares", "shared"), ("find", "finds", "found"), ("need", "needs", "needed"),
    ("want", "wants", "wanted"), ("take", "takes", "took"), ("keep", "keeps", "kept"),
    ("sell", "sells", "sold"), ("choose", "chooses", "chose"), ("pack", "packs", "packed"),
    ("order", "orders", "ordered"), ("taste", "tastes", "tasted"),
)
VERBS_PERSON: tuple[Verb, ...] = (
    ("meet", "meets", "met"), ("visit", "visits", "visited"), ("help", "helps", "helped"),
    ("call", "calls", "called"), ("ask", "asks", "asked"), ("see", "sees", "saw"),
    ("follow", "follows", "followed"), ("invite", "invites", "invited"), ("wake", "wakes", "woke"),
    ("greet", "greets", "greeted"), ("join", "joins", "joined"), ("phone", "phones", "phoned"),
    ("thank", "thanks", "thanked"), ("teach", "teaches", "taught"),
)
VERBS_ANIMAL: tuple[Verb, ...] = (
    ("feed", "feeds", "fed"), ("find", "finds", "found"), ("see", "sees", "saw"),
    ("watch", "watches", "watched"), ("follow", "follows", "followed"), ("call", "calls", "called"),
    ("wash", "washes", "washed"), ("brush", "brushes", "brushed"),
    ("notice", "notices", "noticed"),
)
# Intransitive verbs; the flag says whether an animal can be the subject.
VERBS_INTRANSITIVE: tuple[tuple[Verb, bool], ...] = (
    (("walk", "walks", "walked"), True), (("sleep", "sleeps", "slept"), True),
    (("wait", "waits", "waited"), True), (("run", "runs", "ran"), True),
    (("sit", "sits", "sat"), True), (("nap", "naps", "napped"), True),
    (("rest", "rests", "rested"), True), (("stay", "stays", "stayed"), True),
    (("play", "plays", "played"), True), (("hide", "hides", "hid"), True),
    (("eat", "eats", "ate"), True), (("arrive", "arrives", "arrived"), False),
    (("work", "works", "worked"), False), (("write", "writes", "wrote"), False),
    (("jog", "jogs", "jogged"), False), (("study", "studies", "studied"), False),
    (("cook", "cooks", "cooked"), False), (("sing", "sings", "sang"), False),
    (("dance", "dances", "danced"), False), (("shop", "shops", "shopped"), False),
    (("paint", "paints", "painted"), False), (("speak", "speaks", "spoke"), False),
)
# Verbs for "Please <verb> the <thing> to <place>" style sentences.
VERBS_TO_PLACE: tuple[Verb, ...] = (
    ("bring", "brings", "brought"), ("carry", "carries", "carried"), ("take", "takes", "took"),
    ("move", "moves", "moved"), ("send", "sends", "sent"), ("return", "returns", "returned"),
)
# Verbs for "<verb> the <thing> on the shelf" style sentences.
VERBS_AT_SPOT: tuple[Verb, ...] = (
    ("put", "puts", "put"), ("leave", "leaves", "left"), ("keep", "keeps", "kept"),
    ("hide", "hides", "hid"), ("find", "finds", "found"), ("set", "sets", "set"),
)

THING_ADJS: tuple[str, ...] = (
    "old", "new", "small", "large", "big", "little", "red", "blue", "green", "yellow", "brown",
    "white", "black", "grey", "orange", "purple", "pink", "heavy", "clean", "dusty", "plain", "shiny",
    "cheap", "expensive", "spare", "wet", "dry", "tiny", "huge", "useful",
)
#: Adjectives that also work after "is"/"was" for things.
THING_PRED_ADJS: tuple[str, ...] = tuple(a for a in THING_ADJS if a not in ("spare", "little", "plain"))
EXCLAIM_ADJS: tuple[str, ...] = (
    "old", "new", "small", "large", "big", "heavy", "shiny", "tiny", "huge", "clean", "dusty",
    "expensive", "cheap", "plain", "useful",
)
FOOD_ADJS: tuple[str, ...] = ("fresh", "large", "small", "warm", "cold", "big", "whole")
PERSON_ADJS: tuple[str, ...] = ("young", "old", "new", "tall", "local", "elderly")
ANIMAL_ADJS: tuple[str, ...] = ("small", "old", "young", "brown", "white", "black", "grey", "big")
PERSON_STATES: tuple[str, ...] = (
    "busy", "tired", "ready", "late", "early", "hungry", "awake", "calm", "quiet", "asleep", "away",
    "outside",
)
FREQUENCY_ADVERBS: tuple[str, ...] = ("usually", "often", "sometimes", "always", "rarely")

# (preposition, destination); the destination also works after "to".
PLACES: tuple[tuple[str, str], ...] = (
    ("in", "the kitchen"), ("in", "the garden"), ("at", "the station"), ("at", "the market"),
    ("near", "the river"), ("in", "the library"), ("at", "the office"), ("in", "the park"),
    ("in", "the hall"), ("at", "the airport"), ("at", "the bakery"), ("at", "the hotel"),
    ("in", "the museum"), ("near", "the bridge"), ("in", "the village"), ("on", "the beach"),
    ("at", "the school"), ("at", "the post office"), ("in", "the square"), ("at", "the harbor"),
    ("at", "the farm"), ("in", "the city center"),
)
CITIES: tuple[str, ...] = (
    "London", "Paris", "Dublin", "Madrid", "Boston", "Chicago", "Toronto", "Sydney", "Berlin",
    "Lisbon", "Denver", "Glasgow",
)
# Where a thing can sit.
SPOTS: tuple[str, ...] = (
    "on the table", "on the shelf", "in the drawer", "by the door", "under the bed",
    "in the cupboard", "on the floor", "in the car", "next to the sink", "behind the sofa",
    "in the hall", "near the window", "on the desk", "in the garage",
)

PAST_TIMES: tuple[str, ...] = (
    "yesterday", "last night", "this morning", "last week", "on Monday", "on Tuesday",
    "two days ago", "last summer", "after lunch", "earlier today", "at noon", "last year",
    "an hour ago", "on Saturday",
)
HABITUAL_TIMES: tuple[str, ...] = (
    "every morning", "every evening", "on Sundays", "on weekends", "after dinner",
    "before breakfast", "most days", "twice a week", "every day", "in the evenings",
    "once a month", "on Fridays",
)
FUTURE_TIMES: tuple[str, ...] = (
    "tomorrow", "next week", "on Friday", "later today", "tonight", "this weekend", "next month",
    "after lunch", "soon", "in the morning", "on Thursday",
)
PRESENT_TIMES: tuple[str, ...] = ("today", "this week", "now", "again", "at the moment")
DAYS: tuple[str, ...] = (
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
)
STREETS: tuple[str, ...] = (
    "Oak Street", "Hill Road", "Church Lane", "Park Avenue", "Mill Road", "Station Road",
    "Elm Street", "Bridge Street", "King Street", "Green Lane",
)
ORDINALS: tuple[str, ...] = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
)

# Subject pronouns with their agreement class: "1s" (I), "pl" (plural verb forms), "3s".
PRONOUNS: tuple[tuple[str, str], ...] = (
    ("I", "1s"), ("you", "pl"), ("we", "pl"), ("they", "pl"), ("he", "3s"), ("she", "3s"),
)
LISTENERS: tuple[str, ...] = ("me", "us", "them", "him", "her", "the teacher", "the manager")

_DETS_SG: tuple[str, ...] = (
    "the", "the", "the", "the", "a", "a", "this", "that", "my", "your", "his", "her", "our", "their",
    "NAME",
)
_DETS_PL: tuple[str, ...] = (
    "the", "the", "the", "some", "these", "those", "my", "our", "their", "two", "three", "a few",
    "several", "NAME",
)
_DETS_PERSON_SG: tuple[str, ...] = ("the", "the", "the", "a", "that")
_DETS_PERSON_PL: tuple[str, ...] = ("the", "the", "the", "some", "two", "three", "several")
# Possessive determiners, only for nouns naming a relation (my cousin, our teacher).
_DETS_RELATION_SG: tuple[str, ...] = ("the", "the", "a", "my", "our", "your", "her", "his")
_DETS_RELATION_PL: tuple[str, ...] = ("the", "the", "some", "two", "my", "our", "their")

# --------------------------------------------------------------------------------------------------
# Grammar helpers
# --------------------------------------------------------------------------------------------------


def article(word: str) -> str:
    """Return "a" or "an" for the word that follows the article."""
    w = word.lower()
    if w in AN_BEFORE_CONSONANT_LETTER:
        return "an"
    if w in A_BEFORE_VOWEL_LETTER:
        return "a"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


def sentence_key(sentence: str) -> str:
    """Case- and punctuation-insensitive identity of a sentence (used for distinctness)."""
    kept = "".join(ch for ch in sentence.lower() if ch.isalnum() or ch.isspace())
    return " ".join(kept.split())


def _finish(words: Sequence[str], end: str) -> str:
    text = " ".join(w for w in words if w)
    return text[0].upper() + text[1:] + end


def _present(verb: Verb, kind: str) -> str:
    return verb[1] if kind == "3s" else verb[0]


def _be_present(kind: str) -> str:
    return {"1s": "am", "3s": "is"}.get(kind, "are")


def _be_past(kind: str) -> str:
    return "was" if kind in ("1s", "3s") else "were"


def _do(kind: str) -> str:
    return "does" if kind == "3s" else "do"


def _np(
    rng: random.Random,
    noun: Noun,
    plural: bool,
    adjectives: Sequence[str] = (),
    adj_prob: float = 0.3,
    det: str | None = None,
    dets: tuple[Sequence[str], Sequence[str]] = (_DETS_SG, _DETS_PL),
) -> str:
    """Noun phrase: determiner, optional adjective, noun in the right number."""
    words = []
    if adjectives and rng.random() < adj_prob:
        words.append(rng.choice(adjectives))
    words.append(noun[1] if plural else noun[0])
    if det is None:
        det = rng.choice(dets[1] if plural else dets[0])
    if det == "a":
        det = article(words[0])
    elif det == "NAME":
        det = rng.choice(NAMES) + "'s"
    return " ".join([det, *words])


def _plural(rng: random.Random, p: float = 0.35) -> bool:
    return rng.random() < p


def _person_np(rng: random.Random, plural: bool, det: str | None = None) -> str:
    noun = rng.choice(PEOPLE)
    if noun[0] in RELATIONAL_PEOPLE:
        dets = (_DETS_RELATION_SG, _DETS_RELATION_PL)
    else:
        dets = (_DETS_PERSON_SG, _DETS_PERSON_PL)
    return _np(rng, noun, plural, PERSON_ADJS, 0.2, det, dets)


def _person_subject(rng: random.Random) -> tuple[str, str]:
    """A human subject and its agreement class ("1s", "3s", "pl")."""
    r = rng.random()
    if r < 0.3:
        return rng.choice(NAMES), "3s"
    if r < 0.55:
        return rng.choice(PRONOUNS)
    plural = _plural(rng)
    return _person_np(rng, plural), "pl" if plural else "3s"


def _third_person_subject(rng: random.Random) -> tuple[str, str]:
    """A name or a noun phrase (no pronouns), for sentence-initial and reported-speech use."""
    if rng.random() < 0.45:
        return rng.choice(NAMES), "3s"
    plural = _plural(rng)
    return _person_np(rng, plural), "pl" if plural else "3s"


def _animal_subject(rng: random.Random) -> tuple[str, str]:
    plural = _plural(rng)
    return _np(rng, rng.choice(ANIMALS), plural, ANIMAL_ADJS, 0.25), "pl" if plural else "3s"


def _thing_np(rng: random.Random, plural: bool, det: str | None = None,
              adj_prob: float = 0.3) -> str:
    return _np(rng, rng.choice(THINGS), plural, THING_ADJS, adj_prob, det)


def _verb_object(rng: random.Random) -> tuple[Verb, str]:
    """A transitive verb and an object noun phrase that suits it."""
    r = rng.random()
    if r < 0.5:
        return rng.choice(VERBS_OBJECT), _thing_np(rng, _plural(rng))
    if r < 0.7:
        return rng.choice(VERBS_FOOD), _np(rng, rng.choice(FOODS), _plural(rng), FOOD_ADJS)
    if r < 0.87:
        obj = rng.choice(NAMES) if rng.random() < 0.4 else _person_np(rng, _plural(rng))
        return rng.choice(VERBS_PERSON), obj
    animal = _np(rng, rng.choice(ANIMALS), _plural(rng), ANIMAL_ADJS, 0.2)
    return rng.choice(VERBS_ANIMAL), animal


def _place(rng: random.Random) -> str:
    prep, dest = rng.choice(PLACES)
    return f"{prep} {dest}"


def _destination(rng: random.Random) -> str:
    return rng.choice(CITIES) if rng.random() < 0.25 else rng.choice(PLACES)[1]


def _past_clause(rng: random.Random) -> str:
    """A short independent clause in the past tense."""
    r = rng.random()
    if r < 0.45:
        subj, _ = _person_subject(rng)
        verb, obj = _verb_object(rng)
        tail = _place(rng) if rng.random() < 0.3 else ""
        return " ".join(w for w in (subj, verb[2], obj, tail) if w)
    if r < 0.7:
        if rng.random() < 0.25:
            subj, _ = _animal_subject(rng)
            verb = rng.choice([v for v, animal_ok in VERBS_INTRANSITIVE if animal_ok])
        else:
            subj, _ = _person_subject(rng)
            verb = rng.choice(VERBS_INTRANSITIVE)[0]
        return f"{subj} {verb[2]} {_place(rng)}"
    if r < 0.85:
        subj, kind = _person_subject(rng)
        return f"{subj} {_be_past(kind)} {rng.choice(PERSON_STATES)}"
    plural = _plural(rng)
    thing = _thing_np(rng, plural, det="the", adj_prob=0.0)
    return f"{thing} {'were' if plural else 'was'} {rng.choice(THING_PRED_ADJS)}"


def _present_clause(rng: random.Random) -> str:
    """A short clause in the present tense (habits and states)."""
    subj, kind = _person_subject(rng)
    if rng.random() < 0.65:
        verb, obj = _verb_object(rng)
        return f"{subj} {_present(verb, kind)} {obj} {rng.choice(HABITUAL_TIMES)}"
    return f"{subj} {_be_present(kind)} {rng.choice(PERSON_STATES)} {rng.choice(PRESENT_TIMES)}"


def _future_clause(rng: random.Random) -> str:
    subj, _ = _person_subject(rng)
    verb, obj = _verb_object(rng)
    return f"{subj} will {verb[0]} {obj} {rng.choice(FUTURE_TIMES)}"


# --------------------------------------------------------------------------------------------------
# Templates: each returns one finished sentence
# --------------------------------------------------------------------------------------------------


def _t_past_action(rng: random.Random) -> str:
    """Past-tense transitive declarative, sometimes negated or with a fronted time."""
    subj, _ = _person_subject(rng)
    verb, obj = _verb_object(rng)
    vp = ["didn't", verb[0]] if rng.random() < 0.15 else [verb[2]]
    r = rng.random()
    place = _place(rng) if r < 0.75 else ""
    time = rng.choice(PAST_TIMES) if r >= 0.4 else ""
    if time and rng.random() < 0.2:
        return _finish([time + ",", subj, *vp, obj, place], ".")
    return _finish([subj, *vp, obj, place, time], ".")


def _t_habit(rng: random.Random) -> str:
    """Present-tense habitual declarative."""
    subj, kind = _person_subject(rng)
    verb, obj = _verb_object(rng)
    if rng.random() < 0.4:
        return _finish([subj, rng.choice(FREQUENCY_ADVERBS), _present(verb, kind), obj,
                        _place(rng)], ".")
    if rng.random() < 0.15:
        vp = [_do(kind) + "n't", verb[0]]
    else:
        vp = [_present(verb, kind)]
    place = _place(rng) if rng.random() < 0.3 else ""
    return _finish([subj, *vp, obj, place, rng.choice(HABITUAL_TIMES)], ".")


def _t_intransitive(rng: random.Random) -> str:
    """Intransitive declarative with a place and a time."""
    if rng.random() < 0.3:
        subj, kind = _animal_subject(rng)
        verb = rng.choice([v for v, animal_ok in VERBS_INTRANSITIVE if animal_ok])
    else:
        subj, kind = _person_subject(rng)
        verb = rng.choice(VERBS_INTRANSITIVE)[0]
    if rng.random() < 0.6:
        time = rng.choice(PAST_TIMES) if rng.random() < 0.7 else ""
        return _finish([subj, verb[2], _place(rng), time], ".")
    return _finish([subj, _present(verb, kind), _place(rng), rng.choice(HABITUAL_TIMES)], ".")


def _t_future(rng: random.Random) -> str:
    """Future with "will" or "going to"."""
    subj, kind = _person_subject(rng)
    verb, obj = _verb_object(rng)
    aux = ["will"] if rng.random() < 0.5 else [_be_present(kind), "going to"]
    place = _place(rng) if rng.random() < 0.3 else ""
    return _finish([subj, *aux, verb[0], obj, place, rng.choice(FUTURE_TIMES)], ".")


def _t_copula(rng: random.Random) -> str:
    """Descriptions with "be": states, locations, professions, existentials."""
    r = rng.random()
    past = rng.random() < 0.5
    if r < 0.25:
        plural = _plural(rng)
        thing = _thing_np(rng, plural, det="the", adj_prob=0.0)
        be = ("were" if plural else "was") if past else ("are" if plural else "is")
        where = _place(rng) if rng.random() < 0.5 else rng.choice(SPOTS)
        return _finish([thing, where, be, rng.choice(THING_PRED_ADJS)], ".")
    if r < 0.45:
        plural = _plural(rng)
        thing = _thing_np(rng, plural)
        be = ("were" if plural else "was") if past else ("are" if plural else "is")
        return _finish([thing, be, rng.choice(SPOTS)], ".")
    if r < 0.65:
        subj, kind = _person_subject(rng)
        if past:
            return _finish([subj, _be_past(kind), rng.choice(PERSON_STATES),
                            rng.choice(PAST_TIMES)], ".")
        return _finish([subj, _be_present(kind), rng.choice(PERSON_STATES),
                        rng.choice(PRESENT_TIMES)], ".")
    if r < 0.82:
        job = _np(rng, (rng.choice(PROFESSIONS), ""), False, PERSON_ADJS[:4], 0.2, det="a")
        where = rng.choice(("in " + rng.choice(CITIES), _place(rng), ""))
        return _finish([rng.choice(NAMES), "was" if past else "is", job, where], ".")
    plural = _plural(rng)
    thing = _thing_np(rng, plural, det="some" if plural else "a")
    be = ("were" if plural else "was") if past else ("are" if plural else "is")
    return _finish(["there", be, thing, rng.choice(SPOTS)], ".")


def _t_yes_no(rng: random.Random) -> str:
    """Yes/no questions with do-support, be, and modals."""
    r = rng.random()
    if r < 0.3:
        subj, _ = _person_subject(rng)
        verb, obj = _verb_object(rng)
        tail = _place(rng) if rng.random() < 0.5 else rng.choice(PAST_TIMES)
        return _finish(["did", subj, verb[0], obj, tail], "?")
    if r < 0.5:
        subj, kind = _person_subject(rng)
        verb, obj = _verb_object(rng)
        return _finish([_do(kind), subj, verb[0], obj, rng.choice(HABITUAL_TIMES)], "?")
    if r < 0.65:
        plural = _plural(rng)
        thing = _thing_np(rng, plural, det="the")
        if rng.random() < 0.5:
            return _finish(["are" if plural else "is", thing, rng.choice(SPOTS)], "?")
        return _finish(["were" if plural else "was", thing, rng.choice(THING_PRED_ADJS)], "?")
    if r < 0.8:
        subj, kind = _person_subject(rng)
        return _finish([_be_past(kind), subj,
                        _place(rng), rng.choice(PAST_TIMES)], "?")
    subj, _ = _person_subject(rng)
    verb, obj = _verb_object(rng)
    modal = rng.choice(("can", "could", "will", "should"))
    time = rng.choice(FUTURE_TIMES) if rng.random() < 0.6 else ""
    return _finish([modal, subj, verb[0], obj, time], "?")


def _t_wh(rng: random.Random) -> str:
    """Wh-questions: where, when, who, what, which, why, how many, how long, whose."""
    r = rng.random()
    if r < 0.12:
        subj, _ = _person_subject(rng)
        return _finish(["where did", subj, rng.choice(VERBS_OBJECT)[0], _thing_np(rng, _plural(rng), "the")], "?")
    if r < 0.22:
        plural = _plural(rng, 0.25)
        vehicle = _np(rng, rng.choice(VEHICLES), plural, det="the")
        verb = rng.choice((("leave", "leaves"), ("arrive", "arrives"), ("stop", "stops")))
        extra = rng.choice(("", "for " + rng.choice(CITIES), rng.choice(HABITUAL_TIMES),
                            rng.choice(FUTURE_TIMES)))
        if extra in ("tonight", "tomorrow", "soon", "next week", "next month", "later today",
                     "this weekend", "in the morning", "on Friday", "on Thursday", "after lunch"):
            return _finish(["when will", vehicle, verb[0], extra], "?")
        return _finish(["when", "do" if plural else "does", vehicle, verb[0], extra], "?")
    if r < 0.32:
        subj, _ = _person_subject(rng)
        verb = rng.choice(VERBS_INTRANSITIVE)[0]
        return _finish(["when did", subj, verb[0], _place(rng)], "?")
    if r < 0.44:
        verb, obj = _verb_object(rng)
        tail = rng.choice((_place(rng), rng.choice(PAST_TIMES)))
        return _finish(["who", verb[2], obj, tail], "?")
    if r < 0.56:
        subj, _ = _person_subject(rng)
        verb = rng.choice(VERBS_OBJECT + VERBS_FOOD)
        return _finish(["what did", subj, verb[0], _place(rng), rng.choice(("", *PAST_TIMES))], "?")
    if r < 0.66:
        subj, kind = _person_subject(rng)
        plural = _plural(rng)
        noun = rng.choice(THINGS)
        verb = rng.choice(VERBS_OBJECT)
        if rng.random() < 0.5:
            return _finish(["which", noun[1] if plural else noun[0], "did", subj, verb[0]], "?")
        return _finish(["which", noun[1] if plural else noun[0], _do(kind), subj, verb[0],
                        rng.choice(HABITUAL_TIMES)], "?")
    if r < 0.75:
        plural = _plural(rng)
        thing = _thing_np(rng, plural, det="the")
        be = rng.choice(("are", "were")) if plural else rng.choice(("is", "was"))
        return _finish(["why", be, thing, rng.choice((_place(rng), rng.choice(SPOTS)))], "?")
    if r < 0.84:
        subj, _ = _person_subject(rng)
        if rng.random() < 0.5:
            noun, verb = rng.choice(THINGS), rng.choice(VERBS_OBJECT)
        else:
            noun, verb = rng.choice(FOODS), rng.choice(VERBS_FOOD)
        return _finish(["how many", noun[1], "did", subj, verb[0], rng.choice(PAST_TIMES)], "?")
    if r < 0.93:
        subj, _ = _person_subject(rng)
        verb = rng.choice([v for v, _ok in VERBS_INTRANSITIVE if v[0] in ("wait", "stay", "work",
                                                                           "rest", "study", "sleep")])
        return _finish(["how long did", subj, verb[0], _place(rng)], "?")
    noun = rng.choice(THINGS)
    be = rng.choice(("is", "was"))
    return _finish(["whose", noun[0], be, rng.choice(("this", rng.choice(SPOTS)))], "?")


def _t_exclamation(rng: random.Random) -> str:
    """Exclamations with neutral wording."""
    r = rng.random()
    adj = rng.choice(EXCLAIM_ADJS)
    noun = rng.choice(THINGS)
    if r < 0.25:
        return _finish(["what", article(adj), adj, noun[0], rng.choice(("this is", "that was"))], "!")
    if r < 0.4:
        return _finish(["what", adj, noun[1], rng.choice(("these are", "those were"))], "!")
    if r < 0.55:
        plural = _plural(rng)
        return _finish(["how", adj, "the", noun[1] if plural else noun[0],
                        "are" if plural else "is"], "!")
    if r < 0.7:
        return _finish(["that is", "a very", adj, noun[0]], "!")
    if r < 0.85:
        plural = _plural(rng)
        vehicle = rng.choice(VEHICLES)
        return _finish(["the", vehicle[1] if plural else vehicle[0],
                        "are" if plural else "is", rng.choice(("here", "already here",
                                                              "finally here", "on time"))], "!")
    subj, _ = _person_subject(rng)
    verb, obj = _verb_object(rng)
    return _finish([subj, verb[2], obj, "again"], "!")


def _t_subordinate(rng: random.Random) -> str:
    """Complex sentences with because, before, after, when, although, while, until."""
    conj = rng.choice(("because", "before", "after", "when", "although", "while", "until"))
    main, sub = _past_clause(rng), _past_clause(rng)
    if conj != "until" and rng.random() < 0.35:
        return _finish([conj, sub + ",", main], ".")
    return _finish([main, conj, sub], ".")


def _t_coordination(rng: random.Random) -> str:
    """Coordinated clauses (and, but, so) or a coordinated verb phrase."""
    if rng.random() < 0.3:
        subj, _ = _person_subject(rng)
        v1, o1 = _verb_object(rng)
        v2, o2 = _verb_object(rng)
        return _finish([subj, v1[2], o1, "and", v2[2], o2], ".")
    conj = rng.choice(("and", "but", "so"))
    return _finish([_past_clause(rng) + ",", conj, _past_clause(rng)], ".")


def _t_reported(rng: random.Random) -> str:
    """Reported speech: said that, told X that, thinks that, asked whether, according to."""
    r = rng.random()
    speaker, kind = _third_person_subject(rng)
    if r < 0.3:
        return _finish([speaker, "said that", _past_clause(rng)], ".")
    if r < 0.45:
        return _finish([speaker, "told", rng.choice(LISTENERS), "that", _past_clause(rng)], ".")
    if r < 0.6:
        verb = rng.choice((("think", "thinks", "thought"), ("know", "knows", "knew"),
                           ("hear", "hears", "heard")))
        return _finish([speaker, _present(verb, kind), "that", _present_clause(rng)], ".")
    if r < 0.72:
        return _finish([speaker, rng.choice(("asked whether", "asked if", "wondered whether")),
                        _past_clause(rng)], ".")
    if r < 0.86:
        return _finish([speaker, rng.choice(("mentioned that", "explained that", "wrote that")),
                        _future_clause(rng)], ".")
    return _finish(["according to", rng.choice(NAMES) + ",", _past_clause(rng)], ".")


def _t_imperative(rng: random.Random) -> str:
    """Polite requests and instructions."""
    r = rng.random()
    plural = _plural(rng)
    if r < 0.3:
        verb = rng.choice(VERBS_TO_PLACE)
        return _finish(["please", verb[0], _thing_np(rng, plural, "the"), "to", _destination(rng)], ".")
    if r < 0.55:
        verb = rng.choice(VERBS_AT_SPOT[:4])
        return _finish([verb[0], _thing_np(rng, plural, "the"), rng.choice(SPOTS) + ",", "please"], ".")
    if r < 0.75:
        return _finish(["don't forget", _thing_np(rng, plural, "the"), rng.choice(FUTURE_TIMES)], ".")
    verb, obj = _verb_object(rng)
    return _finish(["remember to", verb[0], obj, rng.choice(FUTURE_TIMES)], ".")


def _t_number(rng: random.Random) -> str:
    """Sentences containing a number written in digits."""
    r = rng.random()
    if r < 0.12:
        noun = rng.choice(THINGS + FOODS + ANIMALS)
        where = _place(rng) if rng.random() < 0.5 else rng.choice(SPOTS)
        return _finish(["there", rng.choice(("are", "were")), str(rng.randint(2, 60)), noun[1],
                        where], ".")
    if r < 0.24:
        vehicle = rng.choice(VEHICLES)[0]
        dest = "to " + rng.choice(CITIES) if rng.random() < 0.6 else ""
        when = rng.choice(("", "every day", "on " + rng.choice(DAYS), "on weekdays"))
        return _finish(["the", vehicle, dest, "leaves at", str(rng.randint(1, 12)), "o'clock",
                        when], ".")
    if r < 0.36:
        subj, _ = _person_subject(rng)
        if rng.random() < 0.5:
            noun, verb = rng.choice(FOODS), rng.choice(VERBS_FOOD)
        else:
            noun, verb = rng.choice(THINGS), rng.choice(VERBS_OBJECT)
        return _finish([subj, verb[2], str(rng.randint(2, 50)), noun[1], rng.choice(PAST_TIMES)], ".")
    if r < 0.46:
        subj, _ = _person_subject(rng)
        return _finish([subj, "waited for", str(rng.randint(2, 90)), "minutes", _place(rng)], ".")
    if r < 0.56:
        event = rng.choice(EVENTS)
        return _finish(["the", event, rng.choice(("starts", "ends")), "at",
                        str(rng.randint(1, 12)), "o'clock on", rng.choice(DAYS)], ".")
    if r < 0.64:
        return _finish([rng.choice(NAMES), rng.choice(("lives", "lived", "works")), "at",
                        str(rng.randint(1, 250)), rng.choice(STREETS)], ".")
    if r < 0.71:
        return _finish(["room", str(rng.randint(101, 599)), "is on the", rng.choice(ORDINALS),
                        "floor"], ".")
    if r < 0.79:
        if rng.random() < 0.5:
            return _finish([_thing_np(rng, False, "the"), "costs", str(rng.randint(2, 99)),
                            "dollars"], ".")
        return _finish([_thing_np(rng, True, "these"), "cost", str(rng.randint(2, 99)),
                        "dollars each"], ".")
    if r < 0.86:
        return _finish(["in", str(rng.randint(1960, 2023)) + ",", rng.choice(NAMES),
                        rng.choice(("moved to", "traveled to", "worked in", "studied in")),
                        rng.choice(CITIES)], ".")
    if r < 0.93:
        subj, kind = _person_subject(rng)
        noun = rng.choice(THINGS + FOODS)
        return _finish([subj, _present(("need", "needs", "needed"), kind), str(rng.randint(2, 30)),
                        "more", noun[1], "for the", rng.choice(EVENTS)], ".")
    return _finish(["the", rng.choice(BUILDINGS), rng.choice(("has", "had")),
                    str(rng.randint(3, 400)), rng.choice(BUILDING_PARTS)], ".")


_TEMPLATES: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (_t_past_action, 12.0),
    (_t_habit, 8.0),
    (_t_intransitive, 8.0),
    (_t_future, 6.0),
    (_t_copula, 8.0),
    (_t_yes_no, 9.0),
    (_t_wh, 9.0),
    (_t_exclamation, 5.0),
    (_t_subordinate, 10.0),
    (_t_coordination, 8.0),
    (_t_reported, 8.0),
    (_t_imperative, 5.0),
    (_t_number, 11.0),
)
#: Names of the sentence templates (structures) the grammar draws from.
TEMPLATE_NAMES: tuple[str, ...] = tuple(f.__name__.removeprefix("_t_") for f, _ in _TEMPLATES)
_FUNCS = tuple(f for f, _ in _TEMPLATES)
_CUM_WEIGHTS = tuple(accumulate(w for _, w in _TEMPLATES))


def _stream(seed: int) -> Iterator[str]:
    """Endless deterministic stream of well-formed (length-checked) sentences, repeats included."""
    rng = random.Random(seed)
    while True:
        sentence = rng.choices(_FUNCS, cum_weights=_CUM_WEIGHTS)[0](rng)
        if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
            yield sentence


def generate_sentences(n: int, seed: int) -> list[str]:
    """n distinct sentences, deterministic for a given (n, seed); the first m of generate_sentences(n, s) equal generate_sentences(m, s) for m <= n."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > MAX_SENTENCES:
        raise ValueError(f"n={n} exceeds the {MAX_SENTENCES} distinct sentences this grammar supplies")
    out: list[str] = []
    seen: set[str] = set()
    budget = 20 * n + 1000  # far above what is needed; guards against an exhausted grammar
    stream = _stream(seed)
    while len(out) < n:
        sentence = next(stream)
        budget -= 1
        if budget < 0:
            raise ValueError(f"could not draw {n} distinct sentences for seed {seed}")
        key = sentence_key(sentence)
        if key not in seen:
            seen.add(key)
            out.append(sentence)
    return out
