"""Inline CSS and JS of the HTML report (kept as strings so the package needs no data files).

The JS sorts the results table on header click (numbers numerically via ``data-v``, missing values last),
filters rows with the search box, and honours ``#sort=<column>:<asc|desc>`` and ``#filter=<text>`` in the URL
(handy for linking and for the headless-browser test). It marks the table ``js-sortable`` once wired.
"""

CSS = """
:root { --fg:#1d232b; --muted:#667085; --line:#e4e7ec; --bg:#ffffff; --soft:#f6f8fa; --accent:#0072B2; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:var(--bg);
  font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 1.7rem; margin: 0 0 12px; } h2 { font-size: 1.3rem; margin: 36px 0 12px;
  border-bottom: 1px solid var(--line); padding-bottom: 6px; } h3 { font-size: 1.05rem; margin: 8px 0; }
.muted { color: var(--muted); font-weight: normal; }
nav { position: sticky; top: 0; background: rgba(255,255,255,.95); border-bottom: 1px solid var(--line);
  padding: 8px 0; margin: 16px 0 0; z-index: 5; }
nav a { color: var(--accent); text-decoration: none; margin-right: 18px; font-weight: 600; }
.grid2 { display: grid; grid-template-columns: 2fr 1fr; gap: 24px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
details > summary { cursor: pointer; font-weight: 600; margin: 8px 0; }
pre { background: var(--soft); padding: 12px; border-radius: 6px; overflow: auto; font-size: 12px; }
.finding { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; margin: 10px 0; }
.finding p { margin: 6px 0 0; } .finding .rule { color: var(--muted); font-size: 13px; }
.badge { display: inline-block; border-radius: 10px; padding: 1px 10px; font-size: 12px; font-weight: 700;
  text-transform: uppercase; letter-spacing: .03em; margin-right: 6px; }
.badge.holds { background: #d1fadf; color: #05603a; } .badge.does-not-hold { background: #fee4e2; color: #912018; }
.badge.mixed { background: #fef0c7; color: #93370d; } .badge.not-measured { background: #eaecf0; color: #344054; }
.badge.not-testable-here, .badge.weak { background: #fef0c7; color: #93370d; }
.badge.at-ceiling { background: #d1fadf; color: #05603a; } .badge.no-alignment { background: #fee4e2; color: #912018; }
.badge.caution { background: #fee4e2; color: #912018; }
figure { margin: 18px 0 28px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line);
  border-radius: 6px; } figcaption { color: #344054; font-size: 14px; margin-top: 6px; max-width: 900px; }
table { border-collapse: collapse; font-size: 13px; }
table.data { width: 100%; } .scroll { max-height: 640px; overflow: auto; border: 1px solid var(--line);
  border-radius: 6px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { position: sticky; top: 0; background: var(--soft); cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
tbody tr:nth-child(even) { background: #fbfcfd; } tbody tr:hover { background: #eef4fb; }
tr.total td { font-weight: 700; } table.small th { cursor: default; }
#filter { padding: 6px 10px; width: 320px; border: 1px solid #d0d5dd; border-radius: 6px; margin: 4px 0 10px; }
.feature { margin: 10px 0 16px; } .feature h4 { margin: 4px 0; font-size: 14px; }
.ctx { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
  white-space: pre-wrap; word-break: break-word; padding: 2px 0; border-bottom: 1px dashed var(--line); }
.ctx .act { display: inline-block; min-width: 4em; color: var(--muted); }
mark { background: #ffe08a; padding: 0 2px; border-radius: 3px; font-weight: 700; }
footer { margin-top: 48px; color: var(--muted); font-size: 13px; border-top: 1px solid var(--line);
  padding-top: 10px; }
@media (max-width: 800px) { .grid2 { grid-template-columns: 1fr; } }
"""

JS = """
(function () {
  var table = document.getElementById('results-table');
  if (!table) return;
  var body = table.tBodies[0], heads = table.tHead.rows[0].cells;
  var input = document.getElementById('filter'), count = document.getElementById('rowcount');
  function key(td) {
    var v = td.getAttribute('data-v');
    if (v !== null && v !== '') { var n = parseFloat(v); if (!isNaN(n)) return n; }
    if (v === '') return null;
    return td.textContent.trim().toLowerCase();
  }
  function sortBy(i, dir) {
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[i]), y = key(b.cells[i]);
      if (x === null || y === null) return (x === null) - (y === null);
      var xn = typeof x === 'number', yn = typeof y === 'number', c;
      if (xn && yn) c = x - y; else if (xn) c = -1; else if (yn) c = 1; else c = x < y ? -1 : x > y ? 1 : 0;
      return dir * c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var j = 0; j < heads.length; j++) heads[j].removeAttribute('aria-sort');
    heads[i].setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
  }
  function filter(q) {
    q = q.trim().toLowerCase();
    var shown = 0;
    for (var k = 0; k < body.rows.length; k++) {
      var r = body.rows[k], hit = !q || r.textContent.toLowerCase().indexOf(q) >= 0;
      r.hidden = !hit; if (hit) shown++;
    }
    count.textContent = shown + ' of ' + body.rows.length + ' rows';
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    th.tabIndex = 0;
    var go = function () { sortBy(i, th.getAttribute('aria-sort') === 'ascending' ? -1 : 1); };
    th.addEventListener('click', go);
    th.addEventListener('keydown', function (e) { if (e.key === 'Enter') go(); });
  });
  input.addEventListener('input', function () { filter(input.value); });
  var h = decodeURIComponent(location.hash || '');
  var ms = h.match(/sort=([A-Za-z_]+):(asc|desc)/), mf = h.match(/filter=([^&]+)/);
  if (ms) for (var c = 0; c < heads.length; c++)
    if (heads[c].getAttribute('data-col') === ms[1]) sortBy(c, ms[2] === 'asc' ? 1 : -1);
  if (mf) { input.value = mf[1]; filter(mf[1]); }
  table.classList.add('js-sortable');
})();
"""
