// The live page: watch streams' raw and smoothed values move, from their event streams.
// Plain JavaScript, no build step; the chart is uPlot (vendor/, pinned).
"use strict";

(() => {
  const NAME = /^[A-Za-z0-9_.:\-]{1,200}$/;
  const MAX_POINTS = 2000; // per chart: older points scroll away
  const RECONNECT_MS = 1000;
  const COLORS = { raw: "#9aa3b5", smooth: "#2f6fde" };

  const $ = (selector, root = document) => root.querySelector(selector);
  const watched = new Map(); // name -> Watch
  const keyInput = $("#key");
  const message = $("#message");

  // --- talking to the service ------------------------------------------------------------------

  function authHeaders() {
    const key = keyInput.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  class HttpError extends Error {
    constructor(status, detail) {
      super(`${status}: ${detail}`);
      this.status = status;
    }
  }

  async function api(path) {
    const response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) {
        // not a problem+json body: keep the status text
      }
      throw new HttpError(response.status, detail);
    }
    return response.json();
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

  // --- formatting ------------------------------------------------------------------------------

  function formatNumber(x) {
    if (x === null || x === undefined) return "–";
    if (Number.isInteger(x)) return String(x);
    return String(Number(x.toPrecision(6)));
  }

  function describe(config) {
    if (!config) return "";
    const parts = [
      `decay ${config.decay}`,
      `initial ${config.initial === null ? "first value" : config.initial}`,
      `auto num_updates ${config.auto_num_updates ? "on" : "off"}`,
      `history ${config.history ?? 0}`,
    ];
    return parts.join(" · ");
  }

  // --- one watched stream ----------------------------------------------------------------------

  class Watch {
    constructor(name) {
      this.name = name;
      this.active = true;
      this.lastId = null; // the count of the newest update shown (for Last-Event-ID)
      this.lastTime = null; // and its time: a reconfigured stream counts from 0 again
      this.subscribed = false;
      this.data = [[], [], []]; // time (s), raw, smoothed
      this.pending = false;
      this.controller = null;
      this.card = $("#card").content.firstElementChild.cloneNode(true);
      this.card.dataset.stream = name;
      this.card.dataset.points = "0";
      $(".name", this.card).textContent = name;
      $(".close", this.card).addEventListener("click", () => unwatch(name));
      $("#streams").append(this.card);
      this.plot = new uPlot(this.chartOptions(), this.data, $(".chart", this.card));
      this.resizer = new ResizeObserver(() => this.plot.setSize(this.size()));
      this.resizer.observe($(".chart", this.card));
      this.setStatus("waiting", "connecting");
      this.follow();
    }

    size() {
      return { width: Math.max($(".chart", this.card).clientWidth, 200), height: 220 };
    }

    chartOptions() {
      return {
        ...this.size(),
        cursor: { drag: { x: true, y: false } },
        scales: { x: { time: true } },
        legend: { live: true },
        series: [
          {},
          { label: "raw", stroke: COLORS.raw, width: 1 },
          { label: "smoothed", stroke: COLORS.smooth, width: 2, points: { show: false } },
        ],
      };
    }

    setStatus(kind, text) {
      const status = $(".status", this.card);
      status.className = `status ${kind}`;
      status.textContent = text;
      this.card.dataset.status = kind;
    }

    show(state) {
      for (const field of ["value", "debiased", "last", "count"]) {
        if (field in state) $(`[data-field="${field}"]`, this.card).textContent = formatNumber(state[field]);
      }
      if (state.config) $(".config", this.card).textContent = describe(state.config);
    }

    addPoint(time, raw, smoothed) {
      const [xs, raws, smooths] = this.data;
      xs.push(time);
      raws.push(raw);
      smooths.push(smoothed);
      if (xs.length > MAX_POINTS) this.data = this.data.map((column) => column.slice(-MAX_POINTS));
      this.redraw();
    }

    redraw() {
      // Many updates a second: draw once per frame.
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.plot.setData(this.data);
        this.card.dataset.points = String(this.data[0].length);
      });
    }

    isNew(time, count) {
      if (time === null || time === undefined) return false; // no update yet
      if (this.lastTime === null || time > this.lastTime) return true;
      return time === this.lastTime && count > this.lastId; // one push of a batch: one time
    }

    apply(state) {
      if (!this.isNew(state.updated_at, state.count)) return; // already shown
      this.lastId = state.count;
      this.lastTime = state.updated_at;
      this.show(state);
      this.addPoint(state.updated_at, state.last, state.value);
    }

    // Subscribed: what happened before is read now, so nothing falls between the two.
    async seed() {
      let state;
      try {
        state = await api(`/v1/streams/${this.name}`);
      } catch (error) {
        if (error.status === 404) {
          $(".config", this.card).textContent = "no such stream yet: waiting for its first push";
          return;
        }
        throw error;
      }
      const history = state.config.history || 0;
      if (history > 0 && state.count > 0) {
        const since = Math.max(0, state.count - MAX_POINTS);
        const page = await api(`/v1/streams/${this.name}/history?since=${since}&limit=${MAX_POINTS}`);
        for (const entry of page.entries) {
          if (entry.id < state.count) this.addPoint(entry.time, entry.raw, entry.value);
        }
      }
      this.show(state);
      this.apply(state);
      if (this.lastId === null) this.lastId = state.count;
    }

    async follow() {
      while (this.active) {
        this.controller = new AbortController();
        try {
          await this.read(this.controller.signal);
        } catch (error) {
          if (!this.active) return;
          if (error instanceof HttpError && (error.status === 401 || error.status === 403)) {
            this.setStatus("gone", error.status === 401 ? "needs an API key" : "not allowed");
            message.textContent = `${this.name}: ${error.message}`;
            return;
          }
          this.setStatus("waiting", "reconnecting");
        }
        if (!this.active) return;
        await sleep(RECONNECT_MS);
      }
    }

    async read(signal) {
      const headers = { Accept: "text/event-stream", ...authHeaders() };
      if (this.lastId !== null) headers["Last-Event-ID"] = String(this.lastId);
      const response = await fetch(`/v1/streams/${this.name}/events`, { headers, signal, cache: "no-store" });
      if (!response.ok) throw new HttpError(response.status, response.statusText);
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
      this.setStatus("waiting", "reconnecting");
    }

    async handle(block) {
      if (block.comments.includes("subscribed")) {
        if (!this.subscribed) {
          this.subscribed = true;
          await this.seed();
        }
        this.setStatus("live", "live");
      }
      if (!block.data) return;
      const data = JSON.parse(block.data);
      if (block.event === "update") this.apply(data);
      else if (block.event === "lagged") {
        const missed = data.missed === null ? "some" : data.missed;
        this.setStatus("waiting", `missed ${missed} updates`);
      } else if (block.event === "shutdown") this.setStatus("waiting", "service stopping");
    }

    close() {
      this.active = false;
      if (this.controller) this.controller.abort();
      this.resizer.disconnect();
      this.plot.destroy();
      this.card.remove();
    }
  }

  // --- the page --------------------------------------------------------------------------------

  function remember() {
    const url = new URL(window.location.href);
    if (watched.size) url.searchParams.set("streams", [...watched.keys()].join(","));
    else url.searchParams.delete("streams");
    window.history.replaceState(null, "", url);
  }

  function watch(name) {
    if (!NAME.test(name)) {
      message.textContent = `${name}: not a stream name (1 to 200 of A-Z a-z 0-9 _ . : -)`;
      return;
    }
    message.textContent = "";
    if (!watched.has(name)) watched.set(name, new Watch(name));
    remember();
  }

  function unwatch(name) {
    const entry = watched.get(name);
    if (!entry) return;
    entry.close();
    watched.delete(name);
    remember();
  }

  let listing = 0;
  async function suggest(prefix) {
    if (prefix && !/^[A-Za-z0-9_.:\-]*$/.test(prefix)) return;
    const ticket = ++listing;
    try {
      const page = await api(`/v1/streams?prefix=${encodeURIComponent(prefix)}&limit=100`);
      if (ticket !== listing) return; // a newer listing is on its way
      const options = page.streams.sort().map((name) => {
        const option = document.createElement("option");
        option.value = name;
        return option;
      });
      $("#names").replaceChildren(...options);
    } catch (_) {
      // suggestions are a convenience: the stream can still be typed in
    }
  }

  $("#pick").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("#name");
    watch(input.value.trim());
    input.value = "";
  });

  let typing = null;
  $("#name").addEventListener("input", (event) => {
    clearTimeout(typing);
    typing = setTimeout(() => suggest(event.target.value.trim()), 250);
  });

  keyInput.value = sessionStorage.getItem("ema.key") || "";
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem("ema.key", keyInput.value.trim());
    message.textContent = "";
    const names = [...watched.keys()];
    names.forEach(unwatch);
    names.forEach(watch);
    suggest("");
  });

  const initial = new URLSearchParams(window.location.search).get("streams");
  for (const name of (initial || "").split(",").filter(Boolean)) watch(name);
  suggest("");
})();
