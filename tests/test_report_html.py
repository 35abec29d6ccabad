"""report.html in a real browser: headless Chromium (Debian package `chromium`; .ci/run installs
it) loads the page from the hand-made sweep of test_collect, with no console errors and no
network request; the answer is the first thing on screen; hover, legend toggles, table sorting
and filtering, and a click from a plotted point to its row work."""
import json
import struct
import time
from pathlib import Path

import pytest

from browser import CHROMIUM, Browser
from frontier.results import collect, html, plots
from test_collect import BASE, COMB, FAIL, LIN, QNT, write

WIDTH, HEIGHT = 1300, 900


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"headless Chromium not installed ({CHROMIUM} missing): `apt-get install chromium` "
                    "(.ci/run does this before make test)")
    pytest.importorskip("websocket", reason="websocket-client missing: pip install -e '.[test]'")
    return CHROMIUM


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("html")
    out = tmp / "results" / "demo"
    collect.run("demo", write(tmp, [BASE, QNT, LIN, COMB, FAIL]), out, modelled_context_lens=[1024, 131072])
    plots.plot_all(out)
    return html.write_html(out)


@pytest.fixture(scope="module")
def browser(chromium, page):
    with Browser(WIDTH, HEIGHT) as b:
        b.call("Network.enable")
        b.load(page)
        # every figure drawn
        b.wait_for("document.querySelectorAll('.js-plotly-plot').length > 0 && "
                   "[...document.querySelectorAll('.js-plotly-plot')].every(g => g.querySelector('.main-svg'))")
        yield b


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_loads_without_errors_or_network(browser, page):
    assert browser.errors() == []
    urls = [ev["params"]["request"]["url"] for ev in browser.events if ev["method"] == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls
    assert browser.eval("typeof Plotly") == "object"


def test_first_screen_is_the_answer(browser, tmp_path):
    browser.eval("window.scrollTo(0, 0)")
    first = browser.eval("""(() => {
        const s = [...document.querySelectorAll('main > section')].find(s => s.offsetHeight > 0);
        const h = s.querySelector('h2').getBoundingClientRect();
        const p = s.querySelector('.pair p').getBoundingClientRect();
        return {id: s.id, h2: s.querySelector('h2').textContent, pair: s.querySelector('.pair h3').textContent,
                h2_top: h.top, p_bottom: p.bottom, text: s.innerText};
    })()""")
    assert first["id"] == "answer" and first["h2"] == "Answer"
    assert first["pair"].startswith("Attention vs quantization")
    assert 0 <= first["h2_top"] < 200 and first["p_bottom"] < HEIGHT  # heading and first paragraph on screen
    assert "prefill latency from L ≈ 324" in first["text"]
    shot = browser.screenshot(tmp_path / "first_screen.png")
    assert _png_size(shot) == (WIDTH, HEIGHT)


def test_plots_label_on_hover_not_in_print(browser):
    traces = browser.eval("""[...document.querySelectorAll('.js-plotly-plot')].flatMap(
        g => g.data.map(t => ({fig: g.id, type: t.type, mode: t.mode || '', name: t.name,
                                hover: t.hovertemplate || '', text: Array.isArray(t.text) ? t.text.length : 0})))""")
    assert {t["fig"] for t in traces} >= {"fig-front-1", "fig-cost-1", "fig-recall"}
    assert not [t for t in traces if t["type"] == "scatter" and "text" in t["mode"]]  # no printed labels
    assert browser.eval("document.querySelectorAll('.js-plotly-plot .textpoint').length") == 0
    # hover the first quantization point of the first frontier figure
    tip = browser.eval("""(() => {
        const gd = document.getElementById('fig-front-1');
        const i = gd.data.findIndex(t => t.name === 'quantization' && t.mode === 'markers');
        Plotly.Fx.hover(gd, [{curveNumber: i, pointNumber: 0}], gd.data[i].xaxis + gd.data[i].yaxis);
        return gd.querySelector('.hoverlayer').textContent;
    })()""")
    assert "int8/softmax/none" in tip and "family: quantization" in tip and "quant int8" in tip and "ppl 10.2" in tip


def _legend_item(browser, fig: str, name: str) -> dict:
    return browser.eval(f"""(() => {{
        const gd = document.getElementById('{fig}');
        const it = [...gd.querySelectorAll('.legend .traces')].find(t => t.textContent.trim() === '{name}');
        it.scrollIntoView({{block: 'center'}});
        const r = it.querySelector('.legendtoggle').getBoundingClientRect();
        return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
    }})()""")


def _click(browser, x: float, y: float) -> None:
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def test_legend_click_hides_a_family_in_every_panel(browser):
    pos = _legend_item(browser, "fig-cost-1", "quantization")
    _click(browser, pos["x"], pos["y"])
    vis = browser.wait_for("""(() => {
        const d = document.getElementById('fig-cost-1').data.filter(t => t.legendgroup === 'quantization');
        return d.every(t => t.visible === 'legendonly') && d.length;
    })()""", timeout=10)
    assert vis >= 2  # one line per panel, all hidden by one click
    time.sleep(0.6)  # past the legend's double-click window
    _click(browser, pos["x"], pos["y"])
    assert browser.wait_for("""document.getElementById('fig-cost-1').data.filter(t => t.legendgroup === 'quantization')
        .every(t => t.visible !== 'legendonly')""", timeout=10)


def test_click_on_a_point_opens_its_row(browser):
    pos = browser.eval("""(() => {
        const gd = document.getElementById('fig-front-1');
        const i = gd.data.findIndex(t => t.name === 'attention' && t.mode === 'markers');
        const t = gd.data[i], fl = gd._fullLayout, xa = fl[t.xaxis.replace('x', 'xaxis')], ya = fl[t.yaxis.replace('y', 'yaxis')];
        gd.scrollIntoView({block: 'center'});
        const r = gd.getBoundingClientRect();
        return {x: r.left + xa._offset + xa.c2p(t.x[0]), y: r.top + ya._offset + ya.c2p(t.y[0]), id: t.customdata[0][0]};
    })()""")
    _click(browser, pos["x"], pos["y"])
    row = browser.wait_for("(document.querySelector('tr.hl') || {}).id", timeout=10)
    assert row == pos["id"] and row.startswith("run-")
    assert browser.eval("location.hash") == f"#{row}"
    label = browser.eval(f"document.getElementById('{row}').cells[0].textContent")
    assert label == "none/linear_elu/none"


def test_tables_sort_filter_and_hide_columns(browser):
    ppl = browser.eval("""(() => {
        const t = document.getElementById('runs-table');
        const i = [...t.tHead.rows[0].cells].findIndex(c => c.textContent === 'ppl');
        t.tHead.rows[0].cells[i].click();
        return [...t.tBodies[0].rows].map(r => r.cells[i].textContent);
    })()""")
    assert ppl == ["10", "10.2", "10.5", "12", "-"]  # ascending, the failed point last
    shown = browser.eval("""(() => {
        const f = document.querySelector("[data-filter='runs-table']");
        f.value = 'int8'; f.dispatchEvent(new Event('input'));
        const rows = [...document.getElementById('runs-table').tBodies[0].rows].filter(r => !r.hidden);
        return {n: rows.length, count: document.querySelector("[data-count='runs-table']").textContent};
    })()""")
    assert shown == {"n": 2, "count": "2 of 5 rows"}
    more = browser.eval("""(() => {
        const t = document.getElementById('runs-table'), cell = t.querySelector('th.more');
        const before = getComputedStyle(cell).display;
        document.querySelector("[data-more='runs-table']").click();
        return [before, getComputedStyle(cell).display];
    })()""")
    assert more == ["none", "table-cell"]
    # off-front points and point-level crossovers are behind their checkboxes
    off = browser.eval("""(() => {
        const t = document.getElementById('fronts-table'), box = document.querySelector("[data-off='fronts-table']");
        const vis = () => [...t.tBodies[0].rows].filter(r => r.offsetHeight > 0).length;
        const before = vis(); box.click(); return [before, vis(), t.tBodies[0].rows.length];
    })()""")
    assert off[0] < off[1] == off[2]


def test_config_and_overrides_reach_the_reader(browser):
    cfg = browser.eval("""(() => {
        const row = [...document.querySelectorAll('#runs-table tbody tr')]
            .find(r => r.cells[0].textContent === 'int8/sliding_window~window=128/none');
        return row.querySelector('details pre').textContent;
    })()""")
    assert json.loads(cfg)["attention"]["window"] == 128
