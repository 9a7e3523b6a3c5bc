// The gateway's live dashboard: reads /api/events with fetch() (so that X-API-Key can be
// sent as a header: EventSource cannot, and a key never goes in a URL), draws the numbers
// and the last ten minutes on <canvas>, and looks users up through POST /api/users.
// The API key lives in this page's memory only: never in storage, a cookie or a URL.
"use strict";

(() => {
  const HISTORY_S = 600;
  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 15000;

  const state = {
    key: "",
    controller: null,
    retryMs: RETRY_MIN_MS,
    retryTimer: null,
    points: [],
    latest: null,
  };

  const $ = (id) => document.getElementById(id);

  // ---- formatting ------------------------------------------------------------------

  const fmtRate = (v) => (v == null ? "–" : v >= 100 ? Math.round(v).toLocaleString() : v.toFixed(1));
  const fmtInt = (v) => (v == null ? "–" : Math.round(v).toLocaleString());
  const fmtPct = (v) => (v == null ? "–" : `${(v * 100).toFixed(1)}%`);
  const fmtMs = (v) => (v == null ? "–" : v >= 100 ? `${Math.round(v)}` : v.toFixed(1));
  const fmtSpan = (s) => (s >= 60 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`);

  function setText(id, text) {
    const el = $(id);
    if (el.textContent !== text) el.textContent = text;
  }

  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.className = `pill pill-${kind}`;
  }

  function authHeaders(extra) {
    const headers = { ...extra };
    if (state.key) headers["X-API-Key"] = state.key;
    return headers;
  }

  // ---- the stream ------------------------------------------------------------------

  // One Server-Sent Events frame ("event:", "data:", "id:" lines; ":" starts a comment).
  function parseFrame(block) {
    let event = "message";
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    return data.length ? { event, id, data: data.join("\n") } : null;
  }

  async function readFrames(body, onFrame) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // Normalise line ends, keeping a trailing "\r" until we know what follows it.
      const keep = buffer.endsWith("\r") ? "\r" : "";
      buffer = buffer.slice(0, buffer.length - keep.length).replace(/\r\n?/g, "\n") + keep;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = parseFrame(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (frame) onFrame(frame);
      }
    }
  }

  function onFrame(frame) {
    const payload = JSON.parse(frame.data);
    if (frame.event === "history") {
      state.points = payload.points;
      drawCharts();
    } else if (frame.event === "sample") {
      state.latest = payload;
      state.points.push(pointOf(payload));
      const oldest = payload.t - HISTORY_S;
      while (state.points.length && state.points[0].t < oldest) state.points.shift();
      render(payload);
      drawCharts();
    }
  }

  async function connect() {
    clearTimeout(state.retryTimer);
    const controller = new AbortController();
    state.controller = controller;
    setStatus("connecting…", "wait");
    try {
      const response = await fetch("/api/events", {
        headers: authHeaders({ Accept: "text/event-stream" }),
        signal: controller.signal,
        cache: "no-store",
      });
      if (response.status === 401 || response.status === 403) {
        await response.text(); // read, not cancelled: a cancelled body counts as a failure
        setStatus(state.key ? "key refused" : "API key needed", "down");
        return; // until the operator enters a key
      }
      if (response.status === 429) {
        // EVENTS_MAX_STREAMS_PER_KEY: this key holds as many dashboards as it may.
        await response.text();
        setStatus("too many dashboards open for this key; retrying", "down");
        state.retryTimer = setTimeout(connect, state.retryMs);
        state.retryMs = Math.min(RETRY_MAX_MS, state.retryMs * 2);
        return;
      }
      if (!response.ok || !response.body) {
        await response.text();
        throw new Error(`HTTP ${response.status}`);
      }
      setStatus("live", "live");
      state.retryMs = RETRY_MIN_MS;
      await readFrames(response.body, onFrame);
      if (controller.signal.aborted) return;
      setStatus("stream ended; reconnecting", "wait");
    } catch (err) {
      if (controller.signal.aborted) return;
      setStatus("disconnected; retrying", "down");
    }
    state.retryTimer = setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(RETRY_MAX_MS, state.retryMs * 2);
  }

  function reconnect() {
    if (state.controller) state.controller.abort();
    state.retryMs = RETRY_MIN_MS;
    connect();
  }

  // ---- numbers -----------------------------------------------------------------------

  function render(s) {
    setText("requests-per-s", fmtRate(s.requests_per_s));
    setText("requests-total", fmtInt(s.requests_total));
    setText("ids-per-s", fmtRate(s.ids_per_s));
    setText("ids-total", fmtInt(s.ids_total));
    setText("hit-ratio", fmtPct(s.hit_ratio));
    setText("hit-ratio-total", fmtPct(s.hit_ratio_total));
    setText("coalesced-total", fmtInt(s.coalesced_total));
    setText("coalesced-per-s", fmtRate(s.coalesced_per_s));
    setText("queue", fmtInt(s.queue));
    setText("queue-limit", fmtInt(s.queue_limit));
    setText("in-flight", fmtInt(s.in_flight));
    setText(
      "latency",
      s.latency_p50_ms == null ? "–" : `${fmtMs(s.latency_p50_ms)} / ${fmtMs(s.latency_p95_ms)}`,
    );
    setText("latency-samples", fmtInt(s.latency_samples));
    const upstream = $("upstream-state");
    upstream.textContent = s.upstream_state;
    upstream.className = `state state-${s.upstream_state}`;
    setText("breaker", s.breaker.replace("_", "-"));
    setText("throttle", s.throttled ? `throttled ${s.throttle_wait_s.toFixed(1)} s` : "not throttled");
    setText("store-size", s.store_size == null ? "–" : `${fmtInt(s.store_size)} users`);
    setText("store-kind", s.store);
    setText("memory-size", fmtInt(s.memory_size));
    renderRefreshAhead(s.refresh_ahead);
    renderBudget(s);
    renderKeys(s.keys);
    renderJobs(s.jobs);
  }

  // Refresh-ahead's work, and the stale answers it exists to avoid: served of popular
  // users (refresh-ahead keeps that at 0 while the budget spares calls) and of others.
  function renderRefreshAhead(r) {
    setText("refresh-ahead-ids", fmtInt(r.ids_total));
    setText("refresh-ahead-calls", fmtInt(r.calls_total));
    setText(
      "refresh-ahead-coverage",
      !r.enabled ? "off" : `${fmtPct(r.coverage)} of ${fmtInt(r.popular)} popular fresh`,
    );
    setText("stale-answers", fmtInt(r.stale_popular_total + r.stale_other_total));
    setText("stale-popular", fmtInt(r.stale_popular_total));
    setText("stale-other", fmtInt(r.stale_other_total));
    $("stale-popular").classList.toggle("bad", r.stale_popular_total > 0);
  }

  // Each budget window from the budget's own log (every process's calls, whether or not a
  // dashboard was open), and the lanes that wait for it and why.
  const WAITS = { minute: "the minute window", hour: "the hour window", pace: "its pace", pause: "a 429 pause" };
  function renderBudget(s) {
    const box = $("budget");
    box.replaceChildren(
      ...s.budget.map((w) => {
        const line = document.createElement("div");
        line.className = "window";
        line.dataset.window = w.name;
        const name = document.createElement("span");
        name.className = "window-name";
        name.textContent = `per ${w.name}`;
        const meter = document.createElement("div");
        meter.className = "meter";
        const fill = document.createElement("div");
        fill.className = "meter-fill";
        meter.append(fill);
        const share = w.limit ? Math.min(1, w.used / w.limit) : 0;
        fill.style.width = `${(share * 100).toFixed(1)}%`;
        if (share >= 1) fill.classList.add("full");
        else if (share >= 0.8) fill.classList.add("high");
        const figures = document.createElement("span");
        figures.className = "window-figures";
        const next = w.next_call_in_s > 0 ? ` · next call in ${fmtSpan(w.next_call_in_s)}` : "";
        figures.textContent = `${fmtInt(w.used)} of ${fmtInt(w.limit)} calls used · ${fmtInt(w.remaining)} left${next}`;
        line.append(name, meter, figures);
        return line;
      }),
    );
    const waiting = s.budget_waiting || [];
    $("budget-note").textContent = waiting.length
      ? `Waiting: ${waiting
          .map((w) => `${w.lane} for ${WAITS[w.waits_for] || w.waits_for}${w.in_s > 0 ? ` (${fmtSpan(w.in_s)})` : ""}`)
          .join("; ")}.`
      : "No lane is waiting for the budget.";
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function renderKeys(keys) {
    const body = $("keys");
    if (!keys.length) {
      if (!body.querySelector(".empty")) {
        const tr = document.createElement("tr");
        const td = cell("No per-key usage reported.", "empty");
        td.colSpan = 5;
        tr.append(td);
        body.replaceChildren(tr);
      }
      return;
    }
    body.replaceChildren(
      ...keys.map((k) => {
        const tr = document.createElement("tr");
        tr.append(
          cell(k.name),
          cell(fmtInt(k.requests), "num"),
          cell(fmtRate(k.requests_per_s), "num"),
          cell(fmtInt(k.ids), "num"),
          cell(fmtInt(k.misses), "num"),
        );
        return tr;
      }),
    );
  }

  const STATUS_ORDER = ["running", "pending", "completed", "failed", "cancelled"];
  const fmtEta = (s) => (s == null ? "–" : s >= 3600 ? `${(s / 3600).toFixed(1)} h` : fmtSpan(s));

  function emptyRow(body, text, columns) {
    if (body.querySelector(".empty")?.textContent === text) return;
    const td = cell(text, "empty");
    td.colSpan = columns;
    const tr = document.createElement("tr");
    tr.append(td);
    body.replaceChildren(tr);
  }

  // Crawl jobs: counts by status, ids/s, and the first few active jobs (null: no runner),
  // each with what it waits for (the budget's window, its pace, other jobs).
  const JOB_WAITS = { ...WAITS, "other jobs": "other jobs' turn", "behind misses": "clients' misses" };
  function renderJobs(jobs) {
    const body = $("jobs-active");
    if (jobs == null) {
      setText("jobs-status", "no job runner");
      setText("jobs-ids-per-s", "–");
      emptyRow(body, "No active jobs", 6);
      return;
    }
    const names = Object.keys(jobs.by_status).sort((a, b) => STATUS_ORDER.indexOf(a) - STATUS_ORDER.indexOf(b));
    setText("jobs-status", names.length ? names.map((n) => `${fmtInt(jobs.by_status[n])} ${n}`).join(", ") : "no jobs");
    setText("jobs-ids-per-s", fmtRate(jobs.ids_done_per_s));
    if (jobs.active == null) {
      emptyRow(body, "Reading the jobs…", 6);
      return;
    }
    if (!jobs.active.length) {
      emptyRow(body, "No active jobs", 6);
      return;
    }
    const rows = jobs.active.map((job) => {
      const name = cell(job.label ?? "(no label)");
      const id = document.createElement("span");
      id.className = "job-id";
      id.textContent = job.job_id.slice(0, 12);
      id.title = job.job_id;
      name.append(id);
      const meter = document.createElement("div");
      meter.className = "meter";
      const fill = document.createElement("div");
      fill.className = "meter-fill";
      fill.style.width = `${(job.total ? (100 * job.done) / job.total : 0).toFixed(1)}%`;
      meter.append(fill);
      const bar = document.createElement("td");
      bar.append(meter);
      const waits = job.waiting_for == null
        ? "–"
        : `${JOB_WAITS[job.waiting_for] || job.waiting_for}${job.waiting_in_s > 0 ? ` (${fmtSpan(job.waiting_in_s)})` : ""}`;
      const tr = document.createElement("tr");
      tr.dataset.jobId = job.job_id;
      tr.append(name, cell(job.status), bar, cell(`${fmtInt(job.done)} / ${fmtInt(job.total)}`, "num"), cell(waits, "waits"), cell(fmtEta(job.eta_s), "num"));
      return tr;
    });
    const more = (jobs.active_total ?? jobs.active.length) - jobs.active.length;
    if (more > 0) {
      const tr = document.createElement("tr");
      const td = cell(`and ${fmtInt(more)} more active`, "empty");
      td.colSpan = 6;
      tr.append(td);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  // ---- charts ------------------------------------------------------------------------

  const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea"];
  const CHARTS = [
    { id: "traffic", series: [["requests_per_s", "requests/s"], ["ids_per_s", "ids/s"]] },
    { id: "hits", series: [["hit_ratio", "hit ratio"]], percent: true },
    { id: "upstream", series: [["upstream_calls_per_s", "calls/s"]] },
    { id: "latency", series: [["latency_p50_ms", "p50 ms"], ["latency_p95_ms", "p95 ms"]] },
    { id: "queue", series: [["queue", "queued"], ["in_flight", "in flight"]] },
    { id: "coalesced", series: [["coalesced_per_s", "coalesced ids/s"]] },
  ];
  const POINT_FIELDS = ["t", ...new Set(CHARTS.flatMap((c) => c.series.map((s) => s[0])))];

  function pointOf(sample) {
    const point = {};
    for (const field of POINT_FIELDS) point[field] = sample[field];
    return point;
  }

  function drawLegends() {
    for (const chart of CHARTS) {
      const legend = document.querySelector(`.legend[data-chart="${chart.id}"]`);
      legend.replaceChildren(
        ...chart.series.map(([, label], i) => {
          const item = document.createElement("span");
          const swatch = document.createElement("span");
          swatch.className = "swatch";
          swatch.style.background = COLORS[i];
          item.append(swatch, label);
          return item;
        }),
      );
    }
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const step = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  function drawCharts() {
    const now = state.points.length ? state.points[state.points.length - 1].t : Date.now() / 1000;
    for (const chart of CHARTS) drawChart(chart, now);
  }

  function drawChart(chart, now) {
    const canvas = $(`chart-${chart.id}`);
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const left = 44;
    const right = 8;
    const top = 8;
    const bottom = 20;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const start = now - HISTORY_S;
    let max = 0;
    for (const p of state.points) {
      for (const [field] of chart.series) if (p[field] != null && p[field] > max) max = p[field];
    }
    max = chart.percent ? 1 : niceMax(max);
    const x = (t) => left + ((t - start) / HISTORY_S) * plotW;
    const y = (v) => top + plotH - (v / max) * plotH;

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#5f6b7a";
    ctx.strokeStyle = "#e3e8ee";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, yy);
      ctx.lineTo(left + plotW, yy);
      ctx.stroke();
      const label = chart.percent ? `${Math.round(v * 100)}%` : v >= 1000 ? `${(v / 1000).toFixed(v % 1000 ? 1 : 0)}k` : `${+v.toFixed(2)}`;
      ctx.fillText(label, left - 6, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const minutesAgo of [10, 8, 6, 4, 2, 0]) {
      const xx = x(now - minutesAgo * 60);
      ctx.fillText(minutesAgo ? `-${minutesAgo} min` : "now", Math.min(Math.max(xx, left + 16), left + plotW - 12), top + plotH + 5);
    }

    ctx.lineWidth = 1.6;
    ctx.lineJoin = "round";
    chart.series.forEach(([field], i) => {
      ctx.strokeStyle = COLORS[i];
      ctx.beginPath();
      let previous = null;
      for (const p of state.points) {
        const v = p[field];
        if (v == null || p.t < start) {
          previous = null;
          continue;
        }
        // A gap of more than a few seconds (no dashboard was open): break the line.
        if (previous == null || p.t - previous > 2.5) ctx.moveTo(x(p.t), y(v));
        else ctx.lineTo(x(p.t), y(v));
        previous = p.t;
      }
      ctx.stroke();
    });
  }

  // ---- lookups -----------------------------------------------------------------------

  function sourceBadge(text) {
    const span = document.createElement("span");
    span.className = `source source-${text.replace(" ", "_")}`;
    span.textContent = text;
    const td = document.createElement("td");
    td.append(span);
    return td;
  }

  async function lookup(event) {
    event.preventDefault();
    const message = $("lookup-message");
    const raw = $("lookup-ids").value.trim();
    const ids = raw ? raw.split(/[\s,;]+/).filter(Boolean) : [];
    if (!ids.length || ids.some((id) => !/^\d+$/.test(id))) {
      message.textContent = "Enter user ids: whole numbers separated by commas or spaces.";
      message.className = "small error";
      return;
    }
    const button = event.submitter || $("lookup-form").querySelector("button");
    button.disabled = true;
    message.textContent = "Looking up…";
    message.className = "small";
    try {
      const response = await fetch("/api/users", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify({ user_ids: ids.map(Number) }),
      });
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        message.textContent = `HTTP ${response.status}: ${body?.detail ?? body?.error ?? "request failed"}`;
        message.className = "small error";
        return;
      }
      showUsers(body);
    } catch (err) {
      message.textContent = `The request failed: ${err.message}`;
      message.className = "small error";
    } finally {
      button.disabled = false;
    }
  }

  function showUsers(body) {
    const rows = body.users.map((u) => {
      const tr = document.createElement("tr");
      tr.append(cell(String(u.user_id), "num"), cell(u.username), cell(u.display_name ?? ""), sourceBadge(u.source));
      return tr;
    });
    for (const id of body.not_found) {
      const tr = document.createElement("tr");
      tr.append(cell(String(id), "num"), cell("—"), cell("no such user"), sourceBadge("not found"));
      rows.push(tr);
    }
    for (const id of body.unavailable) {
      const tr = document.createElement("tr");
      tr.append(cell(String(id), "num"), cell("—"), cell(body.errors[String(id)] ?? ""), sourceBadge("unavailable"));
      rows.push(tr);
    }
    $("lookup-results").replaceChildren(...rows);
    $("lookup-table").hidden = false;
    const $msg = $("lookup-message");
    $msg.textContent = `${body.users.length} found, ${body.not_found.length} not found, ${body.unavailable.length} unavailable.`;
    $msg.className = "small";
  }

  // ---- start -------------------------------------------------------------------------

  function start() {
    drawLegends();
    drawCharts();
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.key = $("api-key").value.trim();
      reconnect();
    });
    $("lookup-form").addEventListener("submit", lookup);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(drawCharts, 100);
    });
    connect();
  }

  start();
})();
