"""Secrets and personal data. A file holding a credential (an AWS access key id, a GitHub
or Slack token, a private key block, or a high-entropy string assigned to a name like
``api_key``) is removed whole: one key usually comes with others the patterns miss.
E-mail addresses are redacted to ``<email>`` (author lines are everywhere in source
headers, and the rest of such files is ordinary code); addresses at the reserved
example domains (RFC 2606) are not personal and stay.

The report names the file and the kind of finding, never the value.
"""

from __future__ import annotations

import math
import re
from collections import Counter

CREDENTIALS = {
    "aws access key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "github token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----"),
}
ASSIGNED_SECRET = re.compile(
    r"""(?i)(?:api[_-]?key|secret[_-]?key|access[_-]?token|auth[_-]?token|secret|"""
    r"""password|passwd|token)\w*\s*[:=]\s*[rbu]?(['"])([A-Za-z0-9+/_\-=.]{16,})\1"""
)
MIN_SECRET_ENTROPY = 3.5  # bits per character; random keys have ~4.5-6, words ~3
# Top-level domains: generic ones and any two-letter country code. Requiring one keeps
# matrix products on attributes (``x@self.weight``) out.
EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+"
    r"(?:com|org|net|edu|gov|mil|int|info|biz|name|pro|io|dev|app|ai|[A-Za-z]{2})\b(?![.\w])"
)
EXAMPLE_DOMAINS = re.compile(r"@(?:[\w-]+\.)*example\.(?:com|org|net)$|@example$", re.I)
REDACTED = "<email>"


def entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def credential(text: str) -> str | None:
    """The kind of the first credential found, else None."""
    for kind, pattern in CREDENTIALS.items():
        if pattern.search(text):
            return kind
    for match in ASSIGNED_SECRET.finditer(text):
        value = match.group(2)
        if entropy(value) >= MIN_SECRET_ENTROPY and re.search(r"\d", value):
            return "high-entropy assigned secret"
    return None


def redact_emails(text: str) -> tuple[str, int]:
    """(text with personal e-mail addresses replaced by ``<email>``, how many)."""
    count = 0

    def replace(match: re.Match) -> str:
        nonlocal count
        if EXAMPLE_DOMAINS.search(match.group(0)):
            return match.group(0)
        count += 1
        return REDACTED

    return EMAIL.sub(replace, text), count
