// terra_nb graph and fallback inspector: the anywidget front end (terra_nb/inspector.py).
// Python sends a view already collapsed by name scope; this module lays it out with dagre,
// draws it as SVG with pan/zoom, and asks Python (custom messages) to expand, collapse,
// reveal or search. See docs/inspector.md.
import { Graph, layout } from "@dagrejs/dagre";

const COLOURS = {
  "fallback site": "#d2452f",
  "branch point": "#8e44ad",
  fetch: "#e67e22",
  feed: "#2e86c1",
  variable: "#27ae60",
  "function call": "#7f8c8d",
  "host op": "#b7950b",
  "DL op": "#5d6d7e",
};
const CHAR_WIDTH = 6.6;
const NODE_HEIGHT = 34;
const MIN_FIT_ZOOM = 0.45; // below this labels are unreadable: pan (drag) and zoom (wheel) instead

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function element(tag, className, html) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (html !== undefined) node.innerHTML = html;
  return node;
}

// Lay out one view: visible nodes are leaves, expanded groups are dagre clusters.
function place(view) {
  const g = new Graph({ compound: true, multigraph: false });
  g.setGraph({ rankdir: "TB", nodesep: 14, ranksep: 28, marginx: 12, marginy: 12 });
  g.setDefaultEdgeLabel(() => ({}));
  const clusters = new Set(view.expanded);
  for (const path of clusters) {
    g.setNode("c:" + path, { label: path.split("/").pop(), cluster: true });
  }
  for (const path of clusters) {
    const parent = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : "";
    if (parent && clusters.has(parent)) g.setParent("c:" + path, "c:" + parent);
  }
  for (const node of view.nodes) {
    const sub = node.kind === "group" ? `${node.count} op${node.count === 1 ? "" : "s"}` : node.shapes[0] || "";
    const chars = Math.max(node.label.length, sub.length, 6);
    g.setNode(node.id, { width: 16 + chars * CHAR_WIDTH, height: NODE_HEIGHT, data: node, sub });
    if (node.parent && clusters.has(node.parent)) g.setParent(node.id, "c:" + node.parent);
  }
  for (const [source, target, count] of view.edges) {
    g.setEdge(source, target, { count });
  }
  layout(g);
  return g;
}

function drawSvg(g, selected, matches) {
  const parts = [];
  for (const id of g.nodes()) {
    const box = g.node(id);
    if (!box.cluster) continue;
    const x = box.x - box.width / 2;
    const y = box.y - box.height / 2;
    parts.push(
      `<g class="ti-cluster" data-id="${esc(id)}"><rect x="${x}" y="${y}" width="${box.width}" ` +
        `height="${box.height}" rx="6"/><text x="${x + 6}" y="${y + 12}">${esc(box.label)} ` +
        `<tspan class="ti-collapse">[collapse]</tspan></text></g>`,
    );
  }
  for (const e of g.edges()) {
    const edge = g.edge(e);
    const d = edge.points.map((p, i) => `${i ? "L" : "M"}${p.x.toFixed(1)},${p.y.toFixed(1)}`);
    parts.push(
      `<path class="ti-edge" d="${d.join("")}" stroke-width="${Math.min(1 + Math.log2(edge.count), 5)}">` +
        `<title>${edge.count} tensor edge${edge.count === 1 ? "" : "s"}</title></path>`,
    );
  }
  for (const id of g.nodes()) {
    const box = g.node(id);
    if (box.cluster) continue;
    const node = box.data;
    const x = box.x - box.width / 2;
    const y = box.y - box.height / 2;
    const classes = ["ti-node", node.kind === "group" ? "ti-group" : "ti-op"];
    if (node.fallbacks) classes.push("ti-fallback");
    if (id === selected) classes.push("ti-selected");
    if (matches.has(id)) classes.push("ti-match");
    const colour = COLOURS[node.roles[0]] || COLOURS["DL op"];
    const badge = node.fallbacks
      ? `<circle cx="${x + box.width}" cy="${y}" r="9" class="ti-badge"/>` +
        `<text class="ti-badge-text" x="${x + box.width}" y="${y + 4}">${node.fallbacks}</text>`
      : "";
    parts.push(
      `<g class="${classes.join(" ")}" data-id="${esc(id)}" data-role="${esc(node.roles[0])}">` +
        `<rect x="${x}" y="${y}" width="${box.width}" height="${box.height}" rx="${node.kind === "group" ? 8 : 3}" ` +
        `fill="${colour}"/><text x="${box.x}" y="${y + 14}">${esc(node.label)}</text>` +
        `<text class="ti-sub" x="${box.x}" y="${y + 27}">${esc(box.sub)}</text>${badge}</g>`,
    );
  }
  return parts.join("");
}

function detailsHtml(node) {
  if (!node) return "<p class='ti-hint'>Click a node for details; double-click a group to expand it.</p>";
  const rows = [];
  const row = (name, value) => rows.push(`<tr><th>${esc(name)}</th><td>${value}</td></tr>`);
  if (node.kind === "group") {
    row("scope", `<code>${esc(node.scope)}</code>`);
    row("ops", String(node.count));
    row("op types", node.types.map(([t, n]) => `${esc(t)} ×${n}`).join(", "));
    row("roles", Object.entries(node.role_counts).map(([r, n]) => `${esc(r)} ×${n}`).join(", "));
  } else {
    row("op type", `<b>${esc(node.label)}</b>`);
    row("scope", `<code>${esc(node.scope || "(none)")}</code>`);
    row("roles", node.roles.map(esc).join(", "));
    row("outputs", node.dtypes.map((d, i) => `${esc(d)} ${esc(node.shapes[i])}`).join("<br>") || "none");
    row("inputs", node.inputs.map(esc).join("<br>") || "none");
    row("source", node.source.map((s) => `<code>${esc(s)}</code>`).join("<br>") || "unknown");
    row("visits", String(node.visits));
    if (node.fetches) {
      row("Python waited", `${node.fetch_wait_ms} ms per fetch (${node.fetches} fetches)`);
    }
  }
  if (node.fallbacks) row("fallbacks", `<b class="ti-red">${node.fallbacks}</b>`);
  const buttons =
    (node.kind === "group" ? `<button data-act="expand">expand</button>` : "") +
    (node.parent ? `<button data-act="collapse">collapse ${esc(node.parent.split("/").pop())}</button>` : "");
  return `<table class="ti-details">${rows.join("")}</table>${buttons}`;
}

function render({ model, el }) {
  el.classList.add("terra-inspector");
  const bar = element("div", "ti-bar");
  const search = element("input", "ti-search");
  search.placeholder = "search op type or scope…";
  const fit = element("button", "", "fit");
  const info = element("span", "ti-info");
  bar.append(search, fit, info);
  const results = element("div", "ti-results");
  const main = element("div", "ti-main");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.classList.add("ti-svg");
  const scene = document.createElementNS("http://www.w3.org/2000/svg", "g");
  svg.append(scene);
  const side = element("div", "ti-side");
  const details = element("div", "ti-detail-box");
  const fallbacks = element("div", "ti-fallbacks");
  side.append(details, fallbacks);
  main.append(svg, side);
  const legend = element(
    "div",
    "ti-legend",
    Object.entries(COLOURS)
      .map(([role, c]) => `<span><i style="background:${c}"></i>${esc(role)}</span>`)
      .join(""),
  );
  el.append(bar, results, main, legend);

  let view = null;
  let placed = null;
  let selected = null;
  let matches = new Set();
  let zoom = { x: 0, y: 0, k: 1 };

  const apply = () => scene.setAttribute("transform", `translate(${zoom.x},${zoom.y}) scale(${zoom.k})`);
  const fitView = () => {
    if (!placed) return;
    const graph = placed.graph();
    const width = svg.clientWidth || 640;
    const height = svg.clientHeight || 420;
    const k = Math.min(width / (graph.width || 1), height / (graph.height || 1), 1.5);
    if (k < MIN_FIT_ZOOM) {
      // Too big to fit readably (e.g. one group of many siblings): start at its top left.
      zoom = { k: MIN_FIT_ZOOM, x: 0, y: 0 };
    } else {
      zoom = { k, x: (width - graph.width * k) / 2, y: Math.max((height - graph.height * k) / 2, 0) };
    }
    apply();
  };
  const centre = (id) => {
    const box = placed && placed.hasNode(id) ? placed.node(id) : null;
    if (!box) return;
    zoom.k = Math.max(zoom.k, 0.8);
    zoom.x = (svg.clientWidth || 640) / 2 - box.x * zoom.k;
    zoom.y = (svg.clientHeight || 420) / 2 - box.y * zoom.k;
    apply();
  };
  const nodeById = (id) => view && view.nodes.find((n) => n.id === id);
  const redraw = () => {
    scene.innerHTML = drawSvg(placed, selected, matches);
    details.innerHTML = detailsHtml(nodeById(selected));
  };
  // Selecting only moves a class: rebuilding the SVG would replace the element under the
  // pointer between the two clicks of a double-click.
  const select = (id) => {
    for (const node of scene.querySelectorAll(".ti-selected")) node.classList.remove("ti-selected");
    selected = id;
    const target = [...scene.querySelectorAll(".ti-node")].find((n) => n.dataset.id === id);
    if (target) target.classList.add("ti-selected");
    details.innerHTML = detailsHtml(nodeById(selected));
  };
  const show = (next, focus) => {
    const start = performance.now();
    view = next;
    if (!view || !view.nodes) {
      info.textContent = "no trace graph yet";
      return;
    }
    placed = place(view);
    if (selected && !nodeById(selected)) selected = null;
    if (focus && nodeById(focus)) selected = focus;
    redraw();
    const fb = view.fallbacks;
    fallbacks.innerHTML =
      `<div class="ti-title">fallback sites: ${fb.length}</div>` +
      fb
        .map(
          (f, i) =>
            `<div class="ti-fb-row" data-i="${i}" data-line="${f.line ?? ""}" title="${esc(f.explanation)}">` +
            `it ${f.iteration} · ${esc(f.kind)} · ${esc(f.op)}<br><code>line ${f.line ?? "?"}: ${esc(f.source)}</code></div>`,
        )
        .join("");
    if (focus) centre(focus);
    else fitView();
    const ms = performance.now() - start;
    info.textContent = `${view.ops} ops · ${view.nodes.length} shown · ${view.edges.length} edges · drawn in ${ms.toFixed(0)} ms`;
    el.dataset.version = String(view.version);
    el.dataset.renderMs = ms.toFixed(1);
    el.dataset.shown = String(view.nodes.length);
  };

  const request = (type, id) => model.send({ type, id });
  svg.addEventListener("click", (event) => {
    const target = event.target.closest("[data-id]");
    if (!target) return;
    const id = target.dataset.id;
    if (id.startsWith("c:")) {
      if (event.target.closest(".ti-collapse")) request("collapse", "g:" + id.slice(2));
      return;
    }
    select(id);
  });
  svg.addEventListener("dblclick", (event) => {
    const target = event.target.closest("[data-id]");
    if (target && target.dataset.id.startsWith("g:")) request("expand", target.dataset.id);
  });
  details.addEventListener("click", (event) => {
    const act = event.target.dataset.act;
    const node = nodeById(selected);
    if (!act || !node) return;
    if (act === "expand") request("expand", node.id);
    else request("collapse", "g:" + node.parent);
  });
  fallbacks.addEventListener("click", (event) => {
    const row = event.target.closest(".ti-fb-row");
    const site = row && view.fallbacks[Number(row.dataset.i)];
    if (site && site.ops.length) request("reveal", site.ops[0]);
  });
  results.addEventListener("click", (event) => {
    const hit = event.target.closest("[data-id]");
    if (hit) request("reveal", hit.dataset.id);
  });
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      const query = search.value.trim().toLowerCase();
      matches = new Set(
        query && view ? view.nodes.filter((n) => `${n.label} ${n.scope}`.toLowerCase().includes(query)).map((n) => n.id) : [],
      );
      if (placed) redraw();
      if (query) model.send({ type: "search", query });
      else results.innerHTML = "";
    }, 200);
  });
  fit.addEventListener("click", fitView);

  svg.addEventListener(
    "wheel",
    (event) => {
      event.preventDefault();
      const rect = svg.getBoundingClientRect();
      const px = event.clientX - rect.left;
      const py = event.clientY - rect.top;
      const factor = Math.exp(-event.deltaY * 0.0015);
      const k = Math.min(Math.max(zoom.k * factor, 0.05), 4);
      zoom.x = px - ((px - zoom.x) * k) / zoom.k;
      zoom.y = py - ((py - zoom.y) * k) / zoom.k;
      zoom.k = k;
      apply();
    },
    { passive: false },
  );
  let drag = null;
  svg.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX - zoom.x, y: event.clientY - zoom.y, moved: false };
  });
  svg.addEventListener("pointermove", (event) => {
    if (!drag) return;
    zoom.x = event.clientX - drag.x;
    zoom.y = event.clientY - drag.y;
    apply();
  });
  const stop = () => (drag = null);
  svg.addEventListener("pointerup", stop);
  svg.addEventListener("pointerleave", stop);

  const onGraph = () => show(model.get("graph"));
  const onMessage = (msg) => {
    if (msg.type === "view") show(msg.graph, msg.focus);
    else if (msg.type === "search" && msg.query.toLowerCase() === search.value.trim().toLowerCase()) {
      results.innerHTML = msg.results.length
        ? msg.results.map((r) => `<span class="ti-hit" data-id="${esc(r.id)}">${esc(r.label)}</span>`).join("")
        : "<span class='ti-hint'>no match</span>";
    }
  };
  model.on("change:graph", onGraph);
  model.on("msg:custom", onMessage);
  show(model.get("graph"));
  return () => {
    model.off("change:graph", onGraph);
    model.off("msg:custom", onMessage);
  };
}

export default { render };
