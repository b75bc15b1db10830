"""The `pii` step: each type found (checksums and context decide), look-alikes left intact, per-type actions,
the ledger, the masked `pii` column, and a report that shows masked samples and never a raw value."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from operators.cli import build_step
from operators.core.runner import read_step_table, run_all
from operators.report import PAGES_DIR, write_report
from operators.schema import CANONICAL_SCHEMA
from operators.steps.pii.step import PiiConfig, scan_batch
from operators.text.pii import PII_TYPES, find_pii, iban_ok, luhn_ok, mask, redact_all, ssn_ok

# (type, subtype, text with the value between [[ ]]) — the formats a chat corpus carries.
PLANTED = [
    ("email", "", "write to [[jane.doe+news@mail.example.co.uk]] today"),
    ("email", "", "Contact: [[a_b-c@sub.domain.io]]."),
    ("phone", "", "call me on [[+1 (415) 555-0132]] after six"),
    ("phone", "", "office [[415-555-0132]]"),
    ("phone", "", "London [[+44 20 7946 0958]]"),
    ("phone", "", "Paris [[+33 1 23 45 67 89]]"),
    ("phone", "", "Tokyo [[+81 3-1234-5678]]"),
    ("phone", "", "my mobile is [[07946 095811]]"),
    ("phone", "", "我的手机号是[[18116105142]]，请联系"),
    ("phone", "", "My phone number is [[089/9613914]]."),
    ("phone", "", "My number is [[07516 818866]]."),
    ("phone", "", "Mobile: [[06.40.26.59.72]]"),
    ("ip_address", "", "ssh into [[81.2.69.142]] now"),
    ("ip_address", "", "ssh root@[[55.244.172.222]] -p 22"),
    ("ip_address", "", "the host [[2a03:2880:f12f:83:face:b00c:0:25de]] is down"),
    ("credit_card", "", "card [[4275 5828 2357 4162]] exp 12/29"),
    ("credit_card", "", "mc [[5259-4526-6985-7229]]"),
    ("credit_card", "", "amex [[371025649038625]]"),
    ("iban", "", "IBAN [[DE89 3704 0044 0532 0130 00]]"),
    ("iban", "", "pay to [[GB82WEST12345698765432]]"),
    ("iban", "", "IBAN: [[ES5974838743955997863432]] I want it paid"),
    ("us_ssn", "", "my SSN is [[536-22-1234]]"),
    ("us_ssn", "", "social security number: [[536 22 1234]]"),
    ("secret", "aws_access_key", "AWS_ACCESS_KEY_ID [[AKIAQWERTYUIOPASDFGH]]"),
    ("secret", "github_token", "token [[ghp_abcdefghijklmnopqrstuvwxyz0123456789]]"),
    ("secret", "openai_key", "OPENAI key [[sk-proj-abc123DEF456ghi789JKL012mno]]"),
    ("secret", "slack_token", "bot [[xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOp]]"),
    ("secret", "stripe_key", "stripe.api_key = os.environ.get('X') or '[[sk_live_51HqLyjWDarjtT1zdp7dcXbzT]]'"),
    ("secret", "google_api_key", "maps?key=[[AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY]]&v=3"),
    ("secret", "bearer", "Authorization: Bearer [[eyJhbGciOiJIUzI1NiJ9.abc123def456]]"),
    ("secret", "password", 'db = connect(password="[[hunter2!x9]]")'),
    ("secret", "password", "DB_PASSWORD=[[s3cr3tP4ss]]"),
    ("secret", "password", "[client]\nuser=app_user\npassword=[[wDwz?o7BI2$g!a4li_]]\n"),
    ("secret", "password", "spring.datasource.password=[[IEp_c1ke4M4i]]\n"),
    ("secret", "password", "    environment:\n      POSTGRES_PASSWORD: [[Buster48#]]\n"),
    ("secret", "password", "[default]\naws_secret_access_key = [[Ei5hV37W2xgP8btcHO+7lKoGqdCX+ETQGrMVFNjd]]\n"),
    ("secret", "password", "SECRET_KEY = '[[django-insecure-zw(htco=n-a_ln&yncfby7m8vq-)*cl(wvbi]]'"),
    ("secret", "password", "SECRET_KEY = '[[nrn%u&=1j2h614*ts(xxu%sqmmjvghnu)h8dj&d=d8+pk9t-g@]]'"),
    ("secret", "url_password", "DATABASE_URL=postgresql://admin:[[F!2I=xxr*cY!vA!]]@db.internal:5432/app"),
    ("secret", "private_key", "[[-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234567890abcdef\n"
     "-----END RSA PRIVATE KEY-----]] done"),
]

# Look-alikes the guards must leave alone.
DECOYS = [
    "released 1.2.3 and v2.10.4, see version 1.2.3.4",
    "dates 2023-10-12, 12/10/2023, 2023.10.12 at 12:30:45",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "git 3f786850e387550fdab836ed7e6dc881de23001b, 0a1b2c3d",
    "ISBN 978-3-16-148410-0 and 9783161484100",
    "123 - 456 = -333 and 4 * 1024 * 1024 = 4194304",
    "a card that fails Luhn: 4275 5828 2357 4163",
    "Stripe's test cards 4242 4242 4242 4242 and 4111111111111111",
    "documentation and private hosts: 203.0.113.45, 2001:db8::8a2e:370:7334, 192.168.1.10, 10.0.0.1, 8.8.8.8",
    "docs: author_email = your-email@example.com, admin@corp.test",
    "year ranges 2018-2019 in a resume with Excellence and a cell-free call count of 1000000",
    "an IBAN that fails mod 97: DE89 3704 0044 0532 0130 01",
    "never issued: 000-12-3456, 666-12-3456, 912-34-5678, 078-05-1120",
    'api_key = "YOUR_API_KEY"\npassword = "********"\npassword = input("Password: ")\ntoken = os.environ["TOKEN"]',
    "std::vector<int> v; a[1:2:3]; 00:1a:2b:3c:4d:5e",
    "order 12345678901 shipped; localhost is 127.0.0.1, bind 0.0.0.0, mask 255.255.255.0",
    "user@localhost and logo@2x.png and the AWS docs key AKIAIOSFODNN7EXAMPLE",
    "call the function with 1000000 retries",
    "call the bank: GB02 LOYD 6358 8147 6543 79 fails mod 97",
    "the ph level and the never issued 666-22-1542",
    "phone: phone,\nMy router is at 172.28.197.17.",
    "so I have to call refresh()\n\ncreated_at = '2019-02-26 11:48:08'",
    "password = hashed\ntoken = self.token\nsecret = response\n",
    "connect to postgresql://user:password@localhost/db or redis://:${REDIS_PASS}@cache:6379",
]


def _planted(text: str) -> tuple[str, str]:
    before, rest = text.split("[[", 1)
    value, after = rest.split("]]", 1)
    return before + value + after, value


@pytest.mark.parametrize(("kind", "subtype", "text"), PLANTED)
def test_each_planted_value_is_found_whole_with_its_type(kind: str, subtype: str, text: str) -> None:
    plain, value = _planted(text)
    found = find_pii(plain)
    assert [(f.type, f.subtype, f.value) for f in found] == [(kind, subtype, value)]


@pytest.mark.parametrize("text", DECOYS)
def test_look_alikes_are_left_intact(text: str) -> None:
    assert find_pii(text) == [], [(f.type, f.value) for f in find_pii(text)]
    assert redact_all(text) == text


def test_checksums() -> None:
    assert luhn_ok("4275582823574162") and not luhn_ok("4275582823574163")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE89 3704 0044 0532 0130 01")
    assert not iban_ok("XX89 3704 0044 0532 0130 00")  # no such country
    assert ssn_ok("536", "22", "1234")
    assert not any(ssn_ok(*s.split("-")) for s in ("000-12-3456", "666-12-3456", "912-34-5678", "536-00-1234",
                                                     "536-22-0000", "123-45-6789"))


def _german_iban(rng: random.Random, spaced: bool) -> str:
    bban = "".join(rng.choice("0123456789") for _ in range(18))
    iban = f"DE{98 - int(bban + '131400') % 97:02d}{bban}"  # D=13, E=14: the mod-97 check digits
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if spaced else iban


def _fuzz_texts(n: int, seed: int) -> list[str]:
    """Texts of number-ish fragments: digit runs with every separator the patterns allow, signs, brackets,
    country codes, dotted quads and context words, glued at random."""
    rng = random.Random(seed)
    parts = ["+", "(", ")", " ", "-", ".", "/", "\n", "\t", ":", "::", "GB", "DE", "call ", "ssn ", "phone: ",
             "SSN ", "电话", "v", "==", "@", "a", "IBAN "]
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.5:
                pieces.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 6))))
            elif r < 0.55:
                pieces.append(".".join(str(rng.randint(1, 255)) for _ in range(4)))
            elif r < 0.6:
                pieces.append(_german_iban(rng, spaced=rng.random() < 0.5))
            else:
                pieces.append(rng.choice(parts))
        out.append("".join(pieces))
    return out


def test_the_gates_change_no_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each gate is a shape every match of its type contains: with the gates open (every text scanned by every
    pattern), the findings are the same, on the planted values, the look-alikes and random number soup."""
    import re

    from operators.text import pii

    texts = [_planted(t)[0] for _, _, t in PLANTED] + DECOYS + _fuzz_texts(4000, seed=5)
    gated = [pii.find_pii(t) for t in texts]
    # The soup does hold every numeric type, so a gate that hid one would show.
    found = {f.type for fs in gated for f in fs}
    assert {"phone", "credit_card", "us_ssn", "iban", "ip_address"} <= found
    everything = re.compile("")
    monkeypatch.setattr(pii, "_GATES", dict.fromkeys(pii._GATES, everything))
    monkeypatch.setattr(pii, "_IPV4_GATE", everything)
    assert [pii.find_pii(t) for t in texts] == gated

def test_the_batch_secret_gates_change_no_finding() -> None:
    """`secret_gates` (two RE2 passes over a batch) lets a text skip the token and secret-name searches only when
    they would find nothing: the same findings on the planted values, the look-alikes, random text and secret
    names in odd cases and scripts (a Kelvin sign lowers to "k"); and most plain text does skip."""
    import pyarrow as pa

    from operators.text import pii

    odd = ["API_KEY = Xk9#mQ2vL8pZ", "Pass\u212Aey: hunter2Zx", "\u212Aey: Tr0ub4dor&3",
           "TOKEN=ghp_abcdefghij1234567890ABCDEFGHIJklmnop",
           "Authorization: Bearer abc.def.ghi", "PASSWORD: 'S3cr3t!x'", "naïve password = Zz9!zz9!", "sk-proj-1234abcd"]
    texts = [_planted(t)[0] for _, _, t in PLANTED] + DECOYS + _fuzz_texts(2000, seed=6) + odd
    hint, name = pii.secret_gates(pa.array(texts))
    assert [pii.find_pii(t, token_hint=bool(h), secret_name=bool(n)) for t, h, n in zip(texts, hint, name,
                                                                                       strict=True)] == \
        [pii.find_pii(t) for t in texts]
    assert any(f.type == "secret" for t in odd for f in pii.find_pii(t))
    plain = _fuzz_texts(500, seed=7)
    h, n = pii.secret_gates(pa.array(plain))
    assert (~h).mean() > 0.5 and (~n).mean() > 0.5


def test_the_batch_digit_and_gate_passes_change_no_finding() -> None:
    """`absent_gates` marks a text free of digits or of a gate's shape only where Python's pattern would say so:
    ASCII separators Python counts as space and RE2 does not (\\v, \\x1c-\\x1f), no-break spaces and other
    scripts' digits are in the fixture; the findings equal the ungated ones, and the passes do skip texts."""
    import pyarrow as pa

    from operators.text import pii

    odd = ["call 415\x1c555\x1d0134 now", "card 4242\x0b4242\x0b4242\x0b4242", "ssn 078\u00a005\u00a01120",
           "\u0664\u0661\u0665 555 0134 ok", "DE89 3704 0044 0532 0130 00", "no digits at all here"]
    texts = [_planted(t)[0] for _, _, t in PLANTED] + DECOYS + _fuzz_texts(2000, seed=8) + odd
    absent = pii.absent_gates(pa.array(texts))
    got = [pii.find_pii(t, absent=[p for p, a in absent.items() if a[i]]) for i, t in enumerate(texts)]
    assert got == [pii.find_pii(t) for t in texts]
    assert all(a.any() for a in absent.values())


def test_masks_never_contain_the_value() -> None:
    for _, _, text in PLANTED:
        plain, value = _planted(text)
        (f,) = find_pii(plain)
        shown = mask(f)
        assert value not in shown and shown
        # Nothing longer than a card's last four digits survives masking.
        assert not any(len(run) > 4 for run in "".join(c if c.isdigit() else " " for c in shown).split())


def _table(convs: list[list[tuple[str, str]]]) -> pa.Table:
    rows = [{"id": f"r{i}", "conversations": [{"from": a, "value": b} for a, b in turns], "label": None,
             "langdetect": "en", "source": "t", "reward": None, "origin": None} for i, turns in enumerate(convs)]
    return pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)


def test_one_value_reads_the_same_in_every_turn_and_distinct_values_are_numbered() -> None:
    t = _table([[("human", "mail bob@corp.io or ann@x.org"), ("gpt", "I wrote to bob@corp.io")],
                [("human", "and me: bob@corp.io"), ("gpt", "ok")]])
    r = scan_batch(t, PiiConfig().action_of())
    convs = r.kept.column("conversations").to_pylist()
    assert [x["value"] for x in convs[0]] == ["mail <EMAIL> or <EMAIL_2>", "I wrote to <EMAIL>"]
    assert convs[1][0]["value"] == "and me: <EMAIL>"  # numbering starts again in every record
    assert r.counters["redacted.email"] == 4 and r.counters["records_redacted"] == 2
    assert [e["turn"] for e in r.kept.column("pii").to_pylist()[0]] == [0, 0, 1]


def test_actions_per_type_keep_the_ledger() -> None:
    t = _table([[("human", "key AKIAQWERTYUIOPASDFGH please"), ("gpt", "ok")],
                [("human", "call +1 (415) 555-0132"), ("gpt", "sure")],
                [("human", "mail bob@corp.io"), ("gpt", "done")],
                [("human", "nothing here"), ("gpt", "fine")]])
    r = scan_batch(t, PiiConfig(actions={"secret": "drop", "phone": "flag", "email": "off"}).action_of())
    assert r.kept.num_rows + r.dropped.num_rows == t.num_rows  # the ledger
    assert r.dropped.column("id").to_pylist() == ["r0"]
    assert r.dropped.column("reason").to_pylist() == ["pii"]
    assert r.dropped.column("detail").to_pylist() == ["contains secret/aws_access_key (1)"]
    kept = {row["id"]: row for row in r.kept.to_pylist()}
    assert kept["r1"]["conversations"][0]["value"] == "call +1 (415) 555-0132"  # flagged: text kept, counted
    assert kept["r1"]["pii"][0]["action"] == "flag" and r.counters["flagged.phone"] == 1
    assert kept["r2"]["conversations"][0]["value"] == "mail bob@corp.io" and kept["r2"]["pii"] == []  # off
    assert "found.email" not in r.counters and r.counters["records_flagged"] == 1


def test_roles_limit_the_turns_scanned() -> None:
    t = _table([[("human", "mail bob@corp.io"), ("gpt", "mail ann@x.org")]])
    r = scan_batch(t, PiiConfig().action_of(), frozenset({"gpt"}))
    assert [x["value"] for x in r.kept.column("conversations").to_pylist()[0]] == ["mail bob@corp.io", "mail <EMAIL>"]


def test_config_rejects_unknown_types() -> None:
    with pytest.raises(ValidationError, match="unknown PII types"):
        PiiConfig(actions={"emails": "drop"})
    with pytest.raises(ValidationError):
        PiiConfig(actions={"email": "erase"})


def test_the_step_runs_redacts_and_reports_masked_samples_without_any_raw_value(tmp_path: Path) -> None:
    convs = []
    values = []
    for i, (_, _, text) in enumerate(PLANTED):
        plain, value = _planted(text)
        values.append(value)
        convs.append([("human", plain), ("gpt", f"noted, answer {i}")])
    convs += [[("human", d), ("gpt", "fine")] for d in DECOYS]
    src = tmp_path / "in.parquet"
    pq.write_table(_table(convs), src)
    step_dir = tmp_path / "run" / "pii"
    m = run_all(build_step("pii", {"actions": {"iban": "drop"}, "max_part_rows": 8}), [str(src)], str(step_dir))
    s = m.stats
    assert s.records_in == len(convs) == s.records_kept + sum(s.dropped_by_reason.values())
    ibans = sum(t == "iban" for t, _, _ in PLANTED)
    assert s.dropped_by_reason == {"pii": ibans}  # the IBAN records
    assert all(s.counters[f"found.{t}"] >= 1 for t in PII_TYPES)
    kept = read_step_table(str(step_dir))
    text = json.dumps(kept.column("conversations").to_pylist())
    assert not [v for v in values if json.dumps(v)[1:-1] in text]  # every planted value is gone from the data
    assert "<CREDIT_CARD>" in text and "<SECRET>" in text
    assert all(json.dumps(d)[1:-1] in text for d in DECOYS)  # decoys untouched
    assert kept.schema.field("pii").type == pa.list_(pa.struct([("type", pa.string()), ("subtype", pa.string()),
                                                               ("action", pa.string()), ("turn", pa.int32()),
                                                               ("masked", pa.string())]))
    uris = write_report(str(tmp_path / "run"))
    pages = [p.read_text() for p in (tmp_path / "run" / PAGES_DIR).glob("*.html")]  # the per-step pages too
    assert pages
    html = Path(uris["html"].removeprefix("file://")).read_text()
    md = Path(uris["markdown"].removeprefix("file://")).read_text()
    report = json.loads(Path(uris["json"].removeprefix("file://")).read_text())
    pii = next(x for x in report["steps"] if x["step"] == "pii")["pii"]
    assert set(pii["types"]) == set(PII_TYPES) and pii["types"]["iban"]["dropped"] == ibans
    assert pii["samples"]["credit_card"][0].endswith("4162")  # a masked card keeps its last four digits
    assert "Personal data and secrets" in html and "PII `email`" in md
    for page in (html, md, json.dumps(report), *pages):
        leaked = [v for v in values if v in page or json.dumps(v)[1:-1] in page]
        assert not leaked, leaked


def test_a_second_pass_adds_to_the_pii_column() -> None:
    t = _table([[("human", "mail bob@corp.io"), ("gpt", "ok")]])
    first = scan_batch(t, PiiConfig().action_of()).kept
    again = scan_batch(first.set_column(first.column_names.index("conversations"), "conversations",
                                        _table([[("human", "call +1 (415) 555-0132"), ("gpt", "ok")]])
                                        .column("conversations")), PiiConfig().action_of()).kept
    assert [e["type"] for e in again.column("pii").to_pylist()[0]] == ["email", "phone"]


def test_the_batch_candidate_pass_skips_only_texts_without_findings() -> None:
    """`candidate_texts` (one RE2 pass) marks False only texts where `find_pii` finds nothing, for every type and
    for each type alone (its pattern is built from the types asked for); plain prose is mostly skipped."""
    import pyarrow as pa

    from operators.text import pii

    odd = ["Pass\u212Aey: hunter2Zx", "call 415\x1c555\x1d0134 now", "\u0664\u0661\u0665 555 0134 ok",
           "host fe80::1 and 2a03:2880::25de", "ssh root@81.2.69.142", "postgres://app:Xk9mQ2vL@db.internal/x"]
    texts = [_planted(t)[0] for _, _, t in PLANTED] + DECOYS + _fuzz_texts(2000, seed=9) + odd
    for types in [PII_TYPES, *((t,) for t in PII_TYPES)]:
        candidates = pii.candidate_texts(pa.array(texts), types)
        missed = [t for t, c in zip(texts, candidates, strict=True) if not c and pii.find_pii(t, types)]
        assert missed == [], (types, missed[:3])
        assert any(pii.find_pii(t, types) for t in texts)
    plain = ["The mitochondria is the powerhouse of the cell, and 42 is an answer.", "Sort the list in place."] * 50
    assert not pii.candidate_texts(pa.array(plain), PII_TYPES).any()
