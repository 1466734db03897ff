// The live page: an overview of every stream (the listing API with states=true), and one stream's
// detail (its state, history and event stream) on a chart. Plain JavaScript, no build step; the
// chart is uPlot (vendor/, pinned).
"use strict";

(() => {
  const NAME = /^[A-Za-z0-9_.:\-]{1,200}$/;
  const PREFIX = /^[A-Za-z0-9_.:\-]{0,200}$/;
  const POLL_MS = 2000; // the overview re-reads the listing this often
  const TICK_MS = 500; // rates decay and "n s ago" counts at this pace
  const RECONNECT_MS = 1000;
  const MAX_OVERVIEW = 5000; // streams read for one overview (sorting needs them all)
  const PAGE_SIZE = 25;
  const MAX_POINTS = 5000; // per chart: older points scroll away
  const SPARK_POINTS = 60;
  // Between two history entries, a pause this many times the usual one is drawn as a gap.
  const GAP_FACTOR = 10;
  const COLORS = {
    raw: "#9aa3b5",
    value: "#2f6fde",
    debiased: "#7c3aed",
    band: "rgba(47, 111, 222, 0.12)",
    windows: ["#1f9d55", "#c77c02", "#c53030", "#0e7490", "#a21caf", "#4d7c0f", "#b45309", "#be185d"],
  };

  const $ = (selector, root = document) => root.querySelector(selector);
  const message = $("#message");
  const keyInput = $("#key");

  // --- the server's clock -----------------------------------------------------------------------
  // Rates are reported as of a server time; to decay them to "now" the page estimates the server
  // clock from the listing's `time` (half the round trip is the error).
  let clockOffset = 0; // server seconds minus this browser's
  const serverNow = () => Date.now() / 1000 + clockOffset;
  function observeServerTime(time, sentMs, receivedMs) {
    if (typeof time === "number") clockOffset = time - (sentMs + receivedMs) / 2000;
  }

  // --- talking to the service ------------------------------------------------------------------

  function apiKey() {
    return sessionStorage.getItem("ema.key") || "";
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // An error answer, in the service's own words (its problem+json title and detail).
  class ApiError extends Error {
    constructor(status, title, detail) {
      super(detail ? `${detail} (${status} ${title})` : `${status} ${title}`);
      this.status = status;
      this.title = title;
      this.detail = detail;
    }
  }

  async function problem(response) {
    let title = response.statusText || "Error";
    let detail = "";
    try {
      const body = await response.json();
      title = body.title || title;
      detail = body.detail || "";
    } catch (_) {
      // not a problem+json body: the status says it all
    }
    return new ApiError(response.status, title, detail);
  }

  async function api(path) {
    let response;
    try {
      response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    } catch (_) {
      throw new ApiError(0, "unreachable", "the service does not answer");
    }
    if (!response.ok) throw await problem(response);
    return response.json();
  }

  function showError(error) {
    message.textContent = error.message;
    message.hidden = false;
    if (error.status === 401 || error.status === 403) askForKey(error);
  }

  function clearError() {
    message.textContent = "";
    message.hidden = true;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // One parsed Server-Sent Events block: {event, id, data, comments}.
  function parseBlock(block) {
    const parsed = { event: "message", id: null, data: "", comments: [] };
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) {
        parsed.comments.push(line.slice(1).trim());
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") parsed.event = value;
      else if (field === "id") parsed.id = value;
      else if (field === "data") parsed.data += (parsed.data ? "\n" : "") + value;
    }
    return parsed;
  }

  // --- the API key ----------------------------------------------------------------------------

  function showKeyState() {
    $("#key-button").textContent = apiKey() ? "API key: set" : "API key: none";
    $("#key-forget").hidden = !apiKey();
  }

  function askForKey(error) {
    const panel = $("#key-panel");
    const why = error.status === 401
      ? "This service needs an API key with the read scope."
      : "This API key may not read this: use one with the read scope for these streams.";
    $("#key-why").textContent = `${why} The service says: ${error.detail || error.title}.`;
    panel.hidden = false;
    keyInput.focus();
  }

  $("#key-button").addEventListener("click", () => {
    const panel = $("#key-panel");
    panel.hidden = !panel.hidden;
    if (!panel.hidden) keyInput.focus();
  });

  $("#key-panel").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("ema.key", keyInput.value.trim());
    keyInput.value = "";
    $("#key-panel").hidden = true;
    showKeyState();
    clearError();
    route();
  });

  $("#key-forget").addEventListener("click", () => {
    sessionStorage.removeItem("ema.key");
    showKeyState();
    route();
  });

  // --- formatting ------------------------------------------------------------------------------

  function formatNumber(x) {
    if (x === null || x === undefined) return "–";
    if (Number.isInteger(x)) return String(x);
    return String(Number(x.toPrecision(6)));
  }

  function seconds(s) {
    if (s < 120) return `${formatNumber(s)} s`;
    if (s < 7200) return `${formatNumber(s / 60)} min`;
    if (s < 172800) return `${formatNumber(s / 3600)} h`;
    return `${formatNumber(s / 86400)} d`;
  }

  function ago(updatedAt) {
    if (updatedAt === null || updatedAt === undefined) return "no update yet";
    const s = Math.max(0, serverNow() - updatedAt);
    if (s < 60) return `updated ${Math.floor(s)} s ago`;
    if (s < 3600) return `updated ${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `updated ${Math.floor(s / 3600)} h ago`;
    return `updated ${Math.floor(s / 86400)} d ago`;
  }

  function windowSpec(w) {
    return w.decay !== null && w.decay !== undefined ? `decay ${w.decay}` : `halflife ${seconds(w.halflife)}`;
  }

  function describe(config) {
    const parts = [];
    if (config.decay !== null && config.decay !== undefined) {
      parts.push(`decay ${config.decay}`);
      parts.push(config.initial === null ? "starts at its first value" : `initial ${config.initial}`);
      if (config.auto_num_updates) parts.push("auto num_updates");
    } else {
      parts.push(`halflife ${seconds(config.halflife)}`);
    }
    for (const w of config.windows || []) parts.push(`${w.name}: ${windowSpec(w)}`);
    if (config.history) parts.push(`history ${config.history}`);
    if (config.ttl) parts.push(`ttl ${seconds(config.ttl)}`);
    if (config.late === "reject") parts.push("late samples rejected");
    return parts.join(" · ");
  }

  const isRate = (config) => config.kind === "rate";
  const unit = (config) => (isRate(config) ? "/s" : "");

  // A state read at server time `asOf`: its numbers now. A rate decays while no events come
  // (each window by its own halflife); a mean stays what it was.
  class Reading {
    constructor(state, asOf) {
      this.state = state;
      this.asOf = asOf;
    }

    decayed(value, halflife, now) {
      if (value === null || value === undefined || !isRate(this.state.config)) return value;
      return value * 2 ** ((this.asOf - Math.max(now, this.asOf)) / halflife);
    }

    // The state as it was at `time` (not after the stream's last update): a rate's values were
    // higher then by their decay since.
    at(time) {
      const { state } = this;
      if (!isRate(state.config)) return state;
      const back = (value, halflife) => (value === null ? null : value * 2 ** ((this.asOf - time) / halflife));
      const windows = {};
      for (const [name, w] of Object.entries(state.windows || {})) windows[name] = { ...w, value: back(w.value, w.halflife) };
      return { ...state, value: back(state.value, state.config.halflife), windows };
    }

    value(now) {
      return this.decayed(this.state.value, this.state.config.halflife, now);
    }

    window(name, now) {
      const w = (this.state.windows || {})[name];
      return w ? this.decayed(w.value, w.halflife, now) : null;
    }
  }

  // The spread: the exponentially weighted standard deviation the service reports with a mean
  // (null before two values, and for rates).
  function spreadOf(state) {
    return typeof state.std === "number" && typeof state.value === "number" ? state.std : null;
  }

  // Whether the stream has a spread to draw: a mean, from a service that reports one.
  const hasSpread = (state) => !isRate(state.config) && "std" in state;

  // --- the overview --------------------------------------------------------------------------

  const overview = {
    readings: new Map(), // name -> Reading
    sparks: new Map(), // name -> [[time, value], ...]
    seeded: new Set(), // names whose sparkline was seeded from history
    truncated: false,
    loaded: false, // read at least once (since the prefix last changed)
    page: 0,
    generation: 0,
    timer: null,
    failing: false,
  };

  function overviewParams() {
    const params = new URLSearchParams(window.location.search);
    const prefix = params.get("prefix") || "";
    return {
      prefix: PREFIX.test(prefix) ? prefix : "",
      sort: params.get("sort") === "updated" ? "updated" : "name",
      page: Math.max(0, Number.parseInt(params.get("page") || "1", 10) - 1 || 0),
    };
  }

  let overviewSearch = ""; // the overview's address, to come back to from a stream

  function setOverviewParams(changes) {
    const params = new URLSearchParams(window.location.search);
    for (const [key, value] of Object.entries(changes)) {
      if (value === "" || value === null || (key === "sort" && value === "name") || (key === "page" && value === 1)) {
        params.delete(key);
      } else params.set(key, String(value));
    }
    params.delete("stream");
    params.delete("streams");
    const query = params.toString();
    overviewSearch = query ? `?${query}` : "";
    window.history.replaceState(null, "", overviewSearch || window.location.pathname);
  }

  function remember(name, time, value) {
    if (value === null || value === undefined) return;
    const points = overview.sparks.get(name) || [];
    const last = points[points.length - 1];
    if (last && last[0] >= time) return;
    points.push([time, value]);
    if (points.length > SPARK_POINTS) points.splice(0, points.length - SPARK_POINTS);
    overview.sparks.set(name, points);
  }

  async function loadOverview() {
    const { prefix } = overviewParams();
    const generation = ++overview.generation;
    const found = new Map();
    let cursor = null;
    let truncated = false;
    do {
      const params = new URLSearchParams({ prefix, limit: "1000", states: "true" });
      if (cursor) params.set("cursor", cursor);
      const sent = Date.now();
      const page = await api(`/v1/streams?${params}`);
      observeServerTime(page.time, sent, Date.now());
      for (const state of page.states) found.set(state.name, new Reading(state, page.time));
      cursor = page.next_cursor;
      truncated = cursor !== null && found.size >= MAX_OVERVIEW;
    } while (cursor && !truncated);
    if (generation !== overview.generation) return; // the prefix changed meanwhile
    for (const [name, reading] of found) {
      const before = overview.readings.get(name);
      const { state } = reading;
      if (isRate(state.config)) remember(name, reading.asOf, state.value);
      else if (!before || before.state.count !== state.count) remember(name, state.updated_at ?? reading.asOf, state.value);
    }
    overview.readings = found;
    overview.truncated = truncated;
    overview.loaded = true;
    renderOverview();
  }

  function sortedNames() {
    const { sort } = overviewParams();
    const names = [...overview.readings.keys()];
    if (sort === "updated") {
      const at = (name) => overview.readings.get(name).state.updated_at ?? -Infinity;
      return names.sort((a, b) => at(b) - at(a) || (a < b ? -1 : 1));
    }
    return names.sort();
  }

  function renderOverview() {
    const { page, prefix } = overviewParams();
    const names = sortedNames();
    const pages = Math.max(1, Math.ceil(names.length / PAGE_SIZE));
    overview.page = Math.min(page, pages - 1);
    const shown = names.slice(overview.page * PAGE_SIZE, (overview.page + 1) * PAGE_SIZE);
    const rows = shown.map((name) => renderRow(name));
    if (!rows.length) {
      const empty = document.createElement("p");
      empty.className = "empty muted";
      if (!overview.loaded) {
        empty.textContent = overview.failing ? "Nothing to show until the service answers (above)." : "Reading the streams…";
      } else {
        empty.textContent = prefix ? `No stream starts with "${prefix}".` : "No streams yet: push a value to create one.";
      }
      rows.push(empty);
    }
    $("#rows").replaceChildren(...rows);
    const first = names.length ? overview.page * PAGE_SIZE + 1 : 0;
    const last = overview.page * PAGE_SIZE + shown.length;
    const cut = overview.truncated ? ` (the first ${MAX_OVERVIEW} found; narrow the prefix)` : "";
    $("#summary").textContent = `${names.length} stream${names.length === 1 ? "" : "s"}${cut}`;
    $("#page-label").textContent = `${first}–${last} of ${names.length}`;
    $("#previous").disabled = overview.page === 0;
    $("#next").disabled = overview.page >= pages - 1;
    $("#overview").dataset.streams = String(names.length);
    for (const name of shown) seedSpark(name);
  }

  function renderRow(name) {
    const reading = overview.readings.get(name);
    const { state } = reading;
    const row = $("#row").content.firstElementChild.cloneNode(true);
    row.dataset.stream = name;
    row.dataset.kind = state.config.kind;
    row.href = `?stream=${encodeURIComponent(name)}`;
    row.addEventListener("click", (event) => {
      if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      navigate(`?stream=${encodeURIComponent(name)}`);
    });
    $(".name", row).textContent = name;
    $('[data-field="kind"]', row).textContent = isRate(state.config) ? "rate" : "mean";
    $('[data-field="config"]', row).textContent = describe(state.config);
    tickRow(row);
    drawSpark(row, name);
    return row;
  }

  function tickRow(row) {
    const reading = overview.readings.get(row.dataset.stream);
    if (!reading) return;
    const { state } = reading;
    const value = reading.value(serverNow());
    $('[data-field="value"]', row).textContent = `${formatNumber(value)}${value === null ? "" : unit(state.config)}`;
    $('[data-field="value"]', row).dataset.value = value === null ? "" : String(value);
    $('[data-field="updated"]', row).textContent = ago(state.updated_at);
    row.classList.toggle("stale", overview.failing);
  }

  function drawSpark(row, name) {
    const reading = overview.readings.get(name);
    if (!reading) return; // no longer listed (the prefix changed): its row goes at the next read
    const points = [...(overview.sparks.get(name) || [])];
    if (isRate(reading.state.config) && points.length) {
      const now = serverNow();
      points.push([now, reading.value(now)]); // decaying to now
    }
    const line = $("polyline", row);
    line.setAttribute("stroke", isRate(reading.state.config) ? COLORS.windows[0] : COLORS.value);
    if (points.length < 2) {
      line.setAttribute("points", "");
      return;
    }
    const times = points.map((p) => p[0]);
    const values = points.map((p) => p[1]);
    const [t0, t1] = [Math.min(...times), Math.max(...times)];
    const [v0, v1] = [Math.min(...values), Math.max(...values)];
    const x = (t) => (t1 > t0 ? ((t - t0) / (t1 - t0)) * 100 : 50);
    const y = (v) => (v1 > v0 ? 22 - ((v - v0) / (v1 - v0)) * 20 : 12);
    line.setAttribute("points", points.map(([t, v]) => `${x(t).toFixed(2)},${y(v).toFixed(2)}`).join(" "));
  }

  // The sparkline of a stream that keeps history starts from its recent entries.
  async function seedSpark(name) {
    const reading = overview.readings.get(name);
    if (overview.seeded.has(name) || !reading) return;
    overview.seeded.add(name);
    const { state } = reading;
    if (!state.config.history || !state.count) return;
    try {
      const since = Math.max(0, state.count - SPARK_POINTS);
      const page = await api(`/v1/streams/${name}/history?since=${since}&limit=${SPARK_POINTS}`);
      const points = page.entries.map((entry) => [entry.time, entry.value]);
      const later = (overview.sparks.get(name) || []).filter(([t]) => !points.length || t > points[points.length - 1][0]);
      overview.sparks.set(name, [...points, ...later].slice(-SPARK_POINTS));
      const row = $(`.row[data-stream="${CSS.escape(name)}"]`);
      if (row) drawSpark(row, name);
    } catch (_) {
      // a sparkline is a convenience: the live points still come
    }
  }

  async function pollOverview() {
    clearTimeout(overview.timer);
    if (!$("#detail").hidden) return;
    try {
      await loadOverview();
      overview.failing = false;
      $("#overview").dataset.status = "live";
      clearError();
    } catch (error) {
      overview.failing = true;
      $("#overview").dataset.status = "failing";
      showError(error);
      $("#summary").textContent = error.status === 0 ? "the service does not answer: retrying" : "";
      if (overview.loaded) for (const row of document.querySelectorAll(".row")) tickRow(row);
      else renderOverview();
      if (error.status === 401 || error.status === 403) return; // until a key is given
    }
    // Many streams: read them less often (each read carries every state).
    const pause = overview.readings.size > 1000 ? 5 * POLL_MS : POLL_MS;
    if ($("#detail").hidden) overview.timer = setTimeout(pollOverview, pause);
  }

  let typing = null;
  $("#prefix").addEventListener("input", (event) => {
    clearTimeout(typing);
    const prefix = event.target.value.trim();
    if (!PREFIX.test(prefix)) {
      message.textContent = `"${prefix}" cannot start a stream name (A-Z a-z 0-9 _ . : - only)`;
      message.hidden = false;
      return;
    }
    typing = setTimeout(() => {
      setOverviewParams({ prefix, page: 1 });
      overview.readings = new Map();
      overview.loaded = false;
      pollOverview();
    }, 250);
  });
  $("#filters").addEventListener("submit", (event) => event.preventDefault());
  $("#sort").addEventListener("change", (event) => {
    setOverviewParams({ sort: event.target.value, page: 1 });
    renderOverview();
  });
  $("#previous").addEventListener("click", () => {
    setOverviewParams({ page: overview.page });
    renderOverview();
  });
  $("#next").addEventListener("click", () => {
    setOverviewParams({ page: overview.page + 2 });
    renderOverview();
  });

  // --- one stream's detail ---------------------------------------------------------------------

  class Detail {
    constructor(name) {
      this.name = name;
      this.active = true;
      this.controller = null;
      this.subscribed = false;
      this.connected = false;
      this.reading = null;
      this.config = null;
      this.lastCount = null; // the count of the newest update shown (for Last-Event-ID)
      this.lastTime = null; // and its time: a reconfigured stream counts from 0 again
      this.range = sessionStorage.getItem("ema.range") || "all";
      this.plot = null;
      this.pending = false;
      this.root = $("#detail");
      this.root.dataset.stream = name;
      this.root.dataset.points = "0";
      $("#detail-name").textContent = name;
      $('[data-field="config"]', this.root).textContent = "";
      $('[data-field="kind"]', this.root).textContent = "";
      $("#numbers").replaceChildren();
      $("#chart").replaceChildren();
      $("#chart-note").textContent = "";
      document.title = `${name} · EMA service`;
      this.showRange();
      this.setStatus("waiting", "connecting");
      this.resizer = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
      this.resizer.observe($("#chart"));
      this.ticker = setInterval(() => this.tick(), TICK_MS);
      this.follow();
    }

    setStatus(kind, text) {
      const status = $('[data-field="status"]', this.root);
      status.className = `status ${kind}`;
      status.textContent = text;
      this.root.dataset.status = kind;
      this.connected = kind === "live";
      this.root.classList.toggle("stale", kind !== "live");
    }

    showRange() {
      for (const button of this.root.querySelectorAll("[data-range]")) {
        button.setAttribute("aria-pressed", String(button.dataset.range === this.range));
      }
      this.root.dataset.range = this.range;
    }

    setRange(range) {
      this.range = range;
      sessionStorage.setItem("ema.range", range);
      this.showRange();
      this.redraw();
    }

    // --- the chart's columns: time, raw, value, [debiased], windows..., [band high, band low]

    layout(state) {
      const { config } = state;
      const rate = isRate(config);
      const columns = [{ key: "raw", label: rate ? "events per push" : "raw", stroke: COLORS.raw, scale: rate ? "count" : "y", points: true }];
      columns.push({ key: "value", label: rate ? "events/s" : "value", stroke: COLORS.value, width: 2 });
      if (!rate) columns.push({ key: "debiased", label: "debiased", stroke: COLORS.debiased, dash: [4, 3] });
      for (const [i, w] of (config.windows || []).entries()) {
        columns.push({ key: `w:${w.name}`, window: w.name, label: `${w.name}${rate ? " /s" : ""}`, stroke: COLORS.windows[i % COLORS.windows.length] });
      }
      if (hasSpread(state)) {
        columns.push({ key: "high", label: "value + 2σ", stroke: COLORS.band, band: true });
        columns.push({ key: "low", label: "value − 2σ", stroke: COLORS.band, band: true });
      }
      return columns;
    }

    configure(state) {
      // A new chart: a stream replaced by a PUT starts over (its count from 0).
      this.lastCount = null;
      this.lastTime = null;
      this.config = state.config;
      this.columns = this.layout(state);
      this.data = [[], ...this.columns.map(() => [])];
      this.root.dataset.kind = state.config.kind;
      $('[data-field="kind"]', this.root).textContent = isRate(state.config) ? "rate · events per second" : "mean";
      $('[data-field="config"]', this.root).textContent = describe(state.config);
      this.buildNumbers(state);
      this.buildChart();
    }

    buildNumbers(state) {
      const rate = isRate(state.config);
      const items = [
        ["value", rate ? "events/s" : "value"],
        ...(rate ? [] : [["debiased", "debiased"]]),
        ["last", rate ? "events in last push" : "last raw"],
        ["count", "count"],
        ...(state.config.windows || []).map((w) => [`w:${w.name}`, `${w.name} (${windowSpec(w)})`]),
        ...(hasSpread(state) ? [["std", "std"], ["z", "z of last value"]] : []),
        ["updated", "updated"],
      ];
      $("#numbers").replaceChildren(...items.map(([field, label]) => {
        const item = document.createElement("div");
        const term = document.createElement("dt");
        const number = document.createElement("dd");
        term.textContent = label;
        if (field.startsWith("w:")) number.dataset.window = field.slice(2);
        else number.dataset.field = field;
        number.textContent = "–";
        item.append(term, number);
        return item;
      }));
    }

    size() {
      return { width: Math.max($("#chart").clientWidth, 150), height: window.innerWidth < 600 ? 240 : 320 };
    }

    buildChart() {
      if (this.plot) this.plot.destroy();
      const rate = isRate(this.config);
      const series = [{}];
      for (const column of this.columns) {
        series.push({
          label: column.label,
          stroke: column.stroke,
          width: column.width ?? 1,
          dash: column.dash,
          scale: column.scale || "y",
          spanGaps: false,
          ...(column.points ? { paths: () => null, points: { show: true, size: 5, fill: COLORS.raw } } : { points: { show: false } }),
        });
      }
      const bands = [];
      const high = this.columns.findIndex((c) => c.key === "high");
      if (high >= 0) bands.push({ series: [high + 1, high + 2], fill: COLORS.band });
      const axes = [{}, { scale: "y", label: rate ? "events/s" : "value", size: 56 }];
      if (rate) axes.push({ scale: "count", side: 1, label: "events per push", size: 56, grid: { show: false } });
      this.plot = new uPlot(
        {
          ...this.size(),
          cursor: { drag: { x: true, y: false } },
          scales: { x: { time: true, range: (u, min, max) => this.xRange(min, max) }, y: {}, count: {} },
          axes,
          series,
          bands,
          legend: { live: true },
          hooks: {
            setScale: [
              (u, key) => {
                // The time range shown, in seconds (for tests and curious readers).
                if (key === "x") this.root.dataset.span = String(Math.round(u.scales.x.max - u.scales.x.min));
              },
            ],
          },
        },
        this.data,
        $("#chart"),
      );
      $("#chart-note").textContent = rate
        ? "Events per second on the left axis, decaying to now while no events come; each push's event count on the right."
        : "History keeps raw and smoothed values: the windows and the debiased value are drawn from when this page opened.";
    }

    xRange(min, max) {
      const now = serverNow();
      if (this.range !== "all") return [now - Number(this.range), now];
      const end = isRate(this.config) ? Math.max(now, max ?? now) : max;
      if (min === null || min === undefined || end === null || !(end > min)) return [now - 60, now];
      return [min, end];
    }

    row(time, state) {
      const values = this.columns.map((column) => {
        if (!state) return null;
        if (column.key === "raw") return state.last ?? null;
        if (column.key === "value") return state.value ?? null;
        if (column.key === "debiased") return state.debiased ?? null;
        if (column.window) return (state.windows || {})[column.window]?.value ?? null;
        const std = spreadOf(state);
        if (std === null) return null;
        return column.key === "high" ? state.value + 2 * std : state.value - 2 * std;
      });
      return [time, ...values];
    }

    insert(row) {
      const times = this.data[0];
      let at = times.length;
      while (at > 0 && times[at - 1] > row[0]) at -= 1; // late entries are rare: scan back
      this.data.forEach((column, i) => column.splice(at, 0, row[i]));
      if (times.length > MAX_POINTS) this.data = this.data.map((column) => column.slice(-MAX_POINTS));
    }

    gap(time) {
      // A row of nulls: the lines stop there and start again after it.
      if (this.data && this.data[0].length) this.insert(this.row(time, null));
    }

    halflifeOf(column) {
      if (column.key === "value") return this.config.halflife;
      if (column.window) return (this.config.windows || []).find((w) => w.name === column.window)?.halflife ?? null;
      return null;
    }

    // Rows from `from` to `until`: a rate between two pushes decays exponentially, not along
    // the straight line between its points, so the chart gets points along the curve.
    decayRows(from, until) {
      const span = until - from[0];
      if (!(span > 0) || from[2] === null) return [];
      const steps = Math.min(24, Math.max(1, Math.ceil(span / (this.config.halflife / 4))));
      const rows = [];
      for (let k = 1; k <= steps; k += 1) {
        const elapsed = (span * k) / steps;
        rows.push([from[0] + elapsed, ...this.columns.map((column, i) => {
          const halflife = this.halflifeOf(column);
          const value = from[i + 1];
          return halflife === null || value === null ? null : value * 2 ** (-elapsed / halflife);
        })]);
      }
      return rows;
    }

    lastRow() {
      const last = this.data[0].length - 1;
      return last < 0 ? null : this.data.map((column) => column[last]);
    }

    add(row) {
      // A rate: its decay since the previous push, then the jump of this one.
      const previous = this.lastRow();
      if (isRate(this.config) && previous && row[0] > previous[0] + 1e-3) {
        for (const step of this.decayRows(previous, row[0] - 1e-3)) this.insert(step);
      }
      this.insert(row);
    }

    tail() {
      // A rate decays to now while no events come: the chart goes on to now, computed.
      const previous = this.lastRow();
      if (!previous || !isRate(this.config) || !this.connected) return [];
      return this.decayRows(previous, serverNow());
    }

    redraw() {
      if (this.pending || !this.plot) return;
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        if (!this.plot) return;
        const tail = this.tail();
        const data = tail.length ? this.data.map((column, i) => [...column, ...tail.map((row) => row[i])]) : this.data;
        this.plot.setData(data);
        // For tests and curious readers: points drawn, and gaps (rows of nulls) between them.
        const values = this.data[2];
        this.root.dataset.points = String(this.data[1].filter((v) => v !== null).length);
        this.root.dataset.gaps = String(values.filter((v) => v === null).length);

      });
    }

    show() {
      const reading = this.reading;
      if (!reading) return;
      const { state } = reading;
      const now = serverNow();
      const put = (selector, value, suffix = "") => {
        const element = $(selector, $("#numbers"));
        if (!element) return;
        element.textContent = value === null || value === undefined ? "–" : `${formatNumber(value)}${suffix}`;
        element.dataset.value = value === null || value === undefined ? "" : String(value);
      };
      put('[data-field="value"]', reading.value(now));
      put('[data-field="debiased"]', state.debiased);
      put('[data-field="last"]', state.last);
      put('[data-field="count"]', state.count);
      for (const w of state.config.windows || []) put(`[data-window="${CSS.escape(w.name)}"]`, reading.window(w.name, now));
      put('[data-field="std"]', spreadOf(state));
      put('[data-field="z"]', state.z);
      const updated = $('[data-field="updated"]', $("#numbers"));
      if (updated) updated.textContent = ago(state.updated_at).replace("updated ", "");
    }

    tick() {
      this.show();
      if (this.config && isRate(this.config)) this.redraw();
      else if (this.range !== "all") this.redraw(); // the window slides with the clock
    }

    isNew(time, count) {
      if (time === null || time === undefined) return false; // no update yet
      if (this.lastTime === null || time > this.lastTime) return true;
      return time === this.lastTime && count > this.lastCount; // one push of a batch: one time
    }

    apply(state, asOf) {
      const reconfigured = this.lastCount !== null && state.count < this.lastCount;
      if (!this.config || reconfigured || this.layout(state).length !== this.columns.length) this.configure(state);
      if (!this.isNew(state.updated_at, state.count)) {
        if (state.count === 0) this.reading = new Reading(state, asOf); // reset: no value yet
        this.show();
        return;
      }
      this.lastCount = state.count;
      this.lastTime = state.updated_at;
      this.reading = new Reading(state, asOf);
      this.show();
      this.add(this.row(this.timeOf(state), state));
      this.redraw();
    }

    // Where an update goes on the time axis: a mean by halflife at its newest sample's time
    // (pushes may carry timestamps), anything else when it was applied.
    timeOf(state) {
      return !isRate(state.config) && state.timestamp !== null && state.timestamp !== undefined
        ? state.timestamp
        : state.updated_at;
    }

    // Subscribed: what happened before is read now, so nothing falls between the two.
    async seed() {
      let state;
      const sent = Date.now();
      try {
        state = await api(`/v1/streams/${this.name}`);
      } catch (error) {
        if (error.status === 404) {
          $('[data-field="config"]', this.root).textContent = `${error.detail}: waiting for its first push`;
          return;
        }
        throw error;
      }
      const asOf = serverNow() - (Date.now() - sent) / 2000; // a rate is as of the answer
      this.configure(state);
      const history = state.config.history || 0;
      this.reading = new Reading(state, isRate(state.config) ? asOf : state.updated_at);
      let newest = null; // the history entry of the state's own update
      if (history > 0 && state.count > 0) {
        const since = Math.max(0, state.count - MAX_POINTS);
        const page = await api(`/v1/streams/${this.name}/history?since=${since}&limit=${MAX_POINTS}`);
        const entries = page.entries.filter((entry) => entry.id <= state.count);
        const pauses = entries.slice(1).map((entry, i) => entry.time - entries[i].time).sort((a, b) => a - b);
        const usual = pauses.length ? pauses[Math.floor(pauses.length / 2)] : 0;
        let previous = null;
        for (const entry of entries) {
          if (previous !== null && entry.time - previous > Math.max(GAP_FACTOR * usual, 1)) {
            this.gap((entry.time + previous) / 2);
          }
          previous = entry.time;
          if (entry.id === state.count) newest = entry;
          else this.add(this.row(entry.time, { last: entry.raw, value: entry.value, std: entry.std }));
        }
      }
      this.lastCount = state.count;
      this.lastTime = state.updated_at;
      if (state.updated_at !== null) {
        // The newest update in full (windows, debiased), at its own time.
        const time = newest ? newest.time : this.timeOf(state);
        this.add(this.row(time, this.reading.at(isRate(state.config) ? state.updated_at : time)));
      }
      this.show();
      this.redraw();
    }

    async follow() {
      while (this.active) {
        this.controller = new AbortController();
        try {
          await this.read(this.controller.signal);
        } catch (error) {
          if (!this.active) return;
          if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
            this.setStatus("gone", error.status === 401 ? "needs an API key" : "not allowed");
            showError(error);
            return;
          }
          if (error instanceof ApiError && error.status) showError(error);
        }
        if (!this.active) return;
        if (this.subscribed) this.gap(serverNow()); // an outage is drawn as a gap
        this.subscribed = false;
        this.setStatus("waiting", "disconnected: reconnecting");
        this.redraw();
        await sleep(RECONNECT_MS);
      }
    }

    async read(signal) {
      const headers = { Accept: "text/event-stream", ...authHeaders() };
      if (this.lastCount !== null) headers["Last-Event-ID"] = String(this.lastCount);
      let response;
      try {
        response = await fetch(`/v1/streams/${this.name}/events`, { headers, signal, cache: "no-store" });
      } catch (error) {
        if (signal.aborted) throw error;
        throw new ApiError(0, "unreachable", "the service does not answer");
      }
      if (!response.ok) throw await problem(response);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = parseBlock(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          await this.handle(block);
        }
      }
    }

    async handle(block) {
      if (block.comments.includes("subscribed")) {
        const first = !this.config;
        this.subscribed = true;
        if (first) await this.seed();
        this.setStatus("live", "live");
        clearError();
      }
      if (!block.data) return;
      const data = JSON.parse(block.data);
      if (block.event === "update") {
        this.apply(data, data.updated_at); // an update's rate is as of its own time
      } else if (block.event === "lagged") {
        const missed = data.missed === null ? "some" : data.missed;
        this.setStatus("live", `live (missed ${missed} updates)`);
      } else if (block.event === "shutdown") {
        this.setStatus("waiting", "service stopping");
      }
    }

    close() {
      this.active = false;
      if (this.controller) this.controller.abort();
      clearInterval(this.ticker);
      this.resizer.disconnect();
      if (this.plot) this.plot.destroy();
      this.plot = null;
    }
  }

  for (const button of $("#detail").querySelectorAll("[data-range]")) {
    button.addEventListener("click", () => detail && detail.setRange(button.dataset.range));
  }

  // --- which view -----------------------------------------------------------------------------

  let detail = null;
  let ticker = null;

  function route() {
    const params = new URLSearchParams(window.location.search);
    // ?streams=a,b (the page's older address) opens the first.
    const name = params.get("stream") || (params.get("streams") || "").split(",")[0];
    if (detail) detail.close();
    detail = null;
    clearInterval(ticker);
    clearTimeout(overview.timer);
    if (name) {
      $("#overview").hidden = true;
      $("#detail").hidden = false;
      if (!NAME.test(name)) {
        message.textContent = `"${name}" is not a stream name (1 to 200 of A-Z a-z 0-9 _ . : -)`;
        message.hidden = false;
        return;
      }
      detail = new Detail(name);
      return;
    }
    document.title = "EMA service · live";
    $("#detail").hidden = true;
    $("#overview").hidden = false;
    overviewSearch = window.location.search;
    const { prefix, sort } = overviewParams();
    $("#prefix").value = prefix;
    $("#sort").value = sort;
    ticker = setInterval(() => {
      for (const row of document.querySelectorAll(".row")) {
        tickRow(row);
        if (row.dataset.kind === "rate") drawSpark(row, row.dataset.stream);
      }
    }, TICK_MS);
    renderOverview();
    pollOverview();
  }

  function navigate(search) {
    window.history.pushState(null, "", search || window.location.pathname);
    route();
  }

  for (const link of [$("#back"), $("#home")]) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      navigate(link === $("#back") ? overviewSearch : "");
    });
  }
  window.addEventListener("popstate", route);

  showKeyState();
  route();
})();
