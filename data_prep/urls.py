"""A dataset folder on a web server: `data.root` may be an http(s) URL of a folder that holds
`dataset.json`, its tokenizer and its shards, each named in the card relative to that folder.

A card can come from anyone, so a name in it never leaves the folder it was read from: a name that
resolves to another scheme, host or folder (`../x.tar`, `/x.tar`, `pipe:...`, `file:...`) is refused.
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

URL_SCHEMES = ("http://", "https://")
FETCH_TIMEOUT_S = 60.0
# what a shard name may be when it is put into a command: no shell syntax, no way out of the prefix
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*(/[A-Za-z0-9_][A-Za-z0-9_.=+-]*)*")


def is_url(root) -> bool:
    return isinstance(root, str) and root.lower().startswith(URL_SCHEMES)


def folder_url(root: str) -> str:
    """The folder URL with its trailing slash (so that names resolve inside it, not beside it)."""
    return root if root.endswith("/") else root + "/"


def url_in(folder: str, name: str) -> str | None:
    """The URL of `name` inside `folder` (a folder URL), or None when the name leads out of it."""
    if "\\" in name or any(part in (".", "..") for part in name.split("/")):
        return None
    url = urljoin(folder, name)
    inside = urlsplit(url)
    base = urlsplit(folder)
    if (inside.scheme, inside.netloc) != (base.scheme, base.netloc) or not inside.path.startswith(base.path):
        return None
    return url


def safe_name(name: str) -> bool:
    """Whether a shard name can be put into a user's command as it is (letters, digits, `_.=+-`, `/`
    between parts; no `..`)."""
    return bool(SAFE_NAME.fullmatch(name)) and ".." not in name.split("/")


def fetch(url: str, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """The whole body at `url`; OSError (urllib's errors are OSErrors) when it cannot be had."""
    with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "fico-pipeline"}),
                                timeout=timeout) as response:
        return response.read()


def describe_error(error: Exception) -> str:
    """One line for a failed fetch: `HTTP 404 Not Found`, `connection refused`, ..."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}"
