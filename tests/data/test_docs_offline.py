"""Data Docs offline: CDN links become links to the vendored copies; anything unknown is left and reported."""

from __future__ import annotations

from geoclip.data.docs_offline import CDN_ASSETS, VENDOR, make_offline


def test_every_vendored_asset_exists_with_its_licence():
    assert all((VENDOR / name).is_file() for name in CDN_ASSETS.values())
    assert len(list((VENDOR / "licenses").glob("*.txt"))) == 9


def test_pages_at_any_depth_point_at_the_site_copy_and_unknown_addresses_are_reported(tmp_path):
    (tmp_path / "validations" / "s").mkdir(parents=True)
    index, deep = tmp_path / "index.html", tmp_path / "validations" / "s" / "run.html"
    page = ('<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>'
            '<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/'
            'bootstrap-prefers-dark.css">'
            '<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=20261130T1">'
            '<script src="https://example.org/unknown.js"></script><a href="https://greatexpectations.io">GX</a>'
            '<link rel="icon" href="../static/images/favicon.ico">')
    index.write_text(page)
    deep.write_text(page)
    assert make_offline(tmp_path) == ["https://example.org/unknown.js"]
    top, below = index.read_text(), deep.read_text()
    assert 'src="./static/vendor/jquery-3.7.1.min.js"' in top
    assert 'src="../../static/vendor/jquery-3.7.1.min.js"' in below
    assert 'href="../../static/vendor/bootstrap-prefers-dark-1.1.0.css"' in below
    assert 'src="../../static/images/logo-long.png"' in below
    assert 'src="https://example.org/unknown.js"' in below  # no copy of it: left as it was
    assert 'href="https://greatexpectations.io"' in below  # a link to follow, not an asset to load
    assert 'href="../../static/images/favicon.ico"' in below and 'href="./static/images/favicon.ico"' in top
    assert (tmp_path / "static" / "vendor" / "jquery-3.7.1.min.js").is_file()
