"""The search page of `pipeline.search serve`: one HTML template (Jinja, autoescaped), its script and its
style. Plain HTML and JavaScript, nothing loaded from elsewhere (the server's Content-Security-Policy
allows only its own origin), so the page works on a machine without internet."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ card.name }}: search</title>
<link rel="stylesheet" href="page.css">
</head>
<body data-gallery="{{ card.gallery }}" data-measure="{{ card.measure }}">
<header>
  <h1>{{ card.name }}</h1>
  <p>{{ card.count }} {{ card.gallery }} in <code>{{ card.index }}</code></p>
</header>
<main>
<section id="search">
  <form id="text-form">
    <input id="text" name="text" type="search" placeholder="describe what you look for" autocomplete="off">
    <button id="text-go" type="submit">Search</button>
  </form>
  <form id="image-form">
    <label>or an image (up to {{ max_mib }} MiB): <input id="image" name="image" type="file" accept="image/*"></label>
    <img id="preview" alt="">
  </form>
  <label>results <input id="k" type="number" min="1" max="{{ max_k }}" value="10"></label>
  <p id="status" role="status"></p>
  <div id="results" class="{{ card.gallery }}"></div>
</section>
<aside id="card">
  <h2>Model</h2>
  <p>{{ card.family }}</p>
  <table>
    <tr><th>run</th><td><code>{{ card.path }}</code></td></tr>
    <tr><th>representation</th><td>{{ card.representation }}</td></tr>
    <tr><th>measure</th><td>{{ card.measure }}</td></tr>
  </table>
  <h3>Test metrics</h3>
  {% if card.metric_table.columns %}
  <table id="metrics">
    <tr><th></th>{% for name in card.metric_table.columns %}<th>{{ name }}</th>{% endfor %}</tr>
    {% for direction, values in card.metric_table.rows.items() %}
    <tr><th>{{ direction }}</th>{% for v in values %}<td>{{ v }}</td>{% endfor %}</tr>
    {% endfor %}
  </table>
  <p>R@K and mAP in %{% if card.metric_table.rsum is not none %}; rsum {{ "%.1f"|format(card.metric_table.rsum) }}{% endif %}</p>
  {% else %}<p>the run has no test_metrics.json</p>{% endif %}
  <h3>Provenance</h3>
  {% if card.provenance %}
  <table id="provenance">
    {% for name, value in card.provenance.items() %}
    <tr><th>{{ name }}</th><td>{{ value }}</td></tr>
    {% endfor %}
  </table>
  {% else %}<p>the run has no provenance.json</p>{% endif %}
</aside>
</main>
<script src="page.js"></script>
</body>
</html>
"""

SCRIPT = r"""
"use strict";
const gallery = document.body.dataset.gallery;
const hamming = document.body.dataset.measure === "hamming";
const results = document.getElementById("results");
const statusLine = document.getElementById("status");

function k() { return document.getElementById("k").value || "10"; }

function scoreText(score) {
  return hamming ? "distance " + score : score.toFixed(4);
}

function fileName(path) { return path.split("/").pop(); }

function show(answer, positions, ms) {
  results.replaceChildren();
  statusLine.textContent = answer.results.length + " results for \u201c" + answer.query + "\u201d (" + ms + " ms)";
  const list = document.createElement(gallery === "images" ? "div" : "ol");
  list.className = "ranked";
  answer.results.forEach((r, i) => {
    if (gallery === "images") {
      const fig = document.createElement("figure");
      fig.className = "hit";
      fig.dataset.position = positions[i];
      const img = document.createElement("img");
      img.src = "api/item/" + positions[i];
      img.alt = fileName(r.path);
      img.title = r.path;
      const cap = document.createElement("figcaption");
      cap.textContent = (i + 1) + ". " + fileName(r.path) + " \u00b7 " + scoreText(r.score);
      fig.append(img, cap);
      list.append(fig);
    } else {
      const li = document.createElement("li");
      li.className = "hit";
      li.dataset.position = positions[i];
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = scoreText(r.score);
      li.append(score, " ", r.text);
      list.append(li);
    }
  });
  results.append(list);
}

async function ask(request) {
  statusLine.textContent = "searching\u2026";
  const start = performance.now();
  try {
    const res = await fetch(request);
    const body = await res.json();
    if (!res.ok) {
      results.replaceChildren();
      statusLine.textContent = "error: " + body.error;
      return;
    }
    const positions = (res.headers.get("X-Positions") || "").split(",");
    show(body, positions, Math.round(performance.now() - start));
  } catch (e) {
    statusLine.textContent = "error: " + e;
  }
}

document.getElementById("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = document.getElementById("text").value;
  if (!text.trim()) return;
  ask("api/query?" + new URLSearchParams({text: text, k: k()}));
});

document.getElementById("image").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const preview = document.getElementById("preview");
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name;
  const form = new FormData();
  form.append("image", file);
  form.append("k", k());
  ask(new Request("api/query", {method: "POST", body: form}));
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { padding: 0.6em 1.2em; background: #25364a; color: #fff; }
header h1 { margin: 0; font-size: 1.3em; }
header p { margin: 0.2em 0 0; font-size: 0.85em; opacity: 0.85; }
main { display: flex; gap: 1.5em; padding: 1em 1.2em; align-items: flex-start; }
#search { flex: 3; min-width: 0; }
#card { flex: 1; min-width: 16em; max-width: 26em; font-size: 0.85em; background: #fff; border: 1px solid #ddd; padding: 0.6em 1em; }
#card table { border-collapse: collapse; }
#card th { text-align: left; font-weight: normal; color: #666; padding-right: 0.8em; }
#card code, #card td { overflow-wrap: anywhere; }
#metrics td { text-align: right; padding-left: 0.5em; }
form { margin-bottom: 0.6em; }
#text { width: 60%; font-size: 1em; padding: 0.3em; }
#preview { max-height: 48px; vertical-align: middle; margin-left: 1em; }
#preview:not([src]) { display: none; }
#k { width: 4em; }
#status { color: #555; min-height: 1.2em; }
.images .ranked { display: grid; grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)); gap: 0.6em; }
.hit img { width: 100%; aspect-ratio: 1; object-fit: cover; background: #eee; }
figure.hit { margin: 0; font-size: 0.75em; }
figcaption { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.texts .score { font-family: monospace; color: #555; margin-right: 0.5em; }
"""
