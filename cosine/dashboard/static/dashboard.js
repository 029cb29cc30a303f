// The CoSine dashboard page: renders the state the server pushes over server-sent events (/api/events).
// Every cell is written with textContent (dead-letter reasons and request ids come from the wire).
"use strict";

const $ = (id) => document.getElementById(id);

function fmt(v, digits = 0) {
  if (v === null || v === undefined || v === "" || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  return v.toFixed(digits);
}
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%");
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

function cell(tr, value, field, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (field) td.dataset.field = field;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function fillTable(id, rows, build) {
  const body = $(id).tBodies[0];
  const fresh = document.createElement("tbody");
  rows.forEach((row) => {
    const tr = document.createElement("tr");
    build(tr, row);
    fresh.appendChild(tr);
  });
  body.replaceWith(fresh);
}

// -- admin actions (only shown when the server has an admin token) --------------------------------------------
async function act(kind, arg) {
  let token = sessionStorage.getItem("cosine-admin-token");
  if (!token) {
    token = window.prompt("Admin token") || "";
    if (!token) return;
    sessionStorage.setItem("cosine-admin-token", token);
  }
  const body = kind === "drain" ? { worker: arg } : { id: arg };
  const res = await fetch(`/api/actions/${kind}`, {
    method: "POST", headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify(body),
  });
  const out = await res.json();
  if (res.status === 401) sessionStorage.removeItem("cosine-admin-token");
  $("action-status").textContent = res.ok ? `${kind} ${arg}: done` : `${kind} ${arg}: ${out.error}`;
}

function actionButton(tr, label, kind, arg, enabled = true) {
  const td = document.createElement("td");
  td.className = "admin";
  if (enabled) {
    const b = document.createElement("button");
    b.textContent = label;
    b.addEventListener("click", () => act(kind, arg));
    td.appendChild(b);
  }
  tr.appendChild(td);
}

// -- charts ---------------------------------------------------------------------------------------------------
const charts = {};
const chartSpecs = {
  depth: { el: "chart-depth", series: [
    ["requests waiting", "requests_waiting", "#d9822b"], ["requests in flight", "requests_pending", "#2f6fdb"],
    ["draft queues", "draft_depth", "#8e44ad"], ["verify queues", "verify_depth", "#16a085"]] },
  throughput: { el: "chart-throughput", series: [
    ["tokens/s", "tokens_per_s", "#2f6fdb"], ["requests/s", "requests_per_s", "#d9822b", "r"]] },
  spec: { el: "chart-spec", series: [
    ["acceptance rate", "acceptance_rate", "#1a7f37"], ["k max", "k_max", "#8e44ad", "r"],
    ["cooperating", "cooperating", "#6b7385", "r"]] },
};

function makeChart(spec) {
  const el = $(spec.el);
  const hasRight = spec.series.some((s) => s[3] === "r");
  const opts = {
    width: Math.max(300, el.clientWidth), height: 200, legend: { live: false },
    scales: { x: { time: true } },
    axes: [{ space: 70, values: (u, ticks) => ticks.map(clock) }, { size: 48 },
           ...(hasRight ? [{ side: 1, scale: "r", grid: { show: false }, size: 40 }] : [])],
    series: [{}, ...spec.series.map(([label, , color, scale]) => ({
      label, stroke: color, width: 1.5, scale: scale || "y", spanGaps: true }))],
  };
  return new uPlot(opts, [[], ...spec.series.map(() => [])], el);
}

function drawCharts(series) {
  const xs = series.map((p) => p.t);
  for (const [name, spec] of Object.entries(chartSpecs)) {
    if (!charts[name]) charts[name] = makeChart(spec);
    charts[name].setData([xs, ...spec.series.map(([, key]) => series.map((p) => p[key] ?? null))]);
  }
}

function drawStrip(decisions) {
  const strip = $("decision-strip");
  strip.replaceChildren();
  const u = charts.depth;
  if (!u || !u.data[0].length) return;
  const [t0, t1] = [u.data[0][0], u.data[0][u.data[0].length - 1]];
  for (const d of decisions) {
    if (d.t < t0 || d.t > t1) continue;
    const m = document.createElement("div");
    m.className = `mark ${d.kind || ""}`;
    m.style.left = `${u.bbox.left / devicePixelRatio + u.valToPos(d.t, "x")}px`;
    m.title = `${clock(d.t)} ${d.kind} v${d.version}: k ${d.k_min}..${d.k_max}, cooperating ${d.max_cooperating}` +
      `, batch ${d.verifier_max_batch} — ${d.reason || ""}`;
    strip.appendChild(m);
  }
}

// -- panels ---------------------------------------------------------------------------------------------------
function renderKpis(s) {
  const r = s.requests, spec = s.speculation, ttft = r.latency.ttft;
  const lat = ttft.recent && ttft.recent.count ? ttft.recent : ttft.all;
  $("kpi-tokens").textContent = fmt(r.tokens_per_s, 1);
  $("kpi-requests").textContent = fmt(r.requests_per_s, 2);
  $("kpi-inflight").textContent = fmt(r.in_flight);
  $("kpi-queued").textContent = fmt(r.queued);
  $("kpi-acceptance").textContent = pct(spec.overall.acceptance_rate);
  $("kpi-mal").textContent = fmt(spec.overall.mean_acceptance_length, 2);
  $("kpi-k").textContent = spec.k || "–";
  $("kpi-ttft").textContent = `${fmt(lat.p50, 3)} / ${fmt(lat.p99, 3)}`;
  $("kpi-dlq").textContent = fmt(s.dead_letters.count);
}

function renderStreams(s) {
  fillTable("streams", s.streams, (tr, g) => {
    tr.dataset.stream = g.stream;
    tr.dataset.group = g.group;
    cell(tr, g.stream, "stream", "text");
    cell(tr, g.group, "group", "text");
    cell(tr, fmt(g.consumers), "consumers");
    cell(tr, fmt(g.lag), "lag");
    cell(tr, fmt(g.pending), "pending");
    cell(tr, fmt(g.depth), "depth");
    cell(tr, fmt(g.oldest_waiting_age_s, 1), "oldest_waiting_age_s");
    cell(tr, fmt(g.oldest_pending_age_s, 1), "oldest_pending_age_s");
    cell(tr, fmt(g.enqueue_rate, 1), "enqueue_rate");
    cell(tr, fmt(g.ack_rate, 1), "ack_rate");
  });
  fillTable("dlq", s.dead_letters.latest, (tr, d) => {
    tr.dataset.id = d.id;
    cell(tr, d.id, "id", "text");
    cell(tr, d.stream, "stream", "text");
    cell(tr, d.reason, "reason", "reason");
    actionButton(tr, "requeue", "requeue", d.id, d.requeueable);
  });
}

function renderWorkers(s) {
  fillTable("workers", s.workers, (tr, w) => {
    tr.dataset.worker = w.id;
    cell(tr, w.id, "id", "text");
    cell(tr, w.role, "role", "text");
    cell(tr, w.alive ? "yes" : "NO", "alive", w.alive ? "" : "dead");
    cell(tr, w.models || "", "models", "text");
    cell(tr, fmt(w.heartbeat_age_s, 1), "heartbeat_age_s");
    cell(tr, fmt(w.active), "active");
    cell(tr, fmt(w.batch, 1), "batch");
    cell(tr, fmt(w.passes_per_s, 1), "passes_per_s");
    cell(tr, pct(w.busy), "busy");
    cell(tr, w.role === "verifier" ? pct(w.blocked) : "", "blocked");
    actionButton(tr, "drain", "drain", w.id, w.alive && w.role !== "controller");
  });
}

function renderSpeculation(s) {
  const sp = s.speculation;
  const rows = [
    ["acceptance rate (all / recent)", `${pct(sp.overall.acceptance_rate)} / ${pct(sp.recent && sp.recent.acceptance_rate)}`, "acceptance_rate"],
    ["mean acceptance length", fmt(sp.overall.mean_acceptance_length, 2), "mean_acceptance_length"],
    ["drafts verified", fmt(sp.overall.drafts), "drafts"],
    ["draft tokens / accepted", `${fmt(sp.overall.draft_tokens)} / ${fmt(sp.overall.accepted)}`, "tokens"],
    ["k now", sp.k || "–", "k"], ["cooperating drafters (max)", fmt(sp.cooperating), "cooperating"],
    ["stale / late drafts", `${fmt(sp.stale_drafts)} / ${fmt(sp.late_drafts)}`, "stale_late"],
    ["fallback (plain) steps", fmt(sp.fallback_steps), "fallback_steps"],
    ["lookahead hit rate", pct(sp.lookahead_hit_rate), "lookahead_hit_rate"],
  ];
  fillTable("spec-summary", rows, (tr, [label, value, field]) => {
    cell(tr, label, null, "text");
    cell(tr, value, field);
  });
  const bars = $("positions");
  bars.replaceChildren();
  for (const p of sp.per_position) {
    const b = document.createElement("div");
    b.className = "bar";
    b.dataset.position = p.position;
    b.style.height = `${Math.round(100 * (p.rate || 0))}%`;
    b.title = `position ${p.position}: ${pct(p.rate)} of drafts accepted this far (${p.accepted})`;
    const label = document.createElement("span");
    label.textContent = p.position;
    b.appendChild(label);
    bars.appendChild(b);
  }
  const by = [...Object.entries(sp.by_drafter).map(([n, v]) => [`drafter ${n}`, v]),
              ...Object.entries(sp.by_domain).map(([n, v]) => [`domain ${n}`, v])];
  fillTable("spec-by", by, (tr, [name, v]) => {
    tr.dataset.name = name;
    cell(tr, name, "name", "text");
    cell(tr, fmt(v.drafts), "drafts");
    cell(tr, fmt(v.draft_tokens), "draft_tokens");
    cell(tr, fmt(v.accepted), "accepted");
    cell(tr, pct(v.acceptance_rate), "acceptance_rate");
    cell(tr, fmt(v.mean_acceptance_length, 2), "mean_acceptance_length");
  });
}

function renderRequests(s) {
  const names = { ttft: "time to first token", tpot: "per output token", e2e: "request latency" };
  const rows = [];
  for (const [key, label] of Object.entries(names)) {
    const l = s.requests.latency[key];
    rows.push([`${label} (last minute)`, l.recent || {}, `${key}-recent`], [`${label} (all)`, l.all, `${key}-all`]);
  }
  fillTable("latency", rows, (tr, [label, l, key]) => {
    tr.dataset.latency = key;
    cell(tr, label, null, "text");
    cell(tr, fmt(l.p50, 3), "p50");
    cell(tr, fmt(l.p90, 3), "p90");
    cell(tr, fmt(l.p99, 3), "p99");
    cell(tr, fmt(l.count), "count");
  });
  fillTable("inflight", s.requests.inflight, (tr, r) => {
    tr.dataset.request = r.id;
    cell(tr, r.id, "id", "text");
    cell(tr, r.client || "", "client", "text");
    cell(tr, r.verifier, "verifier", "text");
    cell(tr, r.drafter || "", "drafter", "text");
    const td = cell(tr, "", "progress");
    const bar = document.createElement("span");
    bar.className = "progress";
    const fill = document.createElement("i");
    fill.style.width = `${Math.min(100, Math.round((100 * r.tokens) / Math.max(1, r.max)))}%`;
    bar.appendChild(fill);
    td.append(bar, `${r.tokens} / ${r.max}`);
    cell(tr, fmt(r.age_s, 1), "age_s");
  });
}

function renderControl(s) {
  const c = s.control;
  $("control-now").textContent = c
    ? `now: v${c.version} by ${c.controller || "?"}, k ${c.k_min}..${c.k_max}, cooperating ≤ ${c.max_cooperating}, ` +
      `verifier batch ≤ ${c.verifier_max_batch}, pressure ${c.pressure} — ${c.reason || ""}`
    : "no controller decision published (workers use their own settings)";
  fillTable("decisions", [...s.decisions].reverse(), (tr, d) => {
    cell(tr, clock(d.t), "time", "text");
    cell(tr, d.kind || "", "kind", "text");
    cell(tr, fmt(d.version), "version");
    cell(tr, `${d.k_min}..${d.k_max}`, "k");
    cell(tr, fmt(d.max_cooperating), "cooperating");
    cell(tr, fmt(d.verifier_max_batch), "batch");
    cell(tr, fmt(d.pressure), "pressure");
    cell(tr, d.reason || "", "reason", "reason");
  });
}

function render(s) {
  document.body.classList.toggle("actions", !!s.actions);
  $("seq").textContent = s.seq;
  $("updated").textContent = s.now ? clock(s.now) : "–";
  const link = $("link");
  link.textContent = s.redis_up ? "live" : `Redis unreachable: ${s.error || ""}`;
  link.className = `pill ${s.redis_up ? "ok" : "bad"}`;
  if (s.series) drawCharts(s.series);
  if (!s.redis_up) return;
  $("where").textContent = `${s.redis} · prefix ${s.prefix}`;
  renderKpis(s);
  renderStreams(s);
  renderWorkers(s);
  renderSpeculation(s);
  renderRequests(s);
  renderControl(s);
  drawStrip(s.decisions);
  window.cosineState = s; // for scripts and tests: the state the page shows
}

function connect() {
  const events = new EventSource("/api/events");
  events.onmessage = (e) => render(JSON.parse(e.data));
  events.onerror = () => {
    const link = $("link");
    link.textContent = "reconnecting…";
    link.className = "pill bad";
  };
}

window.addEventListener("resize", () => {
  for (const [name, spec] of Object.entries(chartSpecs)) {
    if (charts[name]) charts[name].setSize({ width: Math.max(300, $(spec.el).clientWidth), height: 200 });
  }
});
connect();
