// One slide: OpenSeadragon deep zoom (image coordinates = level-0 px, the tiles are made with
// limit_bounds=False), the heatmap (one RGBA pixel per tile) and the ROI polygons as overlays
// placed in level-0 coordinates, hover scores from /api/scores, downloads, live scoring (SSE).
"use strict";
const keyPath = location.pathname.slice("/slide/".length);   // URL-encoded, as the API wants it
const key = decodeURIComponent(keyPath);
const $ = id => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

const state = {
  viewer: null, info: null, tileSize: null, cols: 0, rows: 0,
  tiles: null,        // Map row * cols + col -> index into the patch table
  table: null,        // {x, y, score, artefact}
  heatmap: null,      // <img> overlay
  live: null,         // <canvas> overlay while scoring live
  roiLayer: null,     // <svg> overlay
  legend: [],
};
// What the live stream did, with times from the click (ms): read by the browser tests.
window.milroi = {state, liveLog: []};

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

// -- the domain check (core.domain): a banner over a slide unlike the training slides
function showDomain(outOfDomain, reasons) {
  $("domain-banner").hidden = !outOfDomain;   // in domain, or the model cannot tell: no banner
  $("domain-reasons").replaceChildren(...(outOfDomain ? reasons : []).map(text => {
    const li = document.createElement("li");
    li.textContent = text;
    return li;
  }));
}

// -- the colour map (the server's stops, linearly interpolated) for live tiles
function hexToRgb(hex) {
  return [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
}
function colour(score) {
  const stops = state.legend, n = stops.length - 1;
  const t = Math.min(Math.max(score, 0), 1) * n, i = Math.min(Math.floor(t), n - 1), f = t - i;
  const a = hexToRgb(stops[i]), b = hexToRgb(stops[i + 1]);
  return `rgb(${a.map((v, k) => Math.round(v + f * (b[k] - v))).join(",")})`;
}

// -- overlays in level-0 coordinates
function gridRect() {
  return state.viewer.viewport.imageToViewportRectangle(
    0, 0, state.cols * state.tileSize, state.rows * state.tileSize);
}

function opacity() {
  return Number($("opacity").value);
}

function addHeatmap() {
  const img = document.createElement("img");
  img.id = "heatmap";
  img.className = "heatmap";
  img.alt = "";
  img.style.opacity = opacity();
  state.heatmap = img;
  reloadHeatmap();
  state.viewer.addOverlay({element: img, location: gridRect()});
}

function reloadHeatmap() {
  const threshold = Number($("threshold").value);
  state.heatmap.dataset.loaded = "";
  state.heatmap.onload = () => { state.heatmap.dataset.loaded = String(threshold); };
  state.heatmap.src = `/api/heatmap/${keyPath}?threshold=${threshold}`;
}

function drawRois(rois) {
  // rois: [{exterior: [[x, y]...], holes: [[[x, y]...]...], area_um2, max_score}]
  if (state.roiLayer) state.viewer.removeOverlay(state.roiLayer);
  const {width, height} = state.info.deepzoom;
  const svg = document.createElementNS(SVG, "svg");
  svg.id = "roi-layer";
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.classList.add("rois");
  const list = $("rois");
  list.replaceChildren();
  rois.forEach((roi, i) => {
    const ring = points => "M" + points.map(p => `${p[0]},${p[1]}`).join("L") + "Z";
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", ring(roi.exterior) + (roi.holes || []).map(ring).join(""));
    path.setAttribute("fill-rule", "evenodd");
    path.setAttribute("vector-effect", "non-scaling-stroke");
    path.dataset.roi = i + 1;
    svg.append(path);
    const xs = roi.exterior.map(p => p[0]), ys = roi.exterior.map(p => p[1]);
    const box = [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
    const item = document.createElement("li");
    item.dataset.roi = i + 1;
    const max = roi.max_score === null || roi.max_score === undefined ? "-" : roi.max_score.toFixed(3);
    item.innerHTML = `<a href="#">ROI ${i + 1}</a>: ${(roi.area_um2 / 1e6).toFixed(4)} mm², ` +
      `max score ${max}`;
    item.querySelector("a").addEventListener("click", event => {
      event.preventDefault();
      zoomTo(box);
    });
    list.append(item);
  });
  $("roi-count").textContent = `(${rois.length})`;
  state.roiLayer = svg;
  state.viewer.addOverlay({element: svg, location: state.viewer.viewport.imageToViewportRectangle(
    0, 0, width, height)});
}

function zoomTo([x0, y0, x1, y1]) {
  const margin = 0.25 * Math.max(x1 - x0, y1 - y0);
  const rect = state.viewer.viewport.imageToViewportRectangle(
    x0 - margin, y0 - margin, x1 - x0 + 2 * margin, y1 - y0 + 2 * margin);
  state.viewer.viewport.fitBounds(rect);
}

function spatiopathRois(polygons) {
  const ring = r => r.x.map((x, i) => [x, r.y[i]]);
  return polygons.map(p => ({exterior: ring(p), holes: (p.holes || []).map(ring),
                             area_um2: p.area_um2, max_score: p.max_score}));
}

// -- hover: the scores row (/api/scores) of the tile under the cursor
function indexTable(table) {
  state.table = table;
  state.tiles = new Map();
  for (let i = 0; i < table.x.length; i++) {
    const col = Math.floor(table.x[i] / state.tileSize), row = Math.floor(table.y[i] / state.tileSize);
    state.tiles.set(row * state.cols + col, i);
  }
}

function hover(position) {
  const hoverBox = $("hover");
  const p = state.viewer.viewport.viewerElementToImageCoordinates(position);
  const col = Math.floor(p.x / state.tileSize), row = Math.floor(p.y / state.tileSize);
  const i = state.tiles && col >= 0 && row >= 0 && col < state.cols ? state.tiles.get(row * state.cols + col)
    : undefined;
  if (i === undefined) {
    hoverBox.textContent = `(${Math.floor(p.x)}, ${Math.floor(p.y)}): no scored tile`;
    hoverBox.dataset.score = "";
    return;
  }
  const t = state.table, score = t.score[i].toFixed(6);
  const distance = t.domain_distance ? t.domain_distance[i] : null;   // null: not known
  hoverBox.textContent = `tile x ${t.x[i]}, y ${t.y[i]}: score ${score}` +
    (t.artefact[i] ? ` (artefact: ${t.artefact[i]}, left out)` : "") +
    (distance === null ? "" : `, domain ${distance.toFixed(2)} (${distance > 1 ? "out" : "in"})`);
  Object.assign(hoverBox.dataset, {x: t.x[i], y: t.y[i], score});
}

// -- live scoring over server-sent events
function startLive() {
  const log = window.milroi.liveLog = [];
  const started = performance.now();
  const since = () => performance.now() - started;
  const source = new EventSource(`/api/live/${keyPath}`);
  let job = null, painted = 0, total = 0, context = null;
  $("score").disabled = true;
  $("cancel").disabled = false;
  $("live-status").textContent = "starting...";
  const finish = (text, kind) => {
    source.close();
    log.push({kind, t: since(), painted});
    $("live-status").textContent = text;
    $("score").disabled = false;
    $("cancel").disabled = true;
  };
  $("cancel").onclick = () => {
    if (job) fetch(`/api/live-cancel/${job}`, {method: "POST"});
    finish(`cancelled after ${painted} of ${total} tiles`, "cancelled");
  };
  source.addEventListener("job", e => { job = JSON.parse(e.data).job; });
  source.addEventListener("header", e => {
    const h = JSON.parse(e.data);
    total = h.tile_count;
    state.tileSize = h.tile_size;
    state.cols = Math.ceil(h.width / h.tile_size);
    state.rows = Math.ceil(h.height / h.tile_size);
    $("live-progress").max = Math.max(total, 1);
    $("live-progress").value = 0;
    if (state.live) state.viewer.removeOverlay(state.live);
    const canvas = document.createElement("canvas");
    canvas.id = "live-heatmap";
    canvas.className = "heatmap";
    canvas.width = state.cols;
    canvas.height = state.rows;
    canvas.style.opacity = opacity();
    context = canvas.getContext("2d", {willReadFrequently: true});
    state.live = canvas;
    state.viewer.addOverlay({element: canvas, location: gridRect()});
    if (state.heatmap) state.heatmap.style.visibility = "hidden";
    state.tiles = new Map();
    state.table = {x: [], y: [], score: [], artefact: []};
    log.push({kind: "header", t: since(), tiles: total});
    $("live-status").textContent = `scoring ${total} tiles with ${h.model.name} v${h.model.version}`;
  });
  source.addEventListener("tiles", e => {
    const c = JSON.parse(e.data), t = state.table;
    for (let i = 0; i < c.score.length; i++) {
      const col = Math.floor(c.x[i] / state.tileSize), row = Math.floor(c.y[i] / state.tileSize);
      t.x.push(c.x[i]); t.y.push(c.y[i]); t.score.push(c.score[i]);
      t.artefact.push(c.artefact[i] ? "artefact" : "");
      state.tiles.set(row * state.cols + col, t.x.length - 1);
      if (!c.artefact[i] && c.score[i] >= Number($("threshold").value)) {
        context.fillStyle = colour(c.score[i]);
        context.fillRect(col, row, 1, 1);
      }
    }
    painted += c.score.length;
    $("live-progress").value = painted;
    log.push({kind: "tiles", t: since(), painted, nonblank: countPainted(context)});
  });
  source.addEventListener("summary", e => {
    const s = JSON.parse(e.data);
    drawRois(s.rois);
    const score = s.slide_score === null ? "-" : s.slide_score.toFixed(4);
    $("verdict").textContent = `live: ${s.label}, score ${score}`;
    if (s.decision && s.decision.decision === "review") {
      $("verdict").textContent += ` | review: ${s.decision.reason}`;
      $("verdict").classList.add("review");
    }
    // The live verdict replaces the stored one: a banner shown from the summary row may go.
    const domain = s.domain || {};
    showDomain(domain.in_domain === false, domain.reasons || []);
    finish(`done: ${s.label} (score ${score}), ${s.tile_count} tiles, ${s.rois.length} ROI(s), ` +
           `${(s.timings.total_s || 0).toFixed(1)} s`, "summary");
  });
  source.addEventListener("failed", e => finish(`failed: ${JSON.parse(e.data).message}`, "failed"));
  source.addEventListener("cancelled", () => finish("cancelled", "cancelled"));
  source.onerror = () => {   // the connection dropped: never let EventSource reconnect (a new score)
    if (source.readyState !== EventSource.CLOSED) finish("connection to the viewer lost", "failed");
  };
}

function countPainted(context) {
  const data = context.getImageData(0, 0, context.canvas.width, context.canvas.height).data;
  let n = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i]) n++;
  return n;
}

// -- the page
function setUpControls() {
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = opacity().toFixed(2);
    for (const layer of [state.heatmap, state.live]) if (layer) layer.style.opacity = opacity();
  });
  $("threshold").addEventListener("input", () => {
    $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  });
  $("threshold").addEventListener("change", () => { if (state.heatmap) reloadHeatmap(); });
}

async function main() {
  setUpControls();
  const response = await fetch(`/api/slide/${keyPath}`);
  const info = state.info = await response.json();
  if (!response.ok) {
    showMessage(info.error);
    return;
  }
  state.legend = info.legend;
  $("legend-bar").style.background = `linear-gradient(to right, ${info.legend.join(",")})`;
  document.title = `milroi: ${key}`;
  $("title").textContent = key;
  const row = info.row;
  $("verdict").textContent = row.status === "ok"
    ? `${row.label}${row.score ? ", score " + Number(row.score).toFixed(4) : ""}, ${row.tiles} tiles`
    : `scoring ${row.status}`;
  if (row.decision === "review") {   // label and ROIs disagree (results.decision): say so
    $("verdict").textContent += ` | review: ${row.decision_reason}`;
    $("verdict").classList.add("review");
  }
  // summary.csv's cells: in_domain "0" out, "1" in, "" unknown; reasons joined by "; "
  showDomain(row.in_domain === "0", row.domain_reasons ? row.domain_reasons.split("; ") : []);
  showMessage([...new Set([row.error, info.slide_error].filter(Boolean))].join(" / "));
  const labels = {csv: "patch scores (CSV)", geojson: "QuPath (GeoJSON)", spatiopath: "Spatiopath JSON"};
  for (const kind of Object.keys(labels).filter(k => k in info.downloads)) {
    const li = document.createElement("li"), a = document.createElement("a");
    a.href = `/download/${kind}/${keyPath}`;
    a.download = "";
    a.textContent = labels[kind];
    li.append(a);
    $("downloads").append(li);
  }
  $("live").hidden = !info.live;
  $("score").addEventListener("click", startLive);
  if (!info.deepzoom) {   // the slide cannot be opened: show the server's error tile
    if (info.slide_error) {
      state.viewer = OpenSeadragon({
        element: $("osd"), prefixUrl: "/static/openseadragon/images/", drawer: "canvas",
        tileSources: {type: "image", url: `/api/tile/0/0/0/${keyPath}`},
      });
      state.viewer.addHandler("open", () => { document.body.dataset.ready = "1"; });
      state.viewer.addHandler("open-failed", () => { document.body.dataset.ready = "1"; });
    } else {
      document.body.dataset.ready = "1";
    }
    return;
  }
  const dz = info.deepzoom;
  const viewer = state.viewer = OpenSeadragon({
    element: $("osd"),
    prefixUrl: "/static/openseadragon/images/",
    drawer: "canvas",
    showNavigator: true,
    maxZoomPixelRatio: 4,
    gestureSettingsMouse: {clickToZoom: false},
    tileSources: {
      width: dz.width, height: dz.height, tileSize: dz.tile_size, tileOverlap: dz.overlap,
      getTileUrl: (level, x, y) => `/api/tile/${level}/${x}/${y}/${keyPath}`,
    },
  });
  viewer.addHandler("open", async () => {
    if (info.downloads.csv) {
      // The heatmap image and the hover table load side by side.
      const tableLoad = fetch(`/api/scores/${keyPath}`).then(r => r.json());
      state.tileSize = info.tile_size || (await tableLoad).tile_size;
      if (state.tileSize > 0) {   // 0: a slide without a tissue tile
        state.cols = Math.ceil(dz.width / state.tileSize);
        state.rows = Math.ceil(dz.height / state.tileSize);
        addHeatmap();
        indexTable(await tableLoad);
      }
    }
    drawRois(spatiopathRois(info.rois));
    new OpenSeadragon.MouseTracker({
      element: viewer.canvas,
      moveHandler: e => { if (state.tileSize) hover(e.position); },
    }).setTracking(true);
    document.body.dataset.ready = "1";
  });
  viewer.addHandler("tile-load-failed", e => showMessage(`a tile failed to load: ${e.message}`));
}

main();
