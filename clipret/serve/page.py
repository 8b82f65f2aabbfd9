"""The web page at ``/``: drop or choose an image, or type text, and see the top k as thumbnails with scores.

Plain HTML and a little JavaScript, served by the app itself: nothing is loaded from elsewhere
(no CDN), so it works offline and behind a firewall. Ids and scores reach the page through
``textContent``, never as markup. With a token, the page sends it with every request (it is kept
in the tab's sessionStorage only), and thumbnails are fetched with it.
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipret search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2rem; text-align: center; margin-bottom: 1rem; }
  #drop.over { background: #eef; border-color: #55f; }
  form { display: flex; gap: .5rem; margin-bottom: 1rem; flex-wrap: wrap; align-items: center; }
  #text { flex: 1; min-width: 12rem; padding: .4rem; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: .8rem; }
  figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .4rem; }
  figure img { width: 100%; height: 150px; object-fit: contain; background: #f4f4f4; }
  figcaption { font-size: .8rem; word-break: break-all; }
  #status { margin: .5rem 0; min-height: 1.2em; color: #555; }
  #status.error { color: #b00; }
</style>
</head>
<body>
<h1>clipret search</h1>
<div id="drop">Drop an image here, or <label>choose one: <input type="file" id="file" accept="image/*"></label></div>
<form id="text-form">
  <input id="text" type="search" placeholder="or describe it in words (text search)" autocomplete="off">
  <label>k <input id="k" type="number" min="1" max="1000" placeholder="default" style="width:5.5rem"></label>
  <button id="search-text" type="submit">Search</button>
  <label>token <input id="token" type="password" autocomplete="off" style="width:8rem"></label>
</form>
<div id="status"></div>
<div id="results"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const tokenBox = $("token");
tokenBox.value = sessionStorage.getItem("clipret-token") || "";
tokenBox.addEventListener("change", () => sessionStorage.setItem("clipret-token", tokenBox.value));

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (tokenBox.value) h["Authorization"] = "Bearer " + tokenBox.value;
  return h;
}
function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}
function k() { const n = parseInt($("k").value, 10); return n > 0 ? n : null; }  // null: the server's --k

async function thumbnail(img, id) {
  const url = "items/" + encodeURIComponent(id) + "/thumbnail";
  if (!tokenBox.value) { img.src = url; return; }
  const r = await fetch(url, { headers: headers() });
  if (r.ok) img.src = URL.createObjectURL(await r.blob());
}

function show(answer) {
  const box = $("results");
  box.replaceChildren();
  answer.ids.forEach((id, i) => {
    const fig = document.createElement("figure");
    fig.className = "hit";
    const img = document.createElement("img");
    img.alt = id;
    const cap = document.createElement("figcaption");
    cap.textContent = (i + 1) + ". " + id + "  (" + answer.scores[i].toFixed(4) + ")";
    fig.append(img, cap);
    box.append(fig);
    thumbnail(img, id);
  });
  status(answer.ids.length + " results from the " + answer.gallery + " gallery in " + answer.took_ms.toFixed(1) + " ms");
}

async function search(body, isJson) {
  status("searching...");
  const init = { method: "POST", body: body, headers: headers(isJson ? { "Content-Type": "application/json" } : {}) };
  try {
    const r = await fetch("search", init);
    const answer = await r.json();
    if (!r.ok) { status(answer.detail || ("error " + r.status), true); return; }
    show(answer);
  } catch (e) {
    status("the request failed: " + e, true);
  }
}

function searchFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  if (k()) form.append("k", String(k()));
  search(form, false);
}

$("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
$("text-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (text) search(JSON.stringify(k() ? { text: text, k: k() } : { text: text }), true);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  searchFile(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""
