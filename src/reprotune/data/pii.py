"""PII detection: Microsoft Presidio's analyzer with pattern recognizers only (no NER model).

Types (:data:`reprotune.params.PII_TYPES`), each a Presidio recognizer in one
``RecognizerRegistry``:

* ``ID_CARD``  -- Chinese resident ID (GB 11643-1999): 18 characters, a known province prefix
  (first two digits), a real birth date 1900-2099, and the ISO 7064 MOD 11-2 check character.
  15-digit first-generation numbers are not detected.
* ``PHONE``    -- Presidio's ``PhoneRecognizer`` (libphonenumber, leniency VALID) with region
  CN: Chinese mobiles (1[3-9]x, with +86/0086 or not, spaced or not), landlines with an area
  code (010-8888 6666, (0755) ...), and any international number written with ``+``/``00``
  and its country code. Numbers must be *valid* for their country, not only well-formed.
* ``EMAIL``    -- local@domain.tld (letters-only TLD of 2-24 characters).
* ``BANK_CARD`` -- 15-19 digits (spaces/dashes every 4 allowed) on a card network prefix
  (UnionPay 62, Visa 4 (16/19 digits), Mastercard 51-55/2221-2720, Amex 34/37, JCB 35,
  Discover 6011/65) at a length that network issues, passing the Luhn check; an 18-digit number laid out like a
  resident ID (province + birth year) is never a card.
* ``IP``       -- IPv4 (dotted quad, not after ``v``/``version``/``版本``) and IPv6 (validated
  by :mod:`ipaddress`, at least two groups with a digit).
* ``SECRET``   -- API keys by their documented prefixes (OpenAI/Anthropic ``sk-``, GitHub
  ``ghp_``/``github_pat_``, AWS ``AKIA``, Google ``AIza``, Slack ``xox?-``, Hugging Face
  ``hf_``, Stripe ``sk_live_``), JWTs, ``Bearer`` tokens, the value of ``password=``/
  ``api_key:``/``密码：``-style assignments, and the password of ``scheme://user:pass@host``.

Person names and postal addresses need an NER model (spaCy), which this project does not
load: Presidio runs with its ``NoOpNlpEngine`` (no tokens, no entities), so those are NOT
detected (docs/data.md). Overlapping detections are resolved by :func:`resolve`: the longer
span wins, then the higher score, then the earlier start -- deterministic, order-free.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import regex

from reprotune.data.pii_checks import (
    PROVINCES,
    card_network_ok,
    id_check_char,
    id_layout_ok,
    id_shaped,
    is_placeholder,
    luhn_ok,
    valid_resident_id,
)
from reprotune.params import PII_TYPES


@contextlib.contextmanager
def _without_transformers() -> Iterator[None]:
    """Import presidio without its transformers NLP engine (never used here): presidio's
    ``nlp_engine`` package imports it when transformers is installed, which loads transformers'
    model and quantizer modules (measured: 9 s and 455 MB for ``import presidio_analyzer``, 4 s
    and 300 MB without). Only while transformers is not imported yet; afterwards it imports
    as usual."""
    blocked = "transformers" not in sys.modules
    if blocked:
        sys.modules["transformers"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        yield
    finally:
        if blocked and sys.modules.get("transformers", 0) is None:
            del sys.modules["transformers"]


with _without_transformers():
    from presidio_analyzer import (  # noqa: E402
        AnalyzerEngine,
        Pattern,
        PatternRecognizer,
        RecognizerRegistry,
        RecognizerResult,
    )
    from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer  # noqa: E402
    from presidio_analyzer.nlp_engine import NoOpNlpEngine  # noqa: E402
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer  # noqa: E402
    from presidio_anonymizer import AnonymizerEngine  # noqa: E402
    from presidio_anonymizer.entities import OperatorConfig  # noqa: E402

__all__ = ["PROVINCES", "AnonymizerEngine", "OperatorConfig", "RecognizerResult", "Span",
           "card_network_ok", "find", "id_check_char", "id_layout_ok", "id_shaped",
           "is_placeholder", "luhn_ok", "resolve", "valid_resident_id"]

logger = logging.getLogger(__name__)

LANG = "xx"  # spaCy's code for "any language": the recognizers are not language-specific
FLAGS = regex.DOTALL | regex.MULTILINE  # case-sensitive unless a pattern says (?i)
# A text can hold PII only if it has a digit, an @ (e-mail), :// (URL password) or a secret
# keyword: texts without any skip the analyzer entirely (measured: bench/pii_bench.py).
MAY_HOLD = regex.compile(r"\d|@|://|(?i:key|token|secret|pass|pwd|bearer|密码|口令)")
_NOT_ALNUM_BEFORE = r"(?<![0-9A-Za-z_])"
_NOT_ALNUM_AFTER = r"(?![0-9A-Za-z_])"


@dataclass(frozen=True, order=True)
class Span:
    """One detected entity: ``text[start:end]`` is a ``type``."""

    start: int
    end: int
    type: str
    score: float = 1.0



class ResidentIdRecognizer(PatternRecognizer):
    def __init__(self) -> None:
        pat = (_NOT_ALNUM_BEFORE + r"[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])"
               r"(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx]" + _NOT_ALNUM_AFTER)
        super().__init__("ID_CARD", name="ResidentIdRecognizer", supported_language=LANG,
                         patterns=[Pattern("cn_resident_id", pat, 0.5)], global_regex_flags=FLAGS)

    def validate_result(self, pattern_text: str) -> bool:
        return valid_resident_id(pattern_text)


class BankCardRecognizer(PatternRecognizer):
    def __init__(self) -> None:
        pat = _NOT_ALNUM_BEFORE + r"\d{4}(?:[ -]?\d{4}){2}[ -]?\d{1,4}(?:[ -]?\d{1,3})?" \
            + _NOT_ALNUM_AFTER
        super().__init__("BANK_CARD", name="BankCardRecognizer", supported_language=LANG,
                         patterns=[Pattern("card_number", pat, 0.3)], global_regex_flags=FLAGS)

    def validate_result(self, pattern_text: str) -> bool:
        d = pattern_text.replace(" ", "").replace("-", "")
        if not 13 <= len(d) <= 19 or not card_network_ok(d) or not luhn_ok(d):
            return False
        return not (len(d) == 18 and id_shaped(d))  # a resident ID, valid or not


class EmailRecognizer(PatternRecognizer):
    def __init__(self) -> None:
        # not the user:password@ of a URL (the password is a SECRET, a user@host no address)
        pat = (r"(?<![A-Za-z0-9_.%+-])(?<!://[^/\s@]*)[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
               r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
               + _NOT_ALNUM_AFTER + r"(?!:[\w~/])")  # user@host:path is an SSH remote
        super().__init__("EMAIL", name="EmailRecognizer", supported_language=LANG,
                         patterns=[Pattern("email", pat, 1.0)], global_regex_flags=FLAGS)


class IpRecognizer(PatternRecognizer):
    def __init__(self) -> None:
        octet = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
        # not a version (v1.2.3.4, 版本 1.0.0.2, FBF-3.6.0.0-x.zip), not a netmask (255.x),
        # not an outline number at the start of a line (1.2.3.1 <heading>)
        v4 = (r"(?<![0-9A-Za-z_.-])(?<!(?:\b(?i:version|ver|v)|版本号?)\s*[:：=]?\s*)"
              r"(?!255\.|0\.)(?!(?<=^[ \t]*)\d\.\d\.\d\.\d[ \t])"
              rf"{octet}(?:\.{octet}){{3}}(?![0-9A-Za-z_]|\.\d|-\w)")
        v6 = r"(?<![0-9A-Za-z_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z_:])"
        super().__init__("IP", name="IpRecognizer", supported_language=LANG,
                         patterns=[Pattern("ipv4", v4, 0.6), Pattern("ipv6", v6, 0.3)],
                         global_regex_flags=FLAGS)

    def validate_result(self, pattern_text: str) -> bool:
        if ":" not in pattern_text:
            return True  # the IPv4 pattern only matches valid dotted quads
        try:
            ipaddress.IPv6Address(pattern_text)
        except ValueError:
            return False
        groups = [g for g in pattern_text.split(":") if g]
        return len(groups) >= 2 and sum(any(c.isdigit() for c in g) for g in groups) >= 2


_B, _E = _NOT_ALNUM_BEFORE, _NOT_ALNUM_AFTER
# a character of a password/key value: not white space, quotes, brackets, CJK text or
# punctuation, nor the '&' that starts a URL's next query parameter (&user=...)
_VALUE = r"(?:[^\s\"'`“”‘’，。、；：！？,;&<>()\[\]{}\p{Han}]|&(?![A-Za-z_]\w*=))"
_SECRET_PATTERNS = [
    ("openai_anthropic", _B + r"sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}" + _E),
    ("stripe", _B + r"[sr]k_(?:live|test)_[A-Za-z0-9]{16,}" + _E),
    ("github", _B + r"(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,})" + _E),
    ("aws_access_key", _B + r"(?:AKIA|ASIA)[0-9A-Z]{16}" + _E),
    ("google_api_key", _B + r"AIza[0-9A-Za-z_-]{35}" + _E),
    ("slack", _B + r"xox[abposr]-[A-Za-z0-9-]{10,}" + _E),
    ("huggingface", _B + r"hf_[A-Za-z0-9]{30,}" + _E),
    ("jwt", _B + r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}" + _E),
    ("bearer", r"(?<=(?i:bearer)\s+)[A-Za-z0-9._~+/-]{15,}[A-Za-z0-9_~+/-]=*"),
    # the value after password= / api_key: / 密码：, quoted or not (only the value is masked;
    # an already masked <TYPE> placeholder is left alone)
    ("assignment", r"(?<=(?i:\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token"
                   r"|auth[_-]?token|password|passwd|pwd)|密码|口令)[\"']?\s*(?:[:=：]|是)\s*[\"']?)"
                   r"(?!<[A-Z_]+>)(?=" + _VALUE + r"{6})" + _VALUE + r"+?(?=[.:]?(?!" + _VALUE
                   + r"))(?![(\[])"),  # a last '.'/':' ends the sentence; not a call or index
    # scheme://user:PASSWORD@host (only the password is masked)
    ("url_password", r"(?<=[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]{1,64}:)(?=[^/\s@]*[A-Za-z0-9])"
                     r"[^/\s@]{1,128}(?=@)"),
]


class SecretRecognizer(PatternRecognizer):
    def invalidate_result(self, pattern_text: str) -> bool:
        return is_placeholder(pattern_text)

    def __init__(self) -> None:
        super().__init__("SECRET", name="SecretRecognizer", supported_language=LANG,
                         patterns=[Pattern(n, p, 1.0) for n, p in _SECRET_PATTERNS],
                         global_regex_flags=FLAGS)


class GatedPhoneRecognizer(PhoneRecognizer):
    """Presidio's ``PhoneRecognizer`` (libphonenumber's matcher, region CN), run only on texts
    with 7+ digits in a phone-like run: the matcher costs ~0.3 ms per text with any digit."""

    RUN = regex.compile(r"\d(?:[\s().-]{0,2}\d){6,}")

    def __init__(self) -> None:
        super().__init__(supported_language=LANG, supported_entity="PHONE",
                         supported_regions=("CN",), leniency=1, name="PhoneRecognizer")

    MOBILE_2 = ("13", "14", "15", "16", "17", "18", "19")
    DECIMAL = regex.compile(r"\d+\.\d+")

    def analyze(self, text, entities, nlp_artifacts=None):  # noqa: ANN001, ANN201
        if not self.RUN.search(text):
            return []
        return [r for r in super().analyze(text, entities, nlp_artifacts)
                if self._plausible(text, r.start, r.end)]

    def _plausible(self, text: str, start: int, end: int) -> bool:
        """Not part of a decimal (``3.1415926535``) or a sum, and without a country code
        written in the Chinese national format: an 11-digit mobile or an area code with its
        trunk 0."""
        raw = text[start:end]
        if self.DECIMAL.fullmatch(raw) or regex.search(r"\d\.$", text[max(0, start - 2):start]) \
                or regex.match(r"\.\d", text[end:end + 2]):
            return False
        if text[max(0, start - 1):start] in ("-", "−") or not regex.match(r"\+?\(?\d", raw):
            return False  # a negative number; '+ 62...' in a sum
        if raw.startswith(("+", "00")):
            return True
        digits = regex.sub(r"\D", "", raw)
        return digits[:1] == "0" or (len(digits) == 11 and digits[:2] in self.MOBILE_2)


def recognizers() -> list:
    return [ResidentIdRecognizer(), GatedPhoneRecognizer(), EmailRecognizer(),
            BankCardRecognizer(), IpRecognizer(), SecretRecognizer()]


@lru_cache(maxsize=1)
def analyzer() -> AnalyzerEngine:
    """Presidio's AnalyzerEngine over this module's recognizers, without an NLP model:
    ``NoOpNlpEngine`` (presidio's own engine for pattern-only set-ups) loads nothing."""
    registry = RecognizerRegistry(supported_languages=[LANG])
    for rec in recognizers():
        registry.add_recognizer(rec)
    nlp = NoOpNlpEngine(models=[{"lang_code": LANG, "model_name": "none"}])
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=[LANG],
                          context_aware_enhancer=_NoContext())


class _NoContext(ContextAwareEnhancer):
    """No context-word boost: the lemma enhancer needs tokens, which the no-op engine lacks,
    and a validated pattern decides here, not nearby words."""

    def __init__(self) -> None:
        super().__init__(context_similarity_factor=0, min_score_with_context_similarity=0,
                         context_prefix_count=0, context_suffix_count=0)

    def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers,  # noqa: ANN001, ANN201
                              context=None):  # noqa: ANN001
        return raw_results


def resolve(spans: Sequence[Span]) -> list[Span]:
    """Non-overlapping spans in text order: the longest first, then the highest score,
    then the earliest start, then the type name (so the result never depends on input order)."""
    chosen: list[Span] = []
    for s in sorted(spans, key=lambda s: (-(s.end - s.start), -s.score, s.start, s.type)):
        if all(s.end <= c.start or s.start >= c.end for c in chosen):
            chosen.append(s)
    return sorted(chosen)


def find(text: str, types: Sequence[str] = PII_TYPES) -> list[Span]:
    """The PII spans of ``text`` (non-overlapping, in order), of the given types."""
    if not text or not MAY_HOLD.search(text):
        return []
    found = analyzer().analyze(text, language=LANG, entities=list(types), score_threshold=0.0)
    return resolve([Span(r.start, r.end, r.entity_type, round(float(r.score), 4))
                    for r in found if r.end > r.start])
