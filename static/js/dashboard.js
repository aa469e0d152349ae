// The admin dashboard's charts: the last hour, per minute, from GET /admin/last-hour (what
// /health?history=1 reports, behind the admin's sign-in).
//
// Polled every few seconds rather than pushed over the page's socket: the figures are
// per-minute and cluster-wide (any worker merges every worker's timeline), and stats
// must not take places in the broadcast stream that clients resume from.
// The page shows the same figures as tables without JavaScript.
(function () {
  "use strict";

  const POLL_MS = 3000;
  const section = document.getElementById("last-hour");
  if (!section || typeof uPlot === "undefined") return;
  const url = section.dataset.historyUrl;

  const sum = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);
  const abnormal = (counts) =>
    Object.entries(counts || {})
      .filter(([code]) => !["1000", "1001", "1012"].includes(code))
      .reduce((a, [, n]) => a + n, 0);

  // Each chart: its series (label, colour, value of a minute) and its element.
  const CHARTS = {
    connections: [
      ["Open (max)", "#0b6bcb", (m) => m.connectionsMax],
      ["Connects", "#067647", (m) => m.connects],
      ["Disconnects", "#b54708", (m) => sum(m.disconnects)],
    ],
    broadcasts: [
      ["Broadcasts", "#0b6bcb", (m) => m.broadcasts],
      ["Delivered", "#6941c6", (m) => m.delivered],
    ],
    errors: [
      ["Auth failures", "#b42318", (m) => sum(m.authFailures)],
      ["Client errors", "#b54708", (m) => sum(m.clientErrors)],
      ["Abnormal closes", "#5b6876", (m) => abnormal(m.disconnects)],
    ],
  };

  const state = { charts: {}, data: null, updates: 0, errors: 0 };
  window.dashboard = state; // for people poking at the page, and for the browser tests

  function columns(history, series) {
    return [history.map((m) => m.start), ...series.map(([, , value]) => history.map(value))];
  }

  function size(element) {
    return { width: Math.max(280, element.clientWidth || 300), height: 180 };
  }

  function draw(history) {
    for (const [name, series] of Object.entries(CHARTS)) {
      const element = document.getElementById(`chart-${name}`);
      const data = columns(history, series);
      const chart = state.charts[name];
      if (chart) {
        chart.setData(data);
        continue;
      }
      const options = {
        ...size(element),
        scales: { x: { time: true } },
        series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, points: { show: false } }))],
        axes: [{}, { size: 50 }],
        legend: { live: false },
      };
      state.charts[name] = new uPlot(options, data, element);
    }
  }

  // One request at a time, each given up after a poll's worth of waiting, and none while the tab is
  // hidden: on a slow link, a poll every 3 s whatever the last one did piled requests up (taking the
  // browser's six connections to this site, which the socket's token request also needs) and drew
  // their answers out of order.
  async function refresh() {
    const giveUp = new AbortController();
    const timer = setTimeout(() => giveUp.abort(), POLL_MS * 3);
    try {
      const response = await fetch(url, {
        headers: { Accept: "application/json" },
        cache: "no-store",
        signal: giveUp.signal,
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const report = await response.json();
      state.data = report.history;
      draw(report.history);
      state.updates += 1;
      section.dataset.updatedAt = String(Date.now());
    } catch (problem) {
      state.errors += 1;
      console.warn("dashboard: could not load the last hour:", problem);
    } finally {
      clearTimeout(timer);
    }
  }

  let asking = false;
  async function refreshOnce() {
    if (asking) return;
    asking = true;
    try {
      await refresh();
    } finally {
      asking = false;
    }
  }

  async function poll() {
    if (document.visibilityState === "visible") await refreshOnce();
    setTimeout(poll, POLL_MS);
  }
  // Shown again: at once (a tab hidden for minutes has its timers run once a minute at most).
  document.addEventListener("visibilitychange", () => document.visibilityState === "visible" && refreshOnce());

  window.addEventListener("resize", () => {
    for (const [name, chart] of Object.entries(state.charts)) {
      chart.setSize(size(document.getElementById(`chart-${name}`)));
    }
  });
  poll();
})();
