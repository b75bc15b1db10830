"""Pattern detectors of personal data and secrets in free text: pure functions, no model, no I/O.

Each type is a candidate pattern plus a check the pattern alone cannot make: a checksum (Luhn for cards,
mod 97 for IBANs, the issuing rules of US SSNs), a parse (`ipaddress` for IPv6), a list of values that are
not personal (loopback, netmasks, placeholders in code), or context words before the match (a bare digit
run is a phone number only after "call" or "phone"). The checks are what keep version numbers, dates,
UUIDs, hashes, ISBNs, arithmetic and look-alike numbers intact.

Speed comes from not looking: each type runs only when a cheap test says the text could hold one ("@" for
emails, a digit for numbers, a known prefix for tokens), and most conversational text has none.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

PII_TYPES = ("email", "phone", "ip_address", "credit_card", "iban", "us_ssn", "secret")

# When two findings overlap, the more specific type wins: a token that holds digits is a secret, not a
# phone number; a card number is not three phone numbers.
_PRIORITY = {"secret": 0, "email": 1, "iban": 2, "credit_card": 3, "us_ssn": 4, "ip_address": 5, "phone": 6}

# How far before a match context words are looked for, in characters.
CONTEXT_CHARS = 48


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected value: its type, where it sits in the text, and the value itself."""

    type: str
    start: int
    end: int
    value: str
    subtype: str = ""


def _context(text: str, start: int, words: re.Pattern[str]) -> bool:
    """Whether `words` (a pattern of whole context words) occurs in the `CONTEXT_CHARS` before `start`."""
    return words.search(text, max(0, start - CONTEXT_CHARS), start) is not None


def _words(*words: str) -> re.Pattern[str]:
    """A case-insensitive pattern of whole words: "cell" must not fire inside "Excellence"."""
    return re.compile(r"(?i)(?<![a-z])(?:" + "|".join(re.escape(w) for w in words) + r")(?![a-z])")


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


# --- email ----------------------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![\w-])")
# "logo@2x.png" is a file name (retina assets), not an address.
_FILE_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "css", "js", "ts", "py", "json", "html",
                        "txt", "md", "pdf", "zip", "gz", "tar", "exe", "dll", "so", "bmp", "tiff", "mp3", "mp4"})


# Domains reserved for documentation (RFC 2606, RFC 6761): "user@example.com" reaches nobody.
_RESERVED_DOMAIN = re.compile(
    r"(?i)@(?:[\w-]+\.)*(?:example\.(?:com|org|net)|[\w-]+\.(?:example|test|invalid|localhost))$")


def _emails(text: str) -> Iterator[Finding]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        if m.group(1).lower() in _FILE_TLDS or _RESERVED_DOMAIN.search(m.group()):
            continue
        yield Finding("email", m.start(), m.end(), m.group())


# --- IP addresses ---------------------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not inside a longer dotted run: "1.2.3.4.5" and "10.0.0.1.2" are not addresses.
_IPV4 = re.compile(rf"(?<![\w.-])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)", re.ASCII)
# What every dotted quad holds: a quick search (it starts with a literal) before the costly one.
_IPV4_GATE = re.compile(r"\.\d{1,3}\.\d")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
# A dotted quad right after "version", "v" or a pin ("==", "@") is a version number.
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:|::[0-9A-Fa-f]")
_VERSION_BEFORE = re.compile(r"(?i)(?:version|ver\.?|release|build|firmware|\bv|==|>=|<=|~=)\s*:?\s*$")
# Public resolvers every networking tutorial pings: they identify no one.
_WELL_KNOWN_HOSTS = frozenset({"8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "149.112.112.112",
                               "208.67.222.222", "208.67.220.220", "2001:4860:4860::8888", "2001:4860:4860::8844",
                               "2606:4700:4700::1111", "2606:4700:4700::1001"})


def ip_identifies(value: str) -> bool:
    """Whether an address can point at someone's host: globally routable (not private, loopback, link-local,
    documentation, multicast or reserved), not a network address (x.x.x.0), not a well-known public resolver."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return False
    if not addr.is_global or addr.is_multicast or value in _WELL_KNOWN_HOSTS:
        return False
    return not (addr.version == 4 and value.endswith(".0"))


def _ips(text: str) -> Iterator[Finding]:
    if _IPV4_GATE.search(text):
        for m in _IPV4.finditer(text):
            value = m.group()
            if ip_identifies(value) and not _VERSION_BEFORE.search(text, max(0, m.start() - 16), m.start()):
                yield Finding("ip_address", m.start(), m.end(), value)
    if ":" in text and _IPV6_HINT.search(text):
        for m in _IPV6.finditer(text):
            value = m.group()
            # Three groups at least: "a::b" and "fe80::1" are too short to tell from code and identify nobody.
            if sum(1 for g in re.split(r"[:.]", value) if g) < 3:
                continue
            if ip_identifies(value):  # times (12:30:45), MAC addresses and slices do not parse
                yield Finding("ip_address", m.start(), m.end(), value)


# --- payment cards, IBANs, US SSNs ----------------------------------------------------------------------------

_CARD = re.compile(r"(?<![\w.+-])\d(?:[ -]?\d){12,18}(?![\w]|[.-]\d)", re.ASCII)
# Issuer prefixes (IIN ranges) and the lengths each issuer uses.
_CARD_ISSUERS: tuple[tuple[Callable[[str], bool], frozenset[int]], ...] = (
    (lambda d: d[0] == "4", frozenset({13, 16, 19})),  # Visa
    (lambda d: 51 <= int(d[:2]) <= 55 or 2221 <= int(d[:4]) <= 2720, frozenset({16})),  # Mastercard
    (lambda d: d[:2] in ("34", "37"), frozenset({15})),  # American Express
    (lambda d: d[:4] == "6011" or d[:2] == "65" or 644 <= int(d[:3]) <= 649, frozenset({16, 19})),  # Discover
    (lambda d: 3528 <= int(d[:4]) <= 3589, frozenset({16, 19})),  # JCB
    (lambda d: d[:2] in ("36", "38", "39") or 300 <= int(d[:3]) <= 305, frozenset({14, 16})),  # Diners
    (lambda d: d[:2] == "62", frozenset({16, 17, 18, 19})),  # UnionPay
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (payment cards)."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_shape_ok(value: str) -> bool:
    """Separators, when present, are all the same and split the number into groups of 4 (or Amex's 4-6-5):
    a run of numbers separated at random is not a card."""
    seps = {c for c in value if not c.isdigit()}
    if not seps:
        return True
    if len(seps) > 1:
        return False
    groups = [len(g) for g in value.split(seps.pop())]
    return (groups[:-1] == [4] * (len(groups) - 1) and 1 <= groups[-1] <= 4) or groups == [4, 6, 5] or \
        groups == [4, 6, 4]


# Test card numbers the payment processors publish (Stripe, Braintree, Adyen docs): in integration code, not
# in anyone's wallet.
_TEST_CARDS = frozenset({
    "4242424242424242", "4000056655665556", "5555555555554444", "2223003122003222", "5200828282828210",
    "5105105105105100", "378282246310005", "371449635398431", "6011111111111117", "6011000990139424",
    "3056930009020004", "36227206271667", "3566002020360505", "6200000000000005", "4111111111111111",
    "4012888888881881", "4222222222222", "5431111111111111", "4000000000000002", "4000000000009995",
    "4000000000000077", "4000000000000093", "4000000000000341", "4000000000003220", "4000002500003155",
    "4988438843884305", "5500000000000004", "340000000000009", "30000000000004", "6011000000000004",
})


def _cards(text: str) -> Iterator[Finding]:
    for m in _CARD.finditer(text):
        value = m.group()
        digits = _digits(value)
        if not _card_shape_ok(value) or not luhn_ok(digits) or digits in _TEST_CARDS:
            continue
        if any(prefix(digits) and len(digits) in lengths for prefix, lengths in _CARD_ISSUERS):
            yield Finding("credit_card", m.start(), m.end(), value)


# Country -> IBAN length (ISO 13616 registry, the countries in common use).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21,
    "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18,
    "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23,
    "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24,
    "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w])")


def iban_ok(value: str) -> bool:
    """Whether `value` (spaces allowed) is an IBAN: a known country, its length, and the mod-97 check."""
    s = value.replace(" ", "").upper()
    if IBAN_LENGTHS.get(s[:2]) != len(s):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ibans(text: str) -> Iterator[Finding]:
    for m in _IBAN.finditer(text):
        value = m.group()
        if not iban_ok(value):
            # The optional short last group may have taken the next word ("... 3432 I want"): try without it.
            value = value.rsplit(" ", 1)[0] if " " in value[-4:] else ""
            if not value or not iban_ok(value):
                continue
        yield Finding("iban", m.start(), m.start() + len(value), value)


_SSN_DASHED = re.compile(r"(?<![\w.-])(\d{3})-(\d{2})-(\d{4})(?![\w]|-\d)", re.ASCII)
_SSN_LOOSE = re.compile(r"(?<![\w.-])(\d{3})[ .]?(\d{2})[ .]?(\d{4})(?![\w]|[.-]\d)", re.ASCII)
_SSN_WORDS = _words("ssn", "social security", "social-security", "ss#", "ss #", "ss no", "taxpayer", "itin")
# Numbers the SSA never issued to a person, though printed in ads and examples for decades.
_SSN_NEVER_ISSUED = frozenset({"078051120", "219099999", "123456789"})


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """Whether a number could be an issued US SSN (areas 000, 666 and 900-999, group 00 and serial 0000
    are never issued)."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return area + group + serial not in _SSN_NEVER_ISSUED


def _ssns(text: str) -> Iterator[Finding]:
    seen: set[int] = set()
    for m in _SSN_DASHED.finditer(text):
        if ssn_ok(*m.groups()):
            seen.add(m.start())
            yield Finding("us_ssn", m.start(), m.end(), m.group())
    # Spaced or bare nine digits are an SSN only when the text says so.
    if _SSN_WORDS.search(text) is None:
        return
    for m in _SSN_LOOSE.finditer(text):
        if m.start() not in seen and ssn_ok(*m.groups()) and _context(text, m.start(), _SSN_WORDS):
            yield Finding("us_ssn", m.start(), m.end(), m.group())


# --- phone numbers --------------------------------------------------------------------------------------------

# "+<country> ...": the plus sign is strong evidence on its own ("00<country>" is not: bank and account numbers
# start with 00 too, so it needs a context word like any other digit run).
_PHONE_INTL = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,6}(?![\w]|[.-]\d)",
                         re.ASCII)
# North American: (415) 555-0132, 415-555-0132, 415.555.0132, 415 555 0132.
_PHONE_NANP = re.compile(r"(?<![\w+.-])(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?![\w]|[.-]\d)",
                         re.ASCII)
# Anything else that might be a phone number: only with a context word before it.
_PHONE_LOOSE = re.compile(r"(?<![\w+./-])\(?0?\d{2,5}\)?(?:[ ./-]?\d{2,5}){1,4}(?![\w]|[./-]\d)", re.ASCII)
_PHONE_WORDS = _words("phone", "tel", "call", "mobile", "cell", "fax", "whatsapp", "sms", "text me", "contact",
                      "reach me", "hotline", "dial", "m:", "t:", "ph:", "ph.", "phone number", "mob", "my number",
                      "number is", "telefon", "handy", "téléphone", "portable", "numéro", "teléfono", "móvil",
                      "celular")
# Chinese has no spaces between words: its context words are matched as substrings.
_PHONE_WORDS_ZH = ("电话", "手机", "联系", "号码")
_DATE = re.compile(r"\d{4}[./-]\d{1,2}[./-]\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|(?:19|20)\d\d ?[-/] ?(?:19|20)\d\d")


_SSN_SHAPE = re.compile(r"\d{3}-\d{2}-\d{4}", re.ASCII)


def _shaped_else(text: str, m: re.Match[str]) -> bool:
    """Whether a loose phone match is part of another type's shape that failed its own check: an IBAN-shaped
    run with a bad checksum, a never-issued SSN. Those are look-alikes; a context word nearby does not make
    them phone numbers."""
    if _SSN_SHAPE.fullmatch(m.group()) or _IPV4.fullmatch(m.group()):  # a never-issued SSN, a private address
        return True
    head = text[max(0, m.start() - 40):m.start()]
    return _IBAN_HEAD.search(head) is not None


# The start of an IBAN-shaped run right before a match: "GB02 LOYD " or "BE60 ".
_IBAN_HEAD = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4})* ?$", re.ASCII)


def _dated(value: str) -> bool:
    """A date, or a timestamp's date and hour ("2019-02-26 11"), not a number that merely starts like one."""
    m = _DATE.match(value)
    return m is not None and value[m.end():m.end() + 1] in ("", " ", "T")


def _phones(text: str) -> Iterator[Finding]:
    loose = _PHONE_WORDS.search(text) is not None or any(w in text for w in _PHONE_WORDS_ZH)
    for pattern, needs_context in ((_PHONE_INTL, False), (_PHONE_NANP, False), (_PHONE_LOOSE, True)):
        if (pattern is _PHONE_INTL and "+" not in text) or (needs_context and not loose):
            continue
        for m in pattern.finditer(text):
            value = m.group()
            n = sum(c.isdigit() for c in value)
            # E.164 numbers have at most 15 digits; fewer than 7 is an extension or a count.
            if not 7 <= n <= 15 or _dated(value):
                continue
            # A bare run of digits near "call" is as likely an argument as a number to dial: ask for more.
            if needs_context and (n < 8 or not (_context(text, m.start(), _PHONE_WORDS) or any(
                    w in text[max(0, m.start() - 12):m.start()] for w in _PHONE_WORDS_ZH)) or _shaped_else(text, m)):
                continue
            yield Finding("phone", m.start(), m.end(), value)


# --- secrets --------------------------------------------------------------------------------------------------

_TOKENS: tuple[tuple[str, tuple[str, ...], re.Pattern[str]], ...] = (
    ("aws_access_key", ("AKIA", "ASIA", "ABIA", "ACCA"),
     re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])")),
    ("github_token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})(?![A-Za-z0-9_])")),
    ("openai_key", ("sk-",),
     re.compile(r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])")),
    ("stripe_key", ("sk_live_", "rk_live_", "sk_test_", "rk_test_"),
     re.compile(r"(?<![A-Za-z0-9_])[sr]k_(?:live|test)_[A-Za-z0-9]{16,}(?![A-Za-z0-9_])")),
    ("google_api_key", ("AIza",), re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])")),
    ("slack_token", ("xox", "hooks.slack.com"),
     re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/]+")),
    ("private_key", ("-----BEGIN",),
     re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
                # The body up to its END line; a block cut off before it (a truncated paste) up to the last
                # base64 line.
                r"(?:[\s\S]{0,16384}?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
                r"|(?:\s+[A-Za-z0-9+/=]{16,})*)")),
    ("bearer", ("earer",), re.compile(r"(?<=[Bb]earer )[A-Za-z0-9\-._~+/]{16,}=*")),
)
# Secret assignments are found from their names: each keyword is located with `str.find` (a scan in C), and
# the assignment patterns are matched only there. A pattern that searched for the names itself would try
# every position of every text against a case-insensitive alternation, the slowest detector by far.
_KEYWORDS = ("password", "passwd", "passphrase", "pwd", "secret", "token", "key")
# "key" alone names anything (`"key": "Enter"`): only an API, access or private key counts.
_KEY_PREFIXES = ("api", "api_", "api-", "access", "access_", "access-", "secret_", "private_", "x-api-")
# At a keyword: the rest of the name, then `= "value"`, `: 'value'`, `=> "value"` (code, JSON).
_ASSIGN_QUOTED = re.compile(r"([\w.-]+)[\"']?\s*(?::=|=>|[:=])\s*[bfru]?([\"'])([^\"'\n]{4,200})\2")
# At a keyword: a whole unquoted config line whose name opens the line: .env (`DB_PASSWORD=s3cr3t`), INI and
# my.cnf (`password = s3cr3t`), Java properties (`spring.datasource.password=s3cr3t`), YAML (`password: s3cr3t`,
# a trailing ` # comment` allowed). Such a value must look made up (`_made_up`): `token = response` is code.
# After `=` a value may start with `#` (dotenv reads `KEY=#x` as "#x"); after `: ` it is a YAML comment.
_ASSIGN_LINE = re.compile(r"([\w.-]+)[ \t]*(?:=[ \t]*(?=[^\s\"'|>])|:[ \t]+(?=[^\s\"'#|>]))([^\s\"']{4,200})[ \t]*"
                          r"(?:[ \t]#[^\n]*)?(?:$|\n)")
_LINE_START = re.compile(r"[ \t]*(?:export[ \t]+|-[ \t]*)?[\w.-]*")
# A password in a connection string: scheme://user:PASSWORD@host.
_URL_PASSWORD = re.compile(r"(?<![\w])[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+:([^\s/@]{3,128})@[\w.-]+")
# Names of things about a secret rather than the secret: `secret_id`, `secretName`, `token_type`, `password_length`.
_ABOUT_SECRET = re.compile(r"(?i)(?:_?id|name|_?arn|_?path|_?file|_?type|_?ref|_?len(?:gth)?|_?url|_?uri|_?expiry|"
                           r"_?expires?(?:_at|_in)?|_?hash|_?field|_?label|_?prompt|_?header)$")
# Values that are code rather than secrets: identifiers (`FEED_REGISTRY_CONFIG`, `api_key`), type names
# (`String!`), statements (`user.id;`), attribute reads (`self.password`).
_CODE_VALUE = re.compile(r"^(?:[A-Za-z]+_[A-Za-z_]+|[A-Z][a-z]+[!?\]]*|[a-z]+[A-Z][A-Za-z]+|"
                         r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)$")
# An unquoted value that ends a statement or a call is code; a quoted literal may end in anything (Django keys).
_STATEMENT_END = re.compile(r"[;,)]$")
# Values that show how to fill a slot rather than fill it (tutorials are full of them), and documented
# example keys (AWS's AKIAIOSFODNN7EXAMPLE).
_PLACEHOLDER_VALUES = frozenset({"password", "passwd", "secret", "changeme", "test", "none", "null", "true",
                                 "false", "undefined", "token", "admin", "pass", "string", "required"})
_PLACEHOLDER_PARTS = ("your", "xxx", "***", "...", "example", "placeholder", "here", "<", ">", "${", "{{",
                      "dummy", "redacted", "insert", "enter_", "todo", "password", "passwd", "secret")
# In an unquoted value, these are code reading a secret (`os.environ["KEY"]`, `getenv(...)`); inside a quoted
# literal they are just characters (Django's generated keys hold parentheses).
_CODE_PARTS = ("(", "[", "environ", "getenv", "process.env")
# A reference to a value kept elsewhere: $VAR, ${VAR}, %(name)s, {name}, {{ var }}.
_VARIABLE = re.compile(r"^(?:\$\{?[A-Za-z_][\w.]*\}?|%\(?\w*\)?s?|\{[\w.]*\}|\{\{.*\}\})$")


def _placeholder(value: str, quoted: bool = True) -> bool:
    v = value.lower()
    return len(set(v)) <= 2 or v in _PLACEHOLDER_VALUES or any(w in v for w in _PLACEHOLDER_PARTS) or \
        _VARIABLE.match(value) is not None or (not quoted and any(w in v for w in _CODE_PARTS))


def _made_up(value: str) -> bool:
    """Whether an unquoted value looks generated or chosen as a secret: two kinds of characters at least (lower,
    upper, digit, symbol), or long. `hashed`, `response`, `none` are words; `hunter2`, `Xk9#...` are not."""
    value = value.lstrip("&*")  # a YAML anchor or alias sigil (`&default`) is not part of a made-up value
    kinds = (any(c.islower() for c in value) + any(c.isupper() for c in value) + any(c.isdigit() for c in value)
             + any(not c.isalnum() for c in value))
    return kinds >= 2 or len(value) >= 16


# Every hint with the token it hints at, searched in one flat pass (a substring test each, in C).
_HINTS = tuple((h, k) for k, (_, hints, _) in enumerate(_TOKENS) for h in hints)


def _secrets(text: str, token_hint: bool = True, secret_name: bool = True) -> Iterator[Finding]:
    for k in sorted({k for h, k in _HINTS if h in text}) if token_hint else ():
        subtype, _, pattern = _TOKENS[k]
        for m in pattern.finditer(text):
            if subtype == "openai_key" and not any(c.isdigit() for c in m.group()):
                continue  # "sk-learn-compatible-estimator-api": words, not a key
            if _placeholder(m.group()) and subtype != "private_key":
                continue
            yield Finding("secret", m.start(), m.end(), m.group(), subtype)
    if "://" in text:
        for m in _URL_PASSWORD.finditer(text):
            if not _placeholder(m.group(1)):
                yield Finding("secret", m.start(1), m.end(1), m.group(1), "url_password")
    if secret_name:
        yield from _assignments(text)


def ascii_texts(texts: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.bool_]:
    """Which texts are ASCII, where the batch gates' RE2 patterns read exactly like Python's."""
    return np.asarray(pc.string_is_ascii(texts).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def secret_gates(texts: pa.Array | pa.ChunkedArray, ascii_: npt.NDArray[np.bool_] | None = None
                 ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """For a column of texts, one RE2 pass each: (may hold a token hint, may hold a secret's name).

    Both are necessary conditions of what `_secrets` searches one text at a time with twenty substring tests and
    seven keyword scans, so a text that fails one skips that part with the same findings. Hints are literal,
    case-sensitive ASCII, so their pass is exact on any text; names are found case-insensitively, which RE2
    and `str.lower` agree on for ASCII text only: any other text is sent through."""
    ascii_ = ascii_texts(texts) if ascii_ is None else ascii_
    hint = pc.match_substring_regex(texts, pattern="|".join(re.escape(h) for h, _ in _HINTS))
    name = pc.match_substring_regex(texts, pattern="(?i)" + "|".join(_KEYWORDS))
    return (np.asarray(hint.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool),
            np.asarray(name.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool) | ~ascii_)


def _keyword_starts(lower: str) -> list[int]:
    """Where a secret's name may begin: every keyword occurrence (a "key" only after api/access/private)."""
    starts: set[int] = set()
    for kw in _KEYWORDS:
        i = lower.find(kw)
        while i >= 0:
            if kw != "key" or lower[max(0, i - 8):i].endswith(_KEY_PREFIXES):
                starts.add(i)
            i = lower.find(kw, i + 1)
    return sorted(starts)


def _assignments(text: str) -> Iterator[Finding]:
    """Values assigned to secret-named keys in code, JSON, .env, INI, properties and YAML files."""
    seen: set[int] = set()
    for pos in _keyword_starts(text.lower()):
        line = text.rfind("\n", 0, pos) + 1
        for pattern, group, quoted in ((_ASSIGN_QUOTED, 3, True), (_ASSIGN_LINE, 2, False)):
            m = pattern.match(text, pos)
            if m is None or m.start(group) in seen:
                continue
            value = m.group(group)
            if _placeholder(value, quoted) or _ABOUT_SECRET.search(m.group(1)) or _CODE_VALUE.match(value) or \
                    (not quoted and _STATEMENT_END.search(value)):
                continue
            # Config lines: the name opens its line (what precedes the keyword is the start of the name).
            if not quoted and (not _made_up(value) or not _LINE_START.fullmatch(text, line, pos)):
                continue
            seen.add(m.start(group))
            yield Finding("secret", m.start(group), m.end(group), value, "password")


# --- all types ------------------------------------------------------------------------------------------------

_DETECTORS: dict[str, Callable[[str], Iterator[Finding]]] = {
    "secret": _secrets, "email": _emails, "iban": _ibans, "credit_card": _cards, "us_ssn": _ssns,
    "ip_address": _ips, "phone": _phones,
}
_HAS_DIGIT = re.compile(r"\d")
_NUMERIC = frozenset({"iban", "credit_card", "us_ssn", "ip_address", "phone"})
# Gates: a shape every match of a type must contain, searched once per text before the type's own patterns.
# Phone numbers (7 digits at least), cards (13) and SSNs (9) are runs of ASCII digits with at most two
# separators between neighbours ("(415) 555", "+1 (", "4242 4242"); an IBAN opens with a country code and two
# check digits; an IPv4 address holds ".d.d". Each gate is necessary for its type, so the findings are the
# same as without gates; a text that fails them (most prose, which has only short numbers) skips the
# type's patterns, the costliest part of the scan.
_LONG_NUMBER = re.compile(r"[0-9](?:[\s.()/-]{0,2}[0-9]){6}")
_IBAN_START = re.compile(r"[A-Z]{2}\d\d")
_GATES: dict[str, re.Pattern[str]] = {"phone": _LONG_NUMBER, "credit_card": _LONG_NUMBER, "us_ssn": _LONG_NUMBER,
                                      "iban": _IBAN_START}


# The digit test and the gates in RE2, equal to Python's on ASCII text (where `\s` is these characters and `\d`
# is [0-9]): a batch runs each once over all its texts (`absent_gates`).
_ASCII_SPACE = r"\t\n\x0b\x0c\r \x1c-\x1f"
_RE2_GATES = {_HAS_DIGIT: "[0-9]", _LONG_NUMBER: f"[0-9](?:[{_ASCII_SPACE}.()/-]{{0,2}}[0-9]){{6}}",
              _IBAN_START: "[A-Z]{2}[0-9][0-9]"}


def absent_gates(texts: pa.Array | pa.ChunkedArray, ascii_: npt.NDArray[np.bool_] | None = None
                 ) -> dict[re.Pattern[str], npt.NDArray[np.bool_]]:
    """For the digit test and each gate: per text, True where one RE2 pass over the batch proves it absent
    (ASCII texts only; any other text is left to the Python pattern)."""
    ascii_ = ascii_texts(texts) if ascii_ is None else ascii_
    return {pat: ascii_ & ~np.asarray(pc.match_substring_regex(texts, pattern=re2).fill_null(False)
                                      .to_numpy(zero_copy_only=False), dtype=bool)
            for pat, re2 in _RE2_GATES.items()}


# Where an IP address may start: the IPv4 gate (`_IPV4_GATE`, in RE2 for ASCII text) or the IPv6 hint, whose
# classes are ASCII in both engines.
_RE2_IP_GATE = r"\.[0-9]{1,3}\.[0-9]|" + _IPV6_HINT.pattern


def _candidate_pattern(types: Collection[str]) -> str:
    """One RE2 pattern that every text holding a finding of `types` matches, if it is ASCII: the alternation of
    each detector's necessary shapes, as `find_pii` tests them before its patterns."""
    parts = []
    if "secret" in types:  # a token's hint, a secret's name, a connection string
        parts += [re.escape(h) for h, _ in _HINTS] + ["(?i:" + "|".join(_KEYWORDS) + ")", "://"]
    if "email" in types:
        parts.append("@")
    if "iban" in types:
        parts.append(_RE2_GATES[_IBAN_START])
    if {"credit_card", "us_ssn", "phone"} & set(types):
        parts.append(_RE2_GATES[_LONG_NUMBER])
    if "ip_address" in types:
        parts.append(_RE2_IP_GATE)
    return "|".join(parts)


def candidate_texts(texts: pa.Array | pa.ChunkedArray, types: Collection[str]) -> npt.NDArray[np.bool_]:
    """Per text, whether any detector of `types` may find something in it, in one RE2 pass over the batch (and
    every non-ASCII text, where RE2's classes and case folding differ from Python's). A text this marks False
    has no finding, so a batch calls `find_pii`, and its finer batch gates, only on the others: most
    conversational text holds none of the shapes."""
    pattern = _candidate_pattern(types)
    if not pattern:
        return np.zeros(len(texts), dtype=bool)
    hit = pc.match_substring_regex(texts, pattern=pattern).fill_null(False)
    return np.asarray(hit.to_numpy(zero_copy_only=False), dtype=bool) | ~ascii_texts(texts)


def find_pii(text: str, types: Collection[str] = PII_TYPES, *, token_hint: bool = True,
             secret_name: bool = True, absent: Collection[re.Pattern[str]] = ()) -> list[Finding]:
    """Every personal value and secret in `text` of the given `types`, sorted by position, none overlapping
    (where two overlap, the more specific type wins, then the longer). What the caller knows from batch passes:
    `token_hint` / `secret_name` False, the text holds no token hint / no secret's name (`secret_gates`);
    `absent`, the digit test and gates that do not match it (`absent_gates`)."""
    if not text:
        return []
    has_digit = _HAS_DIGIT not in absent and _HAS_DIGIT.search(text) is not None
    gates: dict[re.Pattern[str], bool] = {p: False for p in absent}
    found: list[Finding] = []
    for kind, detect in _DETECTORS.items():
        if kind not in types or not (has_digit or kind not in _NUMERIC or (kind == "ip_address" and "::" in text)):
            continue
        gate = _GATES.get(kind)
        if gate is not None:
            if gate not in gates:
                gates[gate] = gate.search(text) is not None
            if not gates[gate]:
                continue
        found.extend(_secrets(text, token_hint, secret_name) if kind == "secret" else detect(text))
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (_PRIORITY[f.type], -(f.end - f.start), f.start))
    taken: list[Finding] = []
    for f in found:
        if all(f.end <= t.start or f.start >= t.end for t in taken):
            taken.append(f)
    return sorted(taken, key=lambda f: f.start)


PLACEHOLDERS = {"email": "EMAIL", "phone": "PHONE", "ip_address": "IP_ADDRESS", "credit_card": "CREDIT_CARD",
                "iban": "IBAN", "us_ssn": "US_SSN", "secret": "SECRET"}


def placeholder(kind: str, ordinal: int) -> str:
    """The typed placeholder of the `ordinal`-th distinct value of `kind` in a record: <EMAIL>, <EMAIL_2>, ..."""
    tag = PLACEHOLDERS[kind]
    return f"<{tag}>" if ordinal == 1 else f"<{tag}_{ordinal}>"


def redact(text: str, findings: list[Finding], names: dict[tuple[str, str], str]) -> str:
    """`text` with each finding replaced by its placeholder. `names` maps (type, value) to a placeholder and
    is shared by every text of a record, so one value reads the same in every turn; new values are added."""
    out: list[str] = []
    pos = 0
    for f in findings:
        key = (f.type, f.value)
        if key not in names:
            names[key] = placeholder(f.type, 1 + sum(1 for k in names if k[0] == f.type))
        out += [text[pos:f.start], names[key]]
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


def redact_all(text: str) -> str:
    """`text` with every value of every type replaced by its placeholder (what a report shows of any text)."""
    found = find_pii(text)
    return redact(text, found, {}) if found else text


def mask(f: Finding) -> str:
    """A shape of the value that a report can show: what kind of thing it was, never the value itself.

    Cards keep their last four digits (as receipts do), IPv4 its first octet, emails the first letter of each
    part and the top-level domain, tokens their public prefix; every other character becomes a bullet."""
    v = f.value
    if f.type == "email":
        local, _, domain = v.partition("@")
        tld = domain.rsplit(".", 1)[-1]
        return f"{local[:1]}***@{domain[:1]}***.{tld}"
    if f.type == "credit_card":
        keep = len(v) - 4
        return "".join("•" if c.isdigit() and i < keep else c for i, c in enumerate(v))
    if f.type == "ip_address" and "." in v and ":" not in v:
        return v.split(".", 1)[0] + ".•.•.•"
    if f.type == "secret":
        prefix = re.match(r"(?:AKIA|ASIA|ABIA|ACCA|gh[pousr]_|github_pat_|sk-(?:proj-)?|[sr]k_(?:live|test)_|AIza|"
                          r"xox[abposr]-|https://hooks\.slack\.com/|-----BEGIN [A-Z ]*PRIVATE KEY-----)", v)
        shown = prefix.group() if prefix else ""
        return f"{shown}•••• ({len(v)} chars)"
    if f.type == "iban":
        return v[:2] + "".join("•" if c.isalnum() else c for c in v[2:])
    return "".join("•" if c.isalnum() else c for c in v)
