"""What an inventory string may hold when it reaches a root shell, a rendered script or an
ssh config: checked once, when the inventory loads, below every module that uses the values.

Quoting where a value is used is the second guard, not the only one: a newline in `cache_dir`
would otherwise become a line of code in /etc/profile.d, and one in a hostname a directive in
a member's ssh config.
"""

from __future__ import annotations

import re

ABSOLUTE_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]*$")
RELATIVE_PATH = re.compile(r"^[A-Za-z0-9._+@][A-Za-z0-9._+@/-]*$")
LOCAL_PATH = re.compile(r"^~?[A-Za-z0-9._+@/-]+$")  # a file on the admin's machine
HOSTNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]*$")  # names, IPv4, IPv6
LOGIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
# [user@]host[:port], comma-separated: ssh's ProxyJump.
JUMPS = re.compile(r"^([A-Za-z0-9._-]+@)?[A-Za-z0-9._:-]+(,([A-Za-z0-9._-]+@)?[A-Za-z0-9._:-]+)*$")
DEBIAN_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")
IMAGE_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")

FORMS = {
    ABSOLUTE_PATH: "an absolute path of letters, digits and ._+@/- (no spaces, quotes or '..')",
    RELATIVE_PATH: "a relative path of letters, digits and ._+@/- (no spaces, quotes or '..')",
    LOCAL_PATH: "a path of letters, digits and ~._+@/- (no spaces or quotes)",
    HOSTNAME: "a host name or address (letters, digits and ._:-)",
    LOGIN: "a login name (letters, digits and ._-)",
    JUMPS: "[user@]host[:port], comma-separated",
    DEBIAN_VERSION: "a package version like 1.17.8-1",
    IMAGE_REFERENCE: "an image reference like nvidia/cuda:13.0.0-base-ubuntu24.04",
}


# What a pasted secret looks like: key material, a URL's query or credentials, a long token.
SECRET = re.compile(r"PRIVATE KEY|PuTTY|://[^/\s]*@|[?#]|[A-Za-z0-9+=_-]{40,}|\n")
SHOWN_LENGTH = 120


def shown(value: str) -> str:
    """`value` quoted for a message, or a stand-in when it may be a secret pasted into the wrong
    field (a private key body, an access token): an error line is copied into chats and logs."""
    if len(value) <= SHOWN_LENGTH and not SECRET.search(value):
        return repr(value)
    return f"the value given ({len(value)} characters, not shown: it may be a secret)"


def problem(value: str, form: re.Pattern[str]) -> str | None:
    """Why `value` is not of `form`, or None when it is."""
    if form.match(value) and ".." not in value.split("/"):
        return None
    return f"{shown(value)} must be {FORMS[form]}"
