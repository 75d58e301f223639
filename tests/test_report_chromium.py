"""``hpcserve report`` in Debian's headless Chromium: the charts painted, nothing broken or fetched, an
empty store said in words; and, on the cluster, the CLI through the real service as alice, bob and carol,
each page read in Chromium too."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from hpcserve.api.report import report_data
from hpcserve.report import data as rd
from hpcserve.report.render import render
from hpcserve.store import HistoryStore
from tests.api_fixtures import ApiService
from tests.report_week import ALICE, CAROL, WEEK_S, api_for, populate, week_store

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def full_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryStore]:
    with week_store(f"sqlite:///{tmp_path_factory.mktemp('report') / 'week.db'}") as store:
        yield store


@pytest.fixture
def empty_store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path / 'empty.db'}") as store:
        store.upgrade()
        yield store


# --------------------------------------------------------------------------- in headless Chromium


class _Dom(HTMLParser):
    """What the rendered DOM holds: each <svg>'s count of drawn children, each <img>'s src, every
    reference to another resource, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: list[int] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "svg":
            self._depth += 1
            if self._depth == 1:
                self.svgs.append(0)
        elif self._depth and tag in ("path", "line", "rect", "polyline", "use"):
            self.svgs[-1] += 1
        if tag == "img":
            self.images.append(values.get("src") or "")
        for name in ("src", "href", "xlink:href"):
            value = values.get(name) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(f"<{tag} {name}={value}>")
        if tag == "link":
            self.external.append("<link>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def chromium(page_file: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is not installed (fix: apt-get install chromium; scripts/bootstrap.sh)"
        )
    argv = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", *args, page_file.as_uri()]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def screenshot_and_dom(html: str, folder: Path, height: int = 2400) -> tuple[Path, _Dom]:
    page_file = folder / "report.html"
    page_file.write_text(html, encoding="utf-8")
    shot = folder / "report.png"
    chromium(page_file, folder / "profile", f"--screenshot={shot}", f"--window-size=1280,{height}")
    dom = _Dom()
    dom.feed(chromium(page_file, folder / "profile", "--dump-dom").stdout)
    return shot, dom


def pixels(shot: Path) -> Any:
    """The screenshot's pixels, one RGB row each (numpy and Pillow: matplotlib's own dependencies)."""
    import numpy as np
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        return np.asarray(image.convert("RGB"), dtype=np.int16).reshape(-1, 3)


def colours(rgb: Any) -> int:
    import numpy as np

    return len(np.unique(rgb, axis=0))


def near(rgb: Any, hex_colour: str, tolerance: int = 40) -> int:
    """How many pixels are within ``tolerance`` (summed over R, G, B) of ``hex_colour``."""
    want = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    return int((abs(rgb - want).sum(axis=1) <= tolerance).sum())


def test_the_report_renders_its_charts_in_headless_chromium(full_store: HistoryStore, tmp_path: Path) -> None:
    shot, dom = screenshot_and_dom(
        render(rd.from_json(report_data(api_for(full_store), CAROL, WEEK_S))), tmp_path
    )
    assert len(dom.svgs) == 3 and all(children > 20 for children in dom.svgs)  # utilisation, queue, TTFT
    for src in dom.images:  # none today; any one added must be an inline image that decodes
        assert src.startswith("data:image/") and base64.b64decode(src.split(",", 1)[1], validate=True)
    assert dom.external == []
    text = " ".join(dom.text)
    assert "Where the GPUs went" in text and "30 Nov 2026 18:00 UTC to 07 Dec 2026 18:00 UTC" in text
    assert "GPUs averaged 4% for 30 min" in text and "No data." in text  # idle flags; usage without sacct
    rgb = pixels(shot)
    assert colours(rgb) > 500  # anti-aliased lines, text and fills: not a blank page
    training_blue, inference_orange = near(rgb, "#0072B2"), near(rgb, "#E69F00")
    assert training_blue > 5000 and inference_orange > 5000  # the lines and the split's areas were painted
    shutil.copy(shot, tmp_path.parent / "report-sample.png")


def test_an_empty_store_gives_a_page_that_says_so_in_words(empty_store: HistoryStore, tmp_path: Path) -> None:
    shot, dom = screenshot_and_dom(
        render(rd.from_json(report_data(api_for(empty_store), ALICE, WEEK_S))), tmp_path
    )
    assert dom.svgs == [] and dom.images == [] and dom.external == []
    text = " ".join(" ".join(dom.text).split())
    assert "No data. The service recorded no queue samples from 30 Nov 2026 18:00 UTC" in text
    assert "No data. Alice's deployments had no engine samples in this period" in text
    assert "No data. None of alice's jobs is flagged idle now." in text
    rgb = pixels(shot)
    assert colours(rgb) > 20  # the page itself rendered (text, boxes)
    assert near(rgb, "#0072B2") < 5000  # no chart lines: only the header's rule and a card's edge


# ------------------------------------------------------------------- the cluster: the real service


@pytest.mark.cluster
def test_each_user_reads_their_own_report_through_the_service(
    api_service: ApiService, short_root: Path, tmp_path: Path
) -> None:
    """The whole path as real users: the service (as root, its own database) answers ``hpcserve report``
    run by alice, bob and carol (an admin through @hpcadmin) with runuser; usage comes from sacct."""
    for user, name in (("alice", "alice-chat"), ("bob", "bob-coder")):
        served = api_service.run_as(user, "serve", "sim-model", "--name", name, "--engine", "simulator",
                                    "--min-replicas", "0", "--json")  # fmt: skip
        assert served.returncode == 0, served.stderr
    clock = [datetime.now(UTC)]
    with HistoryStore(api_service.db_url, clock=lambda: clock[0]) as store:
        populate(store, clock, deployments=False)
    pages, data = {}, {}
    for user in ("alice", "bob", "carol"):
        folder = short_root / user
        folder.mkdir()
        shutil.chown(folder, user)
        done = api_service.run_as(user, "report", "--since", "7d", "-o", str(folder / "week.html"))
        assert done.returncode == 0, done.stderr
        pages[user] = (folder / "week.html").read_text(encoding="utf-8")
        answer = api_service.run_as(user, "report", "--since", "7d", "--json")
        assert answer.returncode == 0, answer.stderr
        data[user] = json.loads(answer.stdout)
    names = {user: [d["name"] for d in data[user]["deployments"]] for user in data}
    assert names == {"alice": ["alice-chat"], "bob": ["bob-coder"], "carol": ["alice-chat", "bob-coder"]}
    assert "bob-coder" not in pages["alice"] and "bob-coder" not in json.dumps(data["alice"])
    assert "alice-chat" not in pages["bob"]
    kinds = {user: [b["kind"] for b in data[user]["busy"]] for user in data}
    assert kinds == {"alice": ["training"], "bob": ["inference"], "carol": ["training", "inference"]}
    assert [data[u]["everyone"] for u in ("alice", "bob", "carol")] == [False, False, True]
    admins = rd.from_json(data["carol"]).partitions
    for answer in data.values():  # sacct was read for each: a table (maybe empty), never "could not be read"
        assert answer["usage"] is not None, answer["usage_note"]
        # cluster facts, everyone's alike (each report began a moment after the last)
        partitions = rd.from_json(answer).partitions
        assert [p.name for p in partitions] == [p.name for p in admins] == ["train", "infer", "all"]
        assert [p.allocated_pct() for p in partitions] == pytest.approx(
            [p.allocated_pct() for p in admins], abs=0.5
        )
        assert (answer["evictions"], answer["lost_gpu_h"]) == (1, 1.5)
    shot, dom = screenshot_and_dom(pages["carol"], short_root)
    assert len(dom.svgs) >= 3 and all(children > 20 for children in dom.svgs) and dom.external == []
    assert colours(pixels(shot)) > 500
    shutil.copy(shot, tmp_path / "report-cluster.png")  # kept by pytest, to look at
