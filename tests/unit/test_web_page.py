"""The demo page's routes (deployments/web) on a bare FastAPI app: no Ray, no browser. The page
itself is tested in a real browser in tests/browser."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.web import STATIC, add_demo_page


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    add_demo_page(app)
    return TestClient(app)


def test_root_and_demo_redirect_to_the_page(client):
    for path in ("/", "/demo"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/demo/"


def test_redirect_keeps_a_route_prefix():
    # behind a Serve route prefix, Serve's proxy sets the prefix as the ASGI root_path
    app = FastAPI()
    add_demo_page(app)
    r = TestClient(app, root_path="/main").get("/main/", follow_redirects=False)
    assert r.headers["location"] == "/main/demo/"


def test_the_page_and_every_asset_it_names_are_served(client):
    page = client.get("/demo/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert {"static/app.js", "static/style.css"} <= set(refs)
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)  # nothing from elsewhere
    for ref in refs:
        r = client.get(f"/demo/{ref}")
        assert r.status_code == 200, ref
    # ES modules load only with a JavaScript media type
    for module in ("app.js", "api.js", "masks.js", "rle.js"):
        ctype = client.get(f"/demo/static/{module}").headers["content-type"]
        assert ctype.split(";")[0] in ("text/javascript", "application/javascript"), ctype
    imports = re.findall(r'from "\./([^"]+)"', (STATIC / "app.js").read_text())
    assert imports and all((STATIC / name).is_file() for name in imports)


def test_an_unknown_asset_is_404(client):
    assert client.get("/demo/static/nope.js").status_code == 404
    assert client.get("/demo/static/../__init__.py").status_code == 404
