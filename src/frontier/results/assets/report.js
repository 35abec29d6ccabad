// report.html (frontier.results.html): sortable, filterable tables; a click on a plotted point
// opens the point's row in the runs table. No dependencies besides plotly.js (inline).
(function () {
  "use strict";
  function num(s) {
    if (s === undefined || s === null || s === "") return null;
    var f = Number(s);
    return isNaN(f) ? null : f;
  }
  function bodyRows(t) { return Array.prototype.slice.call(t.tBodies[0].rows); }
  function ctl(kind, t) { return document.querySelector("[data-" + kind + "='" + t.id + "']"); }

  function refresh(t) {
    var words = (t.dataset.q || "").toLowerCase().split(/\s+/).filter(Boolean);
    var showOff = t.classList.contains("show-off");
    var shown = 0, total = 0;
    bodyRows(t).forEach(function (r) {
      if (r.dataset.text === undefined) r.dataset.text = r.textContent.toLowerCase();
      var listed = showOff || !r.classList.contains("off");
      var match = words.every(function (w) { return r.dataset.text.indexOf(w) >= 0; });
      r.hidden = !(listed && match);
      if (listed) total += 1;
      if (listed && match) shown += 1;
    });
    var c = ctl("count", t);
    if (c) c.textContent = shown + " of " + total + " rows";
  }

  function sortBy(t, i, th) {
    var dir = th.dataset.dir === "asc" ? "desc" : "asc";
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("data-dir"); });
    th.dataset.dir = dir;
    var key = function (r) {
      var c = r.cells[i];
      return c.dataset.v !== undefined ? c.dataset.v : c.textContent.trim();
    };
    var rows = bodyRows(t);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), nx = num(x), ny = num(y), c;
      if (nx !== null && ny !== null) c = nx - ny;
      else if (nx !== null) c = -1;          // numbers before text ("-", "never")
      else if (ny !== null) c = 1;
      else c = x.localeCompare(y, undefined, {numeric: true});
      return dir === "asc" ? c : -c;
    });
    rows.forEach(function (r) { t.tBodies[0].appendChild(r); });
  }

  function gotoRow(id) {
    var r = document.getElementById(id);
    if (!r || r.tagName !== "TR") return;
    var t = r.closest("table");
    if (r.hidden) {
      t.dataset.q = "";
      var f = ctl("filter", t);
      if (f) f.value = "";
      refresh(t);
    }
    document.querySelectorAll("tr.hl").forEach(function (x) { x.classList.remove("hl"); });
    r.classList.add("hl");
    r.scrollIntoView({block: "center"});
    if (location.hash !== "#" + id) history.replaceState(null, "", "#" + id);
  }

  document.querySelectorAll("table.tbl").forEach(function (t) {
    Array.prototype.forEach.call(t.tHead.rows[0].cells, function (th, i) {
      th.addEventListener("click", function () { sortBy(t, i, th); });
    });
    var f = ctl("filter", t);
    if (f) f.addEventListener("input", function () { t.dataset.q = f.value; refresh(t); });
    var m = ctl("more", t);
    if (m) m.addEventListener("click", function () {
      var on = t.classList.toggle("show-more");
      m.textContent = on ? "show fewer columns" : "show all columns";
    });
    var o = ctl("off", t);
    if (o) o.addEventListener("change", function () { t.classList.toggle("show-off", o.checked); refresh(t); });
    refresh(t);
  });

  document.addEventListener("click", function (ev) {
    var a = ev.target.closest && ev.target.closest("a[href^='#run-']");
    if (a) { ev.preventDefault(); gotoRow(a.getAttribute("href").slice(1)); }
  });

  function hookPlots() {
    document.querySelectorAll(".js-plotly-plot").forEach(function (gd) {
      if (!gd.on || gd.dataset.hooked) return;
      gd.dataset.hooked = "1";
      gd.on("plotly_click", function (ev) {
        var p = ev && ev.points && ev.points[0];
        var cd = p && p.customdata;
        var id = Array.isArray(cd) ? cd[0] : cd;
        if (typeof id === "string" && id) gotoRow(id);
      });
    });
  }
  window.frontierReport = {gotoRow: gotoRow, refresh: refresh};
  window.addEventListener("load", function () {
    hookPlots();
    if (location.hash.indexOf("#run-") === 0) gotoRow(location.hash.slice(1));
  });
  hookPlots();
})();
