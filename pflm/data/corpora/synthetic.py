"""Seeded synthetic voice-assistant transcripts with per-user contacts, places, tastes and habits (fast tests)."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

CONTACTS = (
    "mom dad grandma grandpa sister brother auntie uncle honey babe boss alex sam jordan taylor casey morgan riley "
    "jamie chris pat emma olivia ava sophia isabella mia charlotte amelia harper evelyn abigail emily elizabeth sofia "
    "ella madison scarlett victoria aria grace chloe camila penelope layla liam noah william james oliver benjamin "
    "elijah lucas mason logan ethan jacob michael daniel henry jackson sebastian aiden matthew samuel david joseph "
    "carter owen wyatt john jack luke jayden dylan grayson levi isaac gabriel julian mateo anthony jaxon lincoln "
    "joshua christopher andrew theodore caleb ryan asher nathan thomas leo isaiah charles josiah hudson christian "
    "hunter connor eli ezra aaron landon adrian jonathan nolan jeremiah easton elias colton cameron carson robert "
    "angel maverick nicholas dominic jaxson greyson adam ian austin santiago jordan cooper brayden roman evan ezekiel "
    "xavier jose jace jameson leonardo bryson axel everett parker kayden miles sawyer jason priya raj mei wei "
    "yuki hiro fatima omar aisha ahmed lena jonas lukas anna marta pablo lucia diego"
).split()
PLACES = (
    "work|home|the office|the gym|the airport|the train station|the mall|the grocery store|the pharmacy|the park|"
    "the beach|the library|the hospital|the dentist|the bank|the post office|the coffee shop|the bakery|the zoo|"
    "the museum|the stadium|the school|the university|the hardware store|the farmers market|the gas station|"
    "the pet store|the cinema|the bus stop|the harbor|downtown|the city center|main street|oak avenue|"
    "the pizza place|the sushi bar|the thai restaurant|the taco truck|grandma's house|the lake|the campsite|"
    "the ski resort|the car wash|the laundromat|the vet|the bookstore|the ice rink|the swimming pool|the golf course|"
    "the yoga studio|the concert hall|the night market|the ferry terminal|the hotel|the clinic|the daycare"
).split("|")
CITIES = (
    "paris|london|tokyo|new york|boston|chicago|seattle|denver|austin|miami|atlanta|dallas|houston|phoenix|"
    "san francisco|los angeles|san diego|portland|vancouver|toronto|montreal|mexico city|madrid|barcelona|lisbon|"
    "rome|milan|berlin|munich|vienna|prague|warsaw|stockholm|oslo|copenhagen|helsinki|dublin|edinburgh|amsterdam|"
    "brussels|zurich|geneva|athens|istanbul|cairo|nairobi|lagos|cape town|mumbai|delhi|bangalore|singapore|"
    "bangkok|hanoi|seoul|beijing|shanghai|sydney|melbourne|auckland|lima|bogota|santiago|buenos aires"
).split("|")
ARTISTS = (
    "taylor swift|the beatles|drake|adele|beyonce|ed sheeran|coldplay|billie eilish|bruno mars|kendrick lamar|"
    "rihanna|queen|nirvana|radiohead|daft punk|miles davis|john coltrane|norah jones|bob dylan|johnny cash|"
    "dolly parton|kacey musgraves|bad bunny|shakira|rosalia|bts|blackpink|arctic monkeys|the strokes|fleetwood mac|"
    "led zeppelin|pink floyd|metallica|ac dc|eminem|kanye west|frank ocean|sza|lizzo|dua lipa|harry styles|"
    "lady gaga|madonna|prince|stevie wonder|aretha franklin|bach|mozart|beethoven|chopin|debussy|"
    "lofi beats|jazz|classical music|rock music|hip hop|country music|podcasts|the news|white noise|rain sounds"
).split("|")
TIMES = (
    "five|six|six thirty|seven|seven fifteen|seven thirty|eight|eight thirty|nine|ten|eleven|noon|one|two|three|"
    "four|half past five|quarter to six|midnight"
).split("|")
THINGS = (
    "milk|eggs|bread|coffee|bananas|apples|butter|cheese|rice|pasta|tomatoes|onions|chicken|dog food|cat litter|"
    "paper towels|toothpaste|shampoo|batteries|light bulbs|yogurt|cereal|orange juice|spinach|avocados|garlic|"
    "flour|sugar|olive oil|dish soap|trash bags|ice cream|chocolate|tea|diapers|vitamins"
).split("|")
DEVICES = (
    "the lights|the kitchen lights|the bedroom lights|the heater|the fan|the tv|the air conditioner|the oven"
).split("|")
EVENTS = "dentist appointment|team meeting|yoga class|soccer practice|piano lesson|doctor's appointment|date night|" \
         "book club|parent teacher conference|haircut|flight|lunch with {c}|call with {c}|dinner with {c}"
EVENTS_L = EVENTS.split("|")
DAYS = (
    "today|tonight|tomorrow|monday|tuesday|wednesday|thursday|friday|saturday|sunday|this weekend|next week"
).split("|")
MESSAGES = (
    "i'm running late|i'm on my way|be there in ten minutes|can you call me back|love you|happy birthday|"
    "don't forget the keys|dinner is ready|see you soon|i'll pick up the kids|where are you|call me when you land|"
    "thanks so much|did you feed the dog|running five minutes behind|let's meet at {p}|i'm at {p}|good night|"
    "congratulations|can we talk later|i left my wallet at home|the meeting got moved"
).split("|")
TEMPLATES: tuple[str, ...] = (
    "call {c}", "call {c} on speaker", "text {c} {m}", "send a message to {c} saying {m}", "facetime {c}",
    "set an alarm for {t}", "wake me up at {t}", "set a timer for {n} minutes", "remind me to buy {x}",
    "add {x} to my shopping list", "play {a}", "play some {a}", "shuffle {a}", "play the latest album by {a}",
    "navigate to {p}", "directions to {p}", "how long will it take to get to {p}", "find a parking spot near {p}",
    "what's the weather in {w}", "what's the weather like {d}", "will it rain {d}", "what's the forecast for {w}",
    "turn on {v}", "turn off {v}", "dim {v}", "what's on my calendar {d}", "schedule {e} for {d} at {t}",
    "cancel my {e}", "remind me about my {e}", "what time is it in {w}", "how far is {w}", "skip this song",
    "volume up", "pause the music", "read my messages", "what's my next meeting", "call {c} back",
    "remind me to call {c} {d}", "order more {x}", "is {p} open right now", "play {a} in the kitchen",
)
NUMBERS = "two|three|five|ten|fifteen|twenty|thirty|forty five|sixty|ninety".split("|")

SentencesPerUser = int | tuple[int, int] | Callable[[np.random.Generator], int]


def _pick(rng: np.random.Generator, pool: tuple[str, ...] | list[str], k: int) -> list[str]:
    return [pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]


def _count(spec: SentencesPerUser, rng: np.random.Generator) -> int:
    if callable(spec):
        return max(1, int(spec(rng)))
    if isinstance(spec, tuple):
        lo, hi = spec
        return int(rng.integers(lo, hi + 1))
    return int(spec)


def _style(text: str, rng: np.random.Generator) -> str:
    """Occasionally add capitals and punctuation, as typed assistant logs have, so normalisation has work to do."""
    r = rng.random()
    if r < 0.3:
        text = text[0].upper() + text[1:]
    if r < 0.15:
        text += "?" if text.startswith(("What", "How", "Is", "Will")) else "."
    elif r > 0.95:
        text += "!"
    return text


def user_rows(index: int, spec: SentencesPerUser, seed: int, width: int = 7) -> list[tuple[str, str]]:
    """All (user, text) rows of user `index`; each user has its own seeded profile, so users are reproducible
    independently (a 1M-user stream never holds more than one profile)."""
    rng = np.random.default_rng([seed, index])
    profile = {
        "c": _pick(rng, CONTACTS, int(rng.integers(4, 13))),
        "p": _pick(rng, PLACES, int(rng.integers(3, 10))),
        "w": _pick(rng, CITIES, int(rng.integers(1, 5))),
        "a": _pick(rng, ARTISTS, int(rng.integers(2, 9))),
        "t": _pick(rng, TIMES, int(rng.integers(1, 4))),
        "x": _pick(rng, THINGS, int(rng.integers(4, 12))),
        "v": _pick(rng, DEVICES, int(rng.integers(1, 4))),
        "d": list(DAYS),
        "m": _pick(rng, MESSAGES, int(rng.integers(3, 9))),
        "n": list(NUMBERS),
        "e": _pick(rng, EVENTS_L, int(rng.integers(2, 6))),
    }
    habits = rng.dirichlet(np.full(len(TEMPLATES), 0.3))  # per-user template preferences
    user = f"u{index:0{width}d}"
    rows = []
    for _ in range(_count(spec, rng)):
        template = TEMPLATES[int(rng.choice(len(TEMPLATES), p=habits))]
        fill = {k: v[int(rng.integers(len(v)))] for k, v in profile.items()}
        c = fill["c"]
        fill["m"] = fill["m"].format(p=fill["p"])
        fill["e"] = fill["e"].format(c=c)
        rows.append((user, _style(template.format(**fill), rng)))
    return rows


def iter_rows(
    num_users: int, sentences_per_user: SentencesPerUser = (5, 40), seed: int = 0
) -> Iterator[tuple[str, str]]:
    """Stream (user, text) rows user by user, in increasing user-id order."""
    width = max(7, len(str(num_users - 1)))
    for i in range(num_users):
        yield from user_rows(i, sentences_per_user, seed, width)


def generate(num_users: int, sentences_per_user: SentencesPerUser = (5, 40), seed: int = 0) -> dict[str, list[str]]:
    """Column dict {"user": [...], "text": [...]} for `num_users` synthetic users (for `datasets.Dataset.from_dict`)."""
    if num_users < 1:
        raise ValueError("num_users must be >= 1")
    users, texts = [], []
    for u, t in iter_rows(num_users, sentences_per_user, seed):
        users.append(u)
        texts.append(t)
    return {"user": users, "text": texts}
