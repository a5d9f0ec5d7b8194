"""Version ordering of dpkg, RPM and apk, as sort keys.

Each ecosystem's comparison is turned into a *sort key*: a tuple of ints (and
bytes) whose ordinary Python ordering is exactly the package manager's order.
A key is computed once per version string (the index stores the keys of every
range event; a host's installed versions are keyed once per match), so that a
comparison during matching is a native tuple comparison instead of a walk over
two strings: that is what keeps a host's matching in milliseconds.

Why not ``univers``: it is installed and was checked against the same oracles
(tests/unit/test_kb_versions_oracle.py). Its dpkg order agrees with dpkg, but
it is several microseconds per comparison with no way to precompute; its RPM
split of version and release is at the *first* hyphen where rpm splits at the
last one; and its Alpine order is Gentoo's, which refuses common apk versions
(``1.2_git20230101-r0``) and orders others differently from apk. So the three
algorithms are written here from the package managers' own sources, and are
tested against the real tools (dpkg, rpm) on thousands of real versions and
against apk's own comparison table.

- dpkg: ``lib/dpkg/version.c`` ``verrevcmp`` and ``parsehelp.c`` ``parseversion``
  (epoch before the first colon, revision after the last hyphen).
- RPM: ``rpmio/rpmvercmp.c`` ``rpmvercmp`` (tilde, caret, alpha/numeric
  segments) and rpm 4.18's EVR parsing and comparison (epoch digits before a
  colon, release after the last hyphen, a missing release below any release),
  as ``rpm.vercmp`` answers.
- apk: apk-tools ``src/version.c`` (tokens digit/letter/suffix/revision, pre-
  release suffixes ``alpha beta pre rc`` below a release, post-release suffixes
  ``cvs svn git hg p`` above), with numbers of any size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.errors import VsaError

VersionKey = tuple[Any, ...]


class VersionError(VsaError):
    """A version string cannot be read in its ecosystem's syntax."""


# --------------------------------------------------------------------- dpkg

def _dpkg_order(byte: int) -> int:
    # dpkg's order(): letters by code, '~' before everything (even the end),
    # other non-digits after all letters. Digits never reach here.
    if 65 <= byte <= 90 or 97 <= byte <= 122:
        return byte
    if byte == 126:  # '~'
        return -1
    return byte + 256


def _utf8(text: str) -> bytes:
    """The bytes the version algorithms walk (undecodable bytes of a package list come back as they were)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # A lone surrogate outside surrogateescape's range (JSON allows "\ud800"): its
        # bytes are neither letters nor digits, so it compares like any other symbol.
        return text.encode("utf-8", "surrogatepass")


def _dpkg_part_key(text: str) -> tuple[int, ...]:
    """Key of an upstream version or a revision, ordered as dpkg's verrevcmp."""
    data = _utf8(text)
    key: list[int] = []
    i, n = 0, len(data)
    while True:
        # Non-digit prefix, char by char; the terminator 0 stands for the
        # "end or digit" that dpkg compares a shorter prefix with.
        while i < n and not 48 <= data[i] <= 57:
            key.append(_dpkg_order(data[i]))
            i += 1
        key.append(0)
        start = i
        while i < n and 48 <= data[i] <= 57:
            i += 1
        key.append(int(data[start:i]) if i > start else 0)
        if i >= n:
            break
    # A sentinel 0: after a number the other key continues with a non-digit
    # whose order is never 0, so the sentinel sorts exactly as dpkg's "end".
    key.append(0)
    return tuple(key)


def dpkg_key(version: str) -> VersionKey:
    """Sort key of a Debian/Ubuntu version ``[epoch:]upstream[-revision]``."""
    text = version.strip()
    if not text:
        raise VersionError("empty Debian version")
    epoch = 0
    colon = text.find(":")
    if colon >= 0:
        epoch_text = text[:colon]
        if not epoch_text.isascii() or not epoch_text.isdigit():
            raise VersionError(f"Debian version {version!r}: epoch is not a number")
        epoch = int(epoch_text)
        text = text[colon + 1:]
        if not text:
            raise VersionError(f"Debian version {version!r}: nothing after the epoch")
    hyphen = text.rfind("-")
    if hyphen >= 0:
        upstream, revision = text[:hyphen], text[hyphen + 1:]
    else:
        upstream, revision = text, ""
    return (epoch, _dpkg_part_key(upstream), _dpkg_part_key(revision))


# ---------------------------------------------------------------------- RPM

# Token kinds in rpmvercmp's order at one position: '~' sorts before the end
# of the string, the end before '^', '^' before letters, letters before digits.
_RPM_TILDE, _RPM_END, _RPM_CARET, _RPM_ALPHA, _RPM_NUM = 0, 1, 2, 3, 4
# A release that is absent sorts below any release, even an empty one (rpm.vercmp).
_RPM_NO_RELEASE: tuple[Any, ...] = (-1,)


def _rpm_is_alpha(b: int) -> bool:
    return 65 <= b <= 90 or 97 <= b <= 122


def _rpm_is_digit(b: int) -> bool:
    return 48 <= b <= 57


def rpmvercmp_key(text: str) -> tuple[Any, ...]:
    """Key of one version or release string, ordered as rpm's rpmvercmp."""
    data = _utf8(text)
    key: list[Any] = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 126:  # '~'
            key += (_RPM_TILDE, 0)
            i += 1
        elif b == 94:  # '^'
            key += (_RPM_CARET, 0)
            i += 1
        elif _rpm_is_digit(b):
            start = i
            while i < n and _rpm_is_digit(data[i]):
                i += 1
            key += (_RPM_NUM, int(data[start:i]))
        elif _rpm_is_alpha(b):
            start = i
            while i < n and _rpm_is_alpha(data[i]):
                i += 1
            key += (_RPM_ALPHA, data[start:i])
        else:
            i += 1  # separators (anything not ASCII alphanumeric, '~', '^') are skipped
    key += (_RPM_END, 0)
    return tuple(key)


def rpm_key(version: str) -> VersionKey:
    """Sort key of an RPM ``[epoch:]version[-release]``, ordered as ``rpm.vercmp``."""
    text = version.strip()
    if not text:
        raise VersionError("empty RPM version")
    i = 0
    while i < len(text) and "0" <= text[i] <= "9":
        i += 1
    # The release starts after the last hyphen that follows the epoch digits.
    hyphen = text.rfind("-", i)
    if i < len(text) and text[i] == ":":
        epoch = text[:i] or "0"
        rest_start = i + 1
    else:
        epoch = "0"
        rest_start = 0
    if hyphen >= 0:
        ver, release = text[rest_start:hyphen], text[hyphen + 1:]
        release_key = rpmvercmp_key(release)
    else:
        ver = text[rest_start:]
        release_key = _RPM_NO_RELEASE
    return (rpmvercmp_key(epoch), rpmvercmp_key(ver), release_key)


# ---------------------------------------------------------------------- apk

_T_INVALID, _T_DIGIT_OR_ZERO, _T_DIGIT, _T_LETTER = -1, 0, 1, 2
_T_SUFFIX, _T_SUFFIX_NO, _T_REVISION_NO, _T_END = 3, 4, 5, 6
_APK_PRE_SUFFIXES = ("alpha", "beta", "pre", "rc")
_APK_POST_SUFFIXES = ("cvs", "svn", "git", "hg", "p")
# Allowed steps to a lower token type (anything else lower is invalid).
_APK_DOWNSTEPS = {(_T_DIGIT, _T_DIGIT_OR_ZERO), (_T_SUFFIX_NO, _T_SUFFIX), (_T_LETTER, _T_DIGIT)}


def _apk_next_type(current: int, s: str, i: int) -> tuple[int, int]:
    """apk's next_token: the type of the token starting at ``s[i]``, and the new index."""
    n = len(s)
    if i >= n:
        new = _T_END
    elif current in (_T_DIGIT, _T_DIGIT_OR_ZERO) and "a" <= s[i] <= "z":
        new = _T_LETTER
    elif current == _T_LETTER and "0" <= s[i] <= "9":
        new = _T_DIGIT
    elif current == _T_SUFFIX and "0" <= s[i] <= "9":
        new = _T_SUFFIX_NO
    else:
        c = s[i]
        if c == ".":
            new = _T_DIGIT_OR_ZERO
        elif c == "_":
            new = _T_SUFFIX
        elif c == "-" and i + 1 < n and s[i + 1] == "r":
            new = _T_REVISION_NO
            i += 1
        else:
            new = _T_INVALID
        i += 1
    if new < current and (current, new) not in _APK_DOWNSTEPS:
        new = _T_INVALID
    return new, i


def _apk_get_token(ttype: int, s: str, i: int) -> tuple[int, int, int]:
    """apk's get_token: (value, type of the next token, new index)."""
    n = len(s)
    if i >= n:
        return 0, _T_END, i
    value = 0
    j = i
    forced_next = _T_INVALID
    if ttype == _T_DIGIT_OR_ZERO and s[j] == "0":
        # Leading zeros count as a negative number: 1.01 < 1.1, 1.001 < 1.01.
        while j < n and s[j] == "0":
            j += 1
        value = -(j - i)
        forced_next = _T_DIGIT
    elif ttype in (_T_DIGIT_OR_ZERO, _T_DIGIT, _T_SUFFIX_NO, _T_REVISION_NO):
        while j < n and "0" <= s[j] <= "9":
            j += 1
        value = int(s[i:j]) if j > i else 0
    elif ttype == _T_LETTER:
        value = ord(s[j])
        j += 1
    elif ttype == _T_SUFFIX:
        for index, suffix in enumerate(_APK_PRE_SUFFIXES):
            if s.startswith(suffix, i):
                value = index - len(_APK_PRE_SUFFIXES)
                j = i + len(suffix)
                break
        else:
            for index, suffix in enumerate(_APK_POST_SUFFIXES):
                if s.startswith(suffix, i):
                    value = index
                    j = i + len(suffix)
                    break
            else:
                return -1, _T_INVALID, i
    else:
        return -1, _T_INVALID, i
    if j >= n:
        return value, _T_END, j
    if forced_next != _T_INVALID:
        return value, forced_next, j
    new_type, j = _apk_next_type(ttype, s, j)
    return value, new_type, j


def _apk_rank(ttype: int, value: int) -> int:
    # Where two versions agree so far and their next token types differ, apk
    # says: a pre-release suffix is lower; otherwise the higher type is lower
    # (a version that ends, or goes on to a revision, is below one that goes
    # on with more digits). Ranks encode that so tuple order is apk's order.
    if ttype == _T_SUFFIX and value < 0:
        return -100
    return -ttype


def apk_key(version: str) -> VersionKey:
    """Sort key of an Alpine version, ordered as apk-tools' version compare."""
    s = version.strip()
    if not s:
        raise VersionError("empty Alpine version")
    key: list[int] = []
    ttype = _T_DIGIT
    i = 0
    while True:
        value, next_type, i = _apk_get_token(ttype, s, i)
        key.append(value)
        if next_type in (_T_END, _T_INVALID):
            key.append(_apk_rank(next_type, 0))
            break
        # The rank of the next token needs its value when it is a suffix
        # (pre or post release); peek at it without consuming.
        if next_type == _T_SUFFIX:
            peek_value, _, _ = _apk_get_token(next_type, s, i)
            key.append(_apk_rank(next_type, peek_value))
        else:
            key.append(_apk_rank(next_type, 0))
        ttype = next_type
    return tuple(key)


def apk_is_valid(version: str) -> bool:
    """Whether apk itself accepts ``version`` (apk_version_validate)."""
    ttype, i, s = _T_DIGIT, 0, version
    while ttype not in (_T_END, _T_INVALID):
        _, ttype, i = _apk_get_token(ttype, s, i)
    return ttype == _T_END


# ----------------------------------------------------------------- schemes

KeyFunction = Callable[[str], VersionKey]

SCHEME_DPKG, SCHEME_RPM, SCHEME_APK = "dpkg", "rpm", "apk"
_KEYS: dict[str, KeyFunction] = {SCHEME_DPKG: dpkg_key, SCHEME_RPM: rpm_key, SCHEME_APK: apk_key}

# OSV ecosystem names (https://ossf.github.io/osv-schema/#affectedpackage-field),
# by the part before the first colon, and the version order each one uses.
_ECOSYSTEM_SCHEMES = {
    "Debian": SCHEME_DPKG,
    "Ubuntu": SCHEME_DPKG,
    "Alpine": SCHEME_APK,
    "Red Hat": SCHEME_RPM,
    "Rocky Linux": SCHEME_RPM,
    "AlmaLinux": SCHEME_RPM,
    "Amazon Linux": SCHEME_RPM,  # not an OSV ecosystem (yet): for bundles that carry ALAS
    "Azure Linux": SCHEME_RPM,
    "openSUSE": SCHEME_RPM,
    "SUSE": SCHEME_RPM,
    "Mageia": SCHEME_RPM,
    "openEuler": SCHEME_RPM,
    "Wolfi": SCHEME_APK,  # apk-based distributions
    "Chainguard": SCHEME_APK,
    "Alpaquita": SCHEME_APK,
}


def scheme_for_ecosystem(ecosystem: str) -> str | None:
    """The version scheme (dpkg, rpm, apk) of an OSV ecosystem name, or None if unknown."""
    return _ECOSYSTEM_SCHEMES.get(ecosystem.split(":", 1)[0].strip())


def key_function(scheme: str) -> KeyFunction:
    """The sort-key function of a scheme returned by :func:`scheme_for_ecosystem`."""
    return _KEYS[scheme]


def compare(scheme: str, a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is lower than, equal to or higher than ``b`` in ``scheme``."""
    key = _KEYS[scheme]
    ka, kb = key(a), key(b)
    return (ka > kb) - (ka < kb)
