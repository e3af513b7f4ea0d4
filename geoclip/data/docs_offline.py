"""Data Docs that work offline: the CSS, JS and fonts GX links from CDNs, vendored (docs_vendor/) and linked locally.

Without them the pages render unstyled on a machine with no network, and the index page's list, drawn by
bootstrap-table, stays empty.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

VENDOR = Path(__file__).with_name("docs_vendor")
SITE_FOLDER = "static/vendor"  # inside a Data Docs site

#: CDN address GX 1.x writes -> the vendored file (under docs_vendor/).
CDN_ASSETS = {
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery-3.7.1.min.js",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap-4.3.1.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap-4.3.1.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper-1.12.9.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table-1.19.1.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table-1.19.1.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table-filter-control-1.19.1.min.js",
    # GX links the filter-control CSS of 1.19.0; 1.19.1's is the same stylesheet.
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table-filter-control-1.19.1.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-filter-control-1.19.1.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker-1.9.0.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker-1.9.0.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega-5.30.0.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite-5.21.0.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed-6.26.0.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome-6.6.0/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-prefers-dark-1.1.0.css",
}
# GX's logo comes from its S3 bucket (with a cache-busting date); the site ships the same image.
_LOGO = re.compile(r"https://great-expectations-web-assets\.s3\.[a-z0-9-]+\.amazonaws\.com/logo-long\.png(\?[^\"']*)?")
# A page's links into the site's static/ folder (GX writes the favicon's one level short on validation pages).
_STATIC_REF = re.compile(r"""(\b(?:src|href)=["'])(?:\.{1,2}/)*static/""")
_ASSET_ATTR = re.compile(r"""(<(?:script|link|img)\b[^>]*?\b(?:src|href)=)(["'])(https?://[^"']+)\2""")


def make_offline(site: str | Path) -> list[str]:
    """Copy the vendored assets into ``site`` and point every page's scripts, stylesheets and images at them;
    return the remote addresses no vendored file stands for (left as they are)."""
    site = Path(site)
    shutil.copytree(VENDOR, site / SITE_FOLDER, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
    unknown: set[str] = set()
    for page in site.rglob("*.html"):
        to_site = os.path.relpath(site, page.parent).replace(os.sep, "/")
        text = _STATIC_REF.sub(lambda m, up=to_site: f"{m.group(1)}{up}/static/", page.read_text(encoding="utf-8"))
        text = _ASSET_ATTR.sub(lambda m, up=to_site: _local(m, up, unknown), text)
        page.write_text(text, encoding="utf-8")
    return sorted(unknown)


def _local(match: re.Match, to_site: str, unknown: set[str]) -> str:
    """One remote ``src``/``href`` of a page ``to_site`` below the site root, pointed at its vendored copy."""
    url = match.group(3)
    if url in CDN_ASSETS:
        target = f"{to_site}/{SITE_FOLDER}/{CDN_ASSETS[url]}"
    elif _LOGO.fullmatch(url):
        target = f"{to_site}/static/images/logo-long.png"
    else:
        unknown.add(url)
        return match.group(0)
    return f"{match.group(1)}{match.group(2)}{target}{match.group(2)}"
