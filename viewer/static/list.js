// The slide list: summary.csv's rows, sortable by any column, filtered by label and status.
"use strict";
let rows = [];
let sortCol = "slide", sortDir = 1;
// summary.csv's in_domain (core.domain): "" where the model cannot tell
const DOMAIN = {"1": "in", "0": "out"};

function slideHref(key) {
  return "/slide/" + key.split("/").map(encodeURIComponent).join("/");
}

function compare(a, b, numeric) {
  if (numeric) {
    const x = a === "" ? -Infinity : Number(a), y = b === "" ? -Infinity : Number(b);
    return x - y;
  }
  return String(a).localeCompare(String(b));
}

function render() {
  const label = document.getElementById("filter-label").value;
  const status = document.getElementById("filter-status").value;
  const numeric = document.querySelector(`th[data-col="${sortCol}"]`).hasAttribute("data-num");
  const shown = rows.filter(r => (!label || r.label === label) && (!status || r.status === status))
    .sort((a, b) => sortDir * compare(a[sortCol], b[sortCol], numeric));
  const body = document.querySelector("#slides tbody");
  body.replaceChildren(...shown.map(r => {
    const tr = document.createElement("tr");
    tr.className = r.status === "ok" ? "" : "failed";
    tr.dataset.slide = r.slide;
    const cells = [r.slide, r.status, r.label, r.score === "" ? "" : Number(r.score).toFixed(4),
                   r.tiles, r.rois, r.decision || "", DOMAIN[r.in_domain] || "", r.seconds,
                   r.model_version, r.error];
    cells.forEach((value, i) => {
      const td = document.createElement("td");
      if (i === 0) {
        const a = document.createElement("a");
        a.href = slideHref(r.slide);
        a.textContent = value;
        td.append(a);
      } else {
        td.textContent = value;
      }
      if (i === 6 && r.decision_reason) {   // label and ROIs disagree: say how (results.decision)
        td.title = r.decision_reason;
        td.className = "review";
      }
      if (i === 7) {   // unlike the training slides: say why (in domain: how close to the edge)
        td.title = r.in_domain === "1" ? `domain score ${Number(r.domain_score).toFixed(3)}`
          : r.domain_reasons || "";
        if (r.in_domain === "0") td.className = "out-of-domain";
      }
      if (i === 10) td.className = "error";
      if (i === 9) {
        td.title = value;
        td.className = "version";
      }
      tr.append(td);
    });
    return tr;
  }));
  document.getElementById("count").textContent = `${shown.length} of ${rows.length} slides`;
  document.querySelectorAll("th").forEach(th => {
    th.classList.toggle("sorted", th.dataset.col === sortCol);
    th.dataset.dir = th.dataset.col === sortCol ? (sortDir > 0 ? "asc" : "desc") : "";
  });
}

function fillFilter(id, values) {
  const select = document.getElementById(id);
  [...new Set(values)].filter(v => v !== "").sort().forEach(v => {
    const option = document.createElement("option");
    option.value = option.textContent = v;
    select.append(option);
  });
  select.addEventListener("change", render);
}

fetch("/api/summary").then(r => r.json()).then(data => {
  rows = data.rows;
  document.getElementById("source").textContent = data.scores_dir;
  fillFilter("filter-label", rows.map(r => r.label));
  fillFilter("filter-status", rows.map(r => r.status));
  document.querySelectorAll("th").forEach(th => th.addEventListener("click", () => {
    sortDir = th.dataset.col === sortCol ? -sortDir : 1;
    sortCol = th.dataset.col;
    render();
  }));
  render();
  document.body.dataset.ready = "1";
});
