// cxrlabel review page: the image with its contours and CTR lines, zoom and pan, vertex
// editing, and the decisions (accept, reject, save a correction). Plain browser JavaScript,
// no build step. Coordinates of polygons are original image pixels, as the server stores them.
"use strict";

const COLOURS = { heart: "#ff4040", left_lung: "#40d040", right_lung: "#3fa0ff" };
const STRUCTURES = ["heart", "left_lung", "right_lung"];
const HANDLE = 6; // px on screen: how close a click must be to grab a vertex

let view = JSON.parse(document.getElementById("view-data").textContent);
let polygons = structuredClone(view.polygons); // being edited
let dirty = new Set();
let selected = "heart";
let overlay = true;
let redraw = null; // points of a structure being redrawn
let zoom = 1, panX = 0, panY = 0; // screen = original * fit * zoom + pan
let fit = 1;
let drag = null;
const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const image = new Image();
const reviewer = document.getElementById("reviewer");
const message = document.getElementById("message");

reviewer.value = reviewer.value || localStorage.getItem("cxrlabel-reviewer") || "";
reviewer.addEventListener("change", () => localStorage.setItem("cxrlabel-reviewer", reviewer.value.trim()));

function say(text, error = false) {
  message.textContent = text;
  message.className = error ? "error" : "";
}

function resize() {
  const r = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.floor(r.width));
  canvas.height = Math.max(1, Math.floor(r.height));
  draw();
}

function fitView() {
  fit = Math.min(canvas.width / view.width, canvas.height / view.height);
  zoom = 1;
  panX = (canvas.width - view.width * fit) / 2;
  panY = (canvas.height - view.height * fit) / 2;
  draw();
}

const toScreen = ([x, y]) => [x * fit * zoom + panX, y * fit * zoom + panY];
const toImage = (sx, sy) => [(sx - panX) / (fit * zoom), (sy - panY) / (fit * zoom)];

function draw() {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#111";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (image.complete && image.naturalWidth) {
    const s = fit * zoom;
    ctx.setTransform(s * view.width / image.naturalWidth, 0, 0, s * view.height / image.naturalHeight, panX, panY);
    ctx.drawImage(image, 0, 0);
    ctx.setTransform(1, 0, 0, 1, 0, 0);
  }
  if (!overlay) return;
  for (const name of STRUCTURES) {
    for (const poly of polygons[name] || []) {
      ctx.beginPath();
      poly.forEach((p, i) => { const [x, y] = toScreen(p); i ? ctx.lineTo(x, y) : ctx.moveTo(x, y); });
      ctx.closePath();
      ctx.strokeStyle = COLOURS[name];
      ctx.lineWidth = name === selected ? 2 : 1.2;
      ctx.stroke();
      if (name === selected) {
        ctx.fillStyle = COLOURS[name];
        for (const p of poly) { const [x, y] = toScreen(p); ctx.fillRect(x - 3, y - 3, 6, 6); }
      }
    }
  }
  drawCtrLines();
  if (redraw) {
    ctx.beginPath();
    redraw.forEach((p, i) => { const [x, y] = toScreen(p); i ? ctx.lineTo(x, y) : ctx.moveTo(x, y); });
    ctx.strokeStyle = "#ffff00";
    ctx.setLineDash([4, 3]);
    ctx.stroke();
    ctx.setLineDash([]);
  }
}

function extent(name) {
  const pts = (polygons[name] || []).flat();
  if (!pts.length) return null;
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  return { x0: Math.min(...xs), x1: Math.max(...xs), y0: Math.min(...ys), y1: Math.max(...ys) };
}

function drawCtrLines() {
  // the heart's widest extent and the thorax's, at the lower heart (where the CTR is read)
  const h = extent("heart"), l = extent("left_lung"), r = extent("right_lung");
  if (!h || !l || !r) return;
  const y = h.y0 + 0.7 * (h.y1 - h.y0);
  const line = (x0, x1, dy, colour) => {
    const [a, b] = toScreen([x0, y]), [c] = toScreen([x1, y]);
    ctx.beginPath(); ctx.moveTo(a, b + dy); ctx.lineTo(c, b + dy);
    ctx.strokeStyle = colour; ctx.lineWidth = 1.5; ctx.stroke();
  };
  line(h.x0, h.x1, 0, "#ffd400");
  line(Math.min(l.x0, r.x0), Math.max(l.x1, r.x1), 4, "#00e5ff");
}

function liveCtr() {
  const h = extent("heart"), l = extent("left_lung"), r = extent("right_lung");
  if (!h || !l || !r) return null;
  return (h.x1 - h.x0 + 1) / (Math.max(l.x1, r.x1) - Math.min(l.x0, r.x0) + 1);
}

function fmt(v, d = 3) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); }

function showPanel() {
  const m = view.measurements;
  const rows = [
    ["CTR (model)", fmt(m.ctr)], ["CTR (reviewed)", fmt(m.reviewed_ctr)],
    ["CTR (as drawn now)", fmt(liveCtr())],
    ["heart width", m.heart_width_mm ? `${fmt(m.heart_width_mm, 1)} mm` : `${m.heart_width_px ?? "–"} px`],
    ["thoracic width", m.thoracic_width_mm ? `${fmt(m.thoracic_width_mm, 1)} mm` : `${m.thoracic_width_px ?? "–"} px`],
    ...(m.input_check && m.input_check !== "ok" ? [["flagged by the input check", m.input_check]] : []),
    ["quality (est. Dice)", fmt(m.quality)], ["  heart", fmt(m.quality_heart)],
    ["  left lung", fmt(m.quality_left_lung)], ["  right lung", fmt(m.quality_right_lung)],
    ["view", view.view || "unknown"],
  ];
  const table = document.getElementById("measurements");
  table.replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td></td>";
    tr.children[0].textContent = k; tr.children[1].textContent = v;
    return tr;
  }));
  const list = document.getElementById("structures");
  list.replaceChildren(...STRUCTURES.filter(s => view.polygons[s]).map((s, i) => {
    const div = document.createElement("div");
    div.className = "structure" + (s === selected ? " selected" : "");
    div.dataset.structure = s;
    const by = dirty.has(s) ? "edited, not saved" : `drawn by ${view.drawn_by[s]}`;
    div.innerHTML = `<span class="swatch"></span><span></span>`;
    div.children[0].style.background = COLOURS[s];
    div.children[1].textContent = `${i + 1} ${s.replace("_", " ")} (${by})`;
    div.addEventListener("click", () => select(s));
    return div;
  }));
  document.getElementById("state").textContent = view.state || "not reviewed";
  document.getElementById("save").disabled = dirty.size === 0;
  document.getElementById("history").replaceChildren(...view.history.map(h => {
    const li = document.createElement("li");
    li.textContent = `${h.decision} ${h.structure || "image"} by ${h.reviewer} at ${h.at}` + (h.note ? ` (${h.note})` : "");
    return li;
  }));
}

function select(name) { selected = name; showPanel(); draw(); }

function nearestVertex(sx, sy) {
  let best = null;
  (polygons[selected] || []).forEach((poly, pi) => poly.forEach((p, vi) => {
    const [x, y] = toScreen(p);
    const d = Math.hypot(x - sx, y - sy);
    if (d <= HANDLE && (!best || d < best.d)) best = { pi, vi, d };
  }));
  return best;
}

function nearestEdge(sx, sy) {
  let best = null;
  (polygons[selected] || []).forEach((poly, pi) => poly.forEach((p, vi) => {
    const [ax, ay] = toScreen(p), [bx, by] = toScreen(poly[(vi + 1) % poly.length]);
    const len2 = (bx - ax) ** 2 + (by - ay) ** 2 || 1;
    const t = Math.max(0, Math.min(1, ((sx - ax) * (bx - ax) + (sy - ay) * (by - ay)) / len2));
    const d = Math.hypot(ax + t * (bx - ax) - sx, ay + t * (by - ay) - sy);
    if (d <= HANDLE && (!best || d < best.d)) best = { pi, vi, d };
  }));
  return best;
}

function edited(name) { dirty.add(name); showPanel(); draw(); }

const at = e => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };

canvas.addEventListener("mousedown", e => {
  canvas.focus();
  const [sx, sy] = at(e);
  if (e.button !== 0) return;
  if (redraw) { redraw.push(toImage(sx, sy).map(Math.round)); draw(); return; }
  const v = overlay && nearestVertex(sx, sy);
  if (v && e.altKey) { removeVertex(v); return; }
  drag = v ? { kind: "vertex", ...v } : { kind: "pan", sx, sy, panX, panY };
  canvas.style.cursor = v ? "move" : "grabbing";
});
canvas.addEventListener("mousemove", e => {
  if (!drag) return;
  const [sx, sy] = at(e);
  if (drag.kind === "pan") { panX = drag.panX + sx - drag.sx; panY = drag.panY + sy - drag.sy; draw(); return; }
  const [x, y] = toImage(sx, sy);
  polygons[selected][drag.pi][drag.vi] = [Math.round(Math.min(Math.max(x, 0), view.width - 1)),
                                          Math.round(Math.min(Math.max(y, 0), view.height - 1))];
  drag.moved = true;
  draw();
});
window.addEventListener("mouseup", () => {
  if (drag && drag.kind === "vertex" && drag.moved) edited(selected);
  drag = null;
  canvas.style.cursor = "grab";
});
canvas.addEventListener("dblclick", e => {
  const [sx, sy] = at(e);
  const edge = overlay && !redraw && nearestEdge(sx, sy);
  if (!edge) return;
  polygons[selected][edge.pi].splice(edge.vi + 1, 0, toImage(sx, sy).map(Math.round));
  edited(selected);
});
canvas.addEventListener("contextmenu", e => {
  const [sx, sy] = at(e);
  const v = overlay && nearestVertex(sx, sy);
  if (v) { e.preventDefault(); removeVertex(v); }
});
canvas.addEventListener("wheel", e => {
  e.preventDefault();
  const [sx, sy] = at(e);
  const [x, y] = toImage(sx, sy);
  zoom = Math.min(40, Math.max(0.2, zoom * (e.deltaY < 0 ? 1.15 : 1 / 1.15)));
  panX = sx - x * fit * zoom;
  panY = sy - y * fit * zoom;
  draw();
}, { passive: false });

function removeVertex({ pi, vi }) {
  const poly = polygons[selected][pi];
  if (poly.length <= 3) { say("an outline needs at least 3 vertices: redraw it (d) instead", true); return; }
  poly.splice(vi, 1);
  edited(selected);
}

async function send(decision, body = {}) {
  const name = reviewer.value.trim();
  if (!name) { say("type your name in 'reviewer' first", true); reviewer.focus(); return null; }
  localStorage.setItem("cxrlabel-reviewer", name);
  const res = await fetch(`/api/review/${encodeURIComponent(view.uid)}`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ decision, version: view.version, reviewer: name,
                           note: document.getElementById("note").value || null, ...body }),
  });
  const answer = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
  if (!res.ok) { say(answer.error || `${res.status}`, true); return null; }
  view = answer;
  polygons = structuredClone(view.polygons);
  dirty = new Set();
  showPanel(); draw();
  return view;
}

async function decide(decision) {
  if (dirty.size) { say("save or undo (Esc) the edits first", true); return; }
  if (await send(decision)) {
    say(`${decision}: saved as version ${view.version}`);
    const next = document.getElementById("next");
    if (next) setTimeout(() => { window.location = next.href; }, 400);
  }
}

async function saveCorrection() {
  if (!dirty.size) return;
  const changed = Object.fromEntries([...dirty].map(s => [s, polygons[s]]));
  if (await send("corrected", { polygons: changed })) {
    say(`correction saved (version ${view.version}); reviewed CTR ${fmt(view.measurements.reviewed_ctr)}`);
  }
}

document.getElementById("accept").addEventListener("click", () => decide("accepted"));
document.getElementById("reject").addEventListener("click", () => decide("rejected"));
document.getElementById("save").addEventListener("click", saveCorrection);

document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT") return;
  const go = id => { const a = document.getElementById(id); if (a) window.location = a.href; };
  switch (e.key) {
    case "a": decide("accepted"); break;
    case "r": decide("rejected"); break;
    case "s": saveCorrection(); break;
    case "n": case "ArrowRight": go("next"); break;
    case "p": case "ArrowLeft": go("prev"); break;
    case "o": overlay = !overlay; draw(); break;
    case "z": fitView(); break;
    case "1": case "2": case "3": {
      const s = STRUCTURES.filter(x => view.polygons[x])[Number(e.key) - 1];
      if (s) select(s);
      break;
    }
    case "d": redraw = []; say(`redrawing ${selected}: click its outline, Enter to end, Esc to cancel`); draw(); break;
    case "Enter":
      if (redraw && redraw.length >= 3) { polygons[selected] = [redraw]; redraw = null; edited(selected); say(""); }
      break;
    case "Escape":
      redraw = null; polygons = structuredClone(view.polygons); dirty = new Set(); say("edits undone");
      showPanel(); draw(); break;
    default: return;
  }
  e.preventDefault();
});

window.addEventListener("resize", resize);
image.addEventListener("load", draw);
image.addEventListener("error", async () => {
  const res = await fetch(image.src);
  const answer = await res.json().catch(() => ({}));
  say(answer.error || "the image could not be loaded", true);
});
image.src = `/api/png/${encodeURIComponent(view.uid)}`;
showPanel();
resize();
fitView();
document.body.dataset.ready = "yes";  // for tests: the page has drawn
