"""The checks behind the PII recognizers (:mod:`reprotune.data.pii`), pure functions: the
GB 11643 resident ID check character and layout, the Luhn check and card network lengths, and
what counts as a placeholder rather than a secret."""

from __future__ import annotations

import datetime

import regex

# GB/T 2260 province-level codes (the first two digits of a resident ID)
PROVINCES = frozenset({11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43,
                       44, 45, 46, 50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83, 91})
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

def id_check_char(first17: str) -> str:
    """The GB 11643 check character of the first 17 digits (ISO 7064 MOD 11-2)."""
    return _ID_CHECK[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def id_layout_ok(s: str) -> bool:
    """Province prefix and a real birth date (``s`` is 18 characters)."""
    if int(s[:2]) not in PROVINCES:
        return False
    try:
        datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    return True


def id_shaped(s: str) -> bool:
    """18 digits laid out like a resident ID (province, then a birth year 1900-2099), valid
    or not: card networks issue 18-digit numbers rarely, resident IDs always have 18."""
    return int(s[:2]) in PROVINCES and s[6:8] in ("19", "20")


def valid_resident_id(s: str) -> bool:
    """18-character resident ID with a known province, a real date and the right check char."""
    return (len(s) == 18 and s[:17].isdigit() and id_layout_ok(s)
            and id_check_char(s[:17]) == s[17].upper())


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_network_ok(d: str) -> bool:
    """Whether ``d`` (digits only) has a card network's prefix at a length it issues."""
    n = len(d)
    if d.startswith("4"):
        return n in (16, 19)  # 13-digit Visa numbers are no longer issued
    if d[:2] in ("34", "37"):
        return n == 15
    if "51" <= d[:2] <= "55" or "2221" <= d[:4] <= "2720":
        return n == 16
    if d.startswith(("62", "35", "6011", "65")):
        return 16 <= n <= 19
    return False



# what code samples and docs put where a secret goes: not a secret
PLACEHOLDER = regex.compile(r"(?i)your|_here\b|example|placeholder|xxxx|\*{3}|\.\.\.|^<.*>$"
                            r"|(?-i:^\$\{?(?:[A-Z_][A-Z0-9_]*|[a-z_][a-z0-9_]*)\}?$)"  # $VAR, ${var}
                            r"|^\{.*\}$|^(?:password|passwd|secret|token|api_?key|none|null|"
                            r"changeme|test)$|^(?:self|this|os|config|settings|cfg|args|env)\."
                            r"|(?-i:^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$)"  # a CONSTANT_NAME
                            r"|^[a-z]+(?:_[a-z]+)*_(?:password|passwd|secret|token|key)$"
                            r"|^(?:password|secret|token)_[a-z_]+$")  # db_password, token_value


def is_placeholder(value: str) -> bool:
    return bool(PLACEHOLDER.search(value))
