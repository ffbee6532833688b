"""Benchmark the redact stage: recall/precision per PII type on a labelled set, and speed.

Quality (``--quality``): generates ``--rows`` labelled zh/en texts (default 2,000), each a
sentence template with 1-3 planted items: real PII of every type (resident IDs with a correct
GB 11643 check character, CN mobiles/landlines and international numbers that libphonenumber
calls valid, e-mails, Luhn-valid card numbers on network prefixes, IPv4/IPv6, API keys,
passwords in assignments and URLs) in several spellings, and look-alikes that must NOT be
found (order numbers, timestamps, IDs with a wrong check digit or date, Luhn-failing card
numbers, version strings, prices, dates, zip codes, tracking numbers, hashes). A planted span
counts as found when :func:`reprotune.data.pii.find` returns exactly its (start, end, type);
precision is the share of returned spans that are planted ones of the same type.

Speed (``--speed``): ``--speed-rows`` 2-turn records (default 100,000): bench/dedup.py's
corpus, each answer with a sentence of ordinary numbers and, in ``--pii-share`` of the rows,
a labelled sentence (:func:`speed_rows`); the same rows, in the same process, go through the
dedup stage's
:func:`~reprotune.data.dedup.dedup_stream` (default ``dedup`` params, the stage's workers)
and the redact stage's :func:`~reprotune.data.redact.redact_stream` (default policy).

    .venv/bin/python bench/pii_bench.py --quality --out bench/results/pii_quality.json
    .venv/bin/python bench/pii_bench.py --speed --out bench/results/pii_speed.json
"""

from __future__ import annotations

import argparse
import ipaddress
import platform
import random
import string
import sys
import time
from collections import Counter
from pathlib import Path

import phonenumbers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reprotune import io, runtime  # noqa: E402
from reprotune.data import pii  # noqa: E402
from reprotune.params import PII_TYPES, DedupParams, RedactParams  # noqa: E402

# --------------------------------------------------------------------------- planted PII
AREA6 = ["110101", "110105", "310104", "310115", "440301", "440106", "330106", "320102",
         "510104", "420102", "610113", "370202", "500103", "120101", "210102", "350203",
         "530102", "650102", "450103", "620102", "640104", "810000", "710000"]


def resident_id(r: random.Random) -> str:
    born = f"{r.randint(1935, 2012)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}"
    head = r.choice(AREA6) + born + f"{r.randint(0, 999):03d}"
    return head + pii.id_check_char(head)


def bad_resident_id(r: random.Random) -> str:
    """A wrong check character, or an impossible date, or no such province."""
    good = resident_id(r)
    kind = r.randrange(3)
    if kind == 0:
        wrong = [c for c in "0123456789X" if c != good[-1]]
        return good[:17] + r.choice(wrong)
    if kind == 1:  # 30/31 February or month 13, with its own (correct) check character
        head = good[:6] + good[6:10] + r.choice(["0230", "0231", "1305", "0000"]) + good[14:17]
    else:
        head = r.choice(["99", "00", "10", "80"]) + good[2:17]
    return head + pii.id_check_char(head)


MOBILE_PREFIX = ["130", "131", "132", "133", "135", "136", "137", "138", "139", "150", "151",
                 "152", "153", "155", "156", "157", "158", "159", "166", "173", "176", "177",
                 "178", "180", "181", "182", "183", "185", "186", "187", "188", "189", "191",
                 "198", "199"]
LANDLINE_AREA = ["010", "020", "021", "022", "023", "024", "025", "027", "028", "029", "0755",
                 "0571", "0512", "0532", "0731", "0871"]
INTL = [("+1", "415{:03d}{:04d}", "US"), ("+1", "212{:03d}{:04d}", "US"),
        ("+44", "20794{:02d}{:04d}", "GB"), ("+49", "30{:04d}{:04d}", "DE"),
        ("+81", "3{:04d}{:04d}", "JP"), ("+33", "1{:04d}{:04d}", "FR"),
        ("+65", "6{:03d}{:04d}", "SG"), ("+852", "2{:03d}{:04d}", "HK")]


def _valid(text: str, region: str | None) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(text, region))
    except phonenumbers.NumberParseException:
        return False


def phone(r: random.Random) -> str:
    while True:
        kind = r.randrange(3)
        if kind == 0:
            n = r.choice(MOBILE_PREFIX) + f"{r.randint(0, 99999999):08d}"
            text = r.choice([n, f"{n[:3]} {n[3:7]} {n[7:]}", f"{n[:3]}-{n[3:7]}-{n[7:]}",
                             f"+86 {n}", f"+86 {n[:3]} {n[3:7]} {n[7:]}", f"0086 {n}"])
            region = "CN"
        elif kind == 1:
            area = r.choice(LANDLINE_AREA)
            digits = 8 if len(area) == 3 or r.random() < 0.7 else 7
            local = str(r.randint(2, 8)) + "".join(r.choices(string.digits, k=digits - 1))
            text = r.choice([f"{area}-{local}", f"({area}) {local[:4]} {local[4:]}",
                             f"{area} {local[:4]} {local[4:]}", f"{area}-{local[:4]}-{local[4:]}"])
            region = "CN"
        else:
            cc, fmt, region = r.choice(INTL)
            nsn = fmt.format(r.randint(200, 999), r.randint(0, 9999))
            text = r.choice([f"{cc} {nsn}", f"{cc} {nsn[:3]} {nsn[3:6]} {nsn[6:]}",
                             f"{cc}-{nsn[:3]}-{nsn[3:6]}-{nsn[6:]}"])
        if _valid(text, region):
            return text


NAMES = ["zhangsan", "li.si", "wang_wu", "chen.jing", "alice", "bob.smith", "j.doe", "liu88",
         "huang.wei", "zhao-lei", "m.garcia", "kefu", "support", "ops+alerts"]
DOMAINS = ["qq.com", "163.com", "126.com", "gmail.com", "example.org", "sina.com.cn",
           "corp-mail.io", "mail.tsinghua.edu.cn", "outlook.com", "foxmail.com"]


def email(r: random.Random) -> str:
    return f"{r.choice(NAMES)}{r.choice(['', str(r.randint(1, 999))])}@{r.choice(DOMAINS)}"


def _luhn_digit(body: str) -> str:
    for d in string.digits:
        if pii.luhn_ok(body + d):
            return d
    raise AssertionError


def card(r: random.Random, valid: bool = True) -> str:
    prefix, n = r.choice([("62", 16), ("62", 19), ("4", 16), ("5" + str(r.randint(1, 5)), 16),
                          ("37", 15), ("6228", 19), ("622202", 19)])
    body = prefix + "".join(r.choices(string.digits, k=n - len(prefix) - 1))
    check = _luhn_digit(body)
    if not valid:
        check = str((int(check) + r.randint(1, 9)) % 10)
    d = body + check
    style = r.randrange(3)
    if style == 0 or n == 15:
        return d
    sep = " " if style == 1 else "-"
    return sep.join(d[i:i + 4] for i in range(0, len(d), 4))


def ip(r: random.Random) -> str:
    if r.random() < 0.6:
        return ".".join(str(x) for x in (r.choice([10, 172, 192, 8, 114, 202, 61, 223]),
                                         r.randint(0, 255), r.randint(0, 255), r.randint(1, 254)))
    a = ipaddress.IPv6Address(r.getrandbits(128) & ~(0xFFFF << 96) | (0x2001 << 112)
                              if r.random() < 0.5 else (0xFE80 << 112) | r.getrandbits(64))
    return a.compressed if r.random() < 0.7 else a.exploded


def _tok(r: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(r.choices(alphabet, k=n))


def secret(r: random.Random) -> tuple[str, str, str]:
    """(text before, the secret, text after): only the secret is the span."""
    kind = r.randrange(8)
    if kind == 0:
        return "OPENAI_API_KEY=", "sk-" + r.choice(["", "proj-"]) + _tok(r, 40), ""
    if kind == 1:
        return "aws key ", "AKIA" + _tok(r, 16, string.ascii_uppercase + string.digits), ""
    if kind == 2:
        return "token: ", "ghp_" + _tok(r, 36), ""
    if kind == 3:
        return "HF token ", "hf_" + _tok(r, 34), ""
    if kind == 4:
        return r.choice(["password=", "password: ", "pwd=", "密码：", "口令是"]), \
            _tok(r, r.randint(8, 14), string.ascii_letters + string.digits + "!#$%*"), ""
    if kind == 5:
        return f"https://{r.choice(NAMES[:8])}:", _tok(r, 10), "@git.example.com/repo.git"
    if kind == 6:
        # base64url / JWT characters; a real token never ends with a '.'
        return "Authorization: Bearer ", _tok(r, 31, string.ascii_letters + string.digits + "._-") \
            + _tok(r, 1), ""
    return "api_key: ", "AIza" + _tok(r, 35, string.ascii_letters + string.digits + "_-"), ""


# --------------------------------------------------------------------------- look-alikes
def look_alike(r: random.Random) -> tuple[str, str]:
    """(its kind, a text that looks like PII but is none)."""
    kind = r.randrange(14)
    digits = string.digits
    if kind == 0:
        date = f"{r.randint(2019, 2025)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}"
        return "order_number_date", date + _tok(r, r.randint(8, 12), digits)
    if kind == 1:
        return "order_number_prefixed", r.choice(["DD", "SO", "JD", "TB"]) + _tok(
            r, r.randint(12, 18), digits)
    if kind == 2:  # epoch seconds / milliseconds
        return "epoch_timestamp", str(r.randint(1_500_000_000, 1_800_000_000)) + r.choice(
            ["", f"{r.randint(0, 999):03d}"])
    if kind == 3:
        return "datetime", (f"{r.randint(2019, 2025)}-{r.randint(1, 12):02d}-"
                            f"{r.randint(1, 28):02d} {r.randint(0, 23):02d}:"
                            f"{r.randint(0, 59):02d}:{r.randint(0, 59):02d}")
    if kind == 4:
        return "resident_id_invalid", bad_resident_id(r)
    if kind == 5:
        return "card_luhn_fail", card(r, valid=False)
    if kind == 6:
        return "version", r.choice(["v", "version ", "版本 ", "版本号：", "ver "]) + ".".join(
            str(r.randint(0, 20)) for _ in range(r.choice([3, 4])))
    if kind == 7:
        return "price", r.choice(["¥", "$", "€", "￥"]) + \
            f"{r.randint(1, 99999):,}.{r.randint(0, 99):02d}"
    if kind == 8:
        return "date", f"{r.randint(2019, 2025)}/{r.randint(1, 12):02d}/{r.randint(1, 28):02d}"
    if kind == 9:
        return "zip_code", r.choice(["100080", "200030", "518000", "310000"])
    if kind == 10:
        return "tracking_number", r.choice(["SF", "YT", "ZTO"]) + _tok(r, 12, digits)
    if kind == 11:
        return "commit_hash", _tok(r, 40, "0123456789abcdef")
    if kind == 12:
        return "eleven_digits_not_mobile", r.choice(["12", "10", "11"]) + _tok(r, 9, digits)
    return "decimal", f"{r.randint(1, 9)}.{_tok(r, r.randint(6, 12), digits)}"


ZH = ["我的{}，请帮我核对一下。", "客户留下的是{}，麻烦联系。", "系统日志里出现了{}，这是什么意思？",
      "请把{}记录到表格里。", "他说{}不对，需要重新确认。", "资料如下：{}。"]
EN = ["Please check {} for me.", "The customer left {} in the form.", "Log line: {} - what does it mean?",
      "Record {} in the sheet.", "He says {} is wrong.", "Details: {}."]
LABEL_ZH = {"ID_CARD": "身份证号", "PHONE": "电话", "EMAIL": "邮箱", "BANK_CARD": "银行卡号",
            "IP": "服务器地址", "SECRET": "凭据"}
PLANTERS = {"ID_CARD": resident_id, "PHONE": phone, "EMAIL": email, "BANK_CARD": card, "IP": ip}


def labelled_text(r: random.Random, kinds: Counter | None = None
                  ) -> tuple[str, list[tuple[int, int, str]]]:
    """One text with 1-3 planted items (PII or look-alikes) and the spans of the PII; the
    kinds of look-alikes planted are counted in ``kinds``."""
    zh = r.random() < 0.5
    parts: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for k in range(r.randint(1, 3)):
        sep = ("，" if zh else ", ") if k else ""
        if r.random() < 0.3:
            (kind, item), label = look_alike(r), None
            if kinds is not None:
                kinds[kind] += 1
        else:
            label = r.choice(PII_TYPES)
        pre = sep + (LABEL_ZH.get(label or "", "编号") if zh else (label or "ref").lower()) + " "
        if label == "SECRET":
            before, value, after = secret(r)
        elif label:
            before, value, after = "", PLANTERS[label](r), ""
        else:
            before, value, after = "", item, ""
        start = sum(map(len, parts)) + len(pre) + len(before)
        parts.append(pre + before + value + after)
        if label:
            spans.append((start, start + len(value), label))
    template = r.choice(ZH if zh else EN)
    body = "".join(parts)
    offset = template.index("{}")
    return template.format(body), [(s + offset, e + offset, t) for s, e, t in spans]


def quality(rows: int, seed: int) -> dict:
    r = random.Random(seed)
    planted, found, hit = Counter(), Counter(), Counter()
    misses: list[dict] = []
    false_pos: list[dict] = []
    look_alikes: Counter = Counter()
    for _ in range(rows):
        text, spans = labelled_text(r, look_alikes)
        want = set(spans)
        got = {(s.start, s.end, s.type) for s in pii.find(text)}
        for s in want:
            planted[s[2]] += 1
        for s in got:
            found[s[2]] += 1
        for s in want & got:
            hit[s[2]] += 1
        for s in want - got:
            misses.append({"text": text, "type": s[2], "span": text[s[0]:s[1]]})
        for s in got - want:
            false_pos.append({"text": text, "type": s[2], "span": text[s[0]:s[1]]})
    per_type = {t: {"planted": planted[t], "found": found[t], "correct": hit[t],
                    "recall": round(hit[t] / planted[t], 4) if planted[t] else None,
                    "precision": round(hit[t] / found[t], 4) if found[t] else None}
                for t in PII_TYPES}
    return {"rows": rows, "seed": seed, "look_alikes_planted": sum(look_alikes.values()),
            "look_alikes_by_kind": dict(sorted(look_alikes.items())),
            "per_type": per_type, "misses": misses[:20], "false_positives": false_pos[:20]}


# --------------------------------------------------------------------------- speed
NUMBERED = ["合计 {} 元，共 {} 件。", "第 {} 章第 {} 节。", "The answer is {} ({} steps).",
            "In {} the revenue grew by {} percent.", "血压 {}/{} mmHg。", "Use {} GB of RAM and {} cores."]


def speed_rows(n: int, pii_share: float, seed: int) -> list[dict]:
    """bench/dedup.py's corpus (its Zipf zh/en/mixed texts, 10% near and 3% exact copies),
    every answer given a sentence with ordinary numbers (so no row skips the analyzer on the
    no-digit prefilter) and ``pii_share`` of them a labelled PII sentence."""
    sys.path.insert(0, str(ROOT / "bench"))
    from dedup import make_corpus

    r = random.Random(seed)
    records = make_corpus(n, seed, 0.10, 0.03)[0]
    for rec in records:
        extra = r.choice(NUMBERED).format(r.randint(1, 2025), r.randint(1, 999))
        if r.random() < pii_share:
            extra += " " + labelled_text(r)[0]
        rec["messages"][1]["content"] += " " + extra
        rec["meta"] = None
    return records


def speed(rows: int, pii_share: float, seed: int) -> dict:
    from reprotune.data.dedup import dedup_stream
    from reprotune.data.redact import redact_stream

    data = speed_rows(rows, pii_share, seed)
    workers = min(4, runtime.usable_cpus())  # what stages/dedup.py uses
    t0 = time.perf_counter()
    dm, _ = dedup_stream(lambda: data, DedupParams(), kept=lambda _: None, dropped=lambda _: None,
                         workers=workers, progress=False)
    dedup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pii.analyzer()  # built once per process (imports spaCy): counted apart
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts, _ = redact_stream(data, RedactParams(), kept=lambda _: None, dropped=lambda _: None,
                              review=lambda _: None)
    redact_s = time.perf_counter() - t0
    return {"rows": rows, "pii_share": pii_share, "dedup_workers": workers,
            "dedup_s": round(dedup_s, 2), "dedup_rows_per_s": round(rows / dedup_s),
            "dedup_kept": dm["kept"],
            "redact_s": round(redact_s, 2), "redact_rows_per_s": round(rows / redact_s),
            "redact_over_dedup_time": round(redact_s / dedup_s, 3),
            "redact_analyzer_build_s": round(build_s, 2),
            "redact_rows_masked": counts.rows_masked, "redact_found": dict(counts.found)}


def real(folder: Path) -> dict:
    """Spans found per file and type in real data files (ingested as the pipeline does); the
    spans themselves are not written (they are real people's data and keys)."""
    import json

    from reprotune.data.ingest import RowError, convert_row
    from reprotune.data.redact import redact_record

    out: dict = {}
    for f in sorted(folder.iterdir()):
        if f.suffix not in (".json", ".jsonl"):
            continue
        text = f.read_text(encoding="utf-8")
        rows = json.loads(text) if f.suffix == ".json" else [
            json.loads(line) for line in text.splitlines() if line.strip()]
        n, with_pii, found = 0, 0, Counter()
        for raw in rows:
            try:
                rec = convert_row(raw)[1]
            except RowError:
                continue
            n += 1
            spans = [s.type for fo in redact_record(rec, RedactParams())[1] for s in fo.spans]
            with_pii += bool(spans)
            found.update(spans)
        out[f.name] = {"rows": n, "rows_with_pii": with_pii, "found": dict(sorted(found.items()))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--speed-rows", type=int, default=100_000)
    ap.add_argument("--pii-share", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", type=Path, default=None,
                    help="also count the spans found in the .json/.jsonl files of this folder")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    res: dict = {"command": "python " + " ".join(["bench/pii_bench.py", *sys.argv[1:]]),
                 "machine": f"{runtime.usable_cpus()}-core CPU ({platform.machine()}), "
                            f"Linux {platform.release()}, shared with other jobs while measured"}
    from importlib.metadata import version

    res["versions"] = {p: version(p) for p in ("presidio-analyzer", "presidio-anonymizer",
                                               "phonenumbers", "spacy")}
    res["versions"]["python"] = platform.python_version()
    if args.quality:
        res["quality"] = quality(args.rows, args.seed)
        res["quality"]["note"] = (
            "generator and recognizers were written together: recall/precision say the "
            "recognizers do what docs/data.md says on these spellings and look-alikes, not that "
            "every real-world spelling is covered. Earlier runs of this script found bearer "
            "tokens and passwords cut at a trailing '.', and phone matches inside decimals; "
            "both were fixed in the recognizers before this run")
    if args.speed:
        res["speed"] = speed(args.speed_rows, args.pii_share, args.seed)
    if args.real:
        res["real"] = {"folder": str(args.real), "files": real(args.real)}
    io.write_json(args.out, res)
    for k in ("quality", "speed", "real"):
        if k in res:
            print(k, {t: (v["recall"], v["precision"]) for t, v in res[k]["per_type"].items()}
                  if k == "quality" else res[k])


if __name__ == "__main__":
    main()
